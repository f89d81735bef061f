"""Checks of the pair before compute, one line per problem naming the config key (postdiff.models.preflight)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from test_models import byte_tokenizer, save_tiny
from transformers import GenerationConfig
from workflow_utils import REPO, TINY, copy_workflow, snakemake

from postdiff.models.families import family_of
from postdiff.models.loading import fingerprint
from postdiff.models.preflight import config_problems, hf_home_problem, pair_facts, pair_info, pair_problems
from postdiff.workflow.io import read_json
from postdiff.workflow.runtime import Job


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("preflight")
    pt, it = save_tiny(root / "pt", 0), save_tiny(root / "it", 1)
    GenerationConfig(eos_token_id=[1, 7]).save_pretrained(it)  # IT stops on one more token, as Gemma IT does
    other = save_tiny(root / "other", 1, extra=("<extra>",))
    return {"pt": str(pt), "it": str(it), "other": str(other), "root": str(root)}


def test_a_good_pair_has_no_problems(pair):
    assert pair_problems(pair["pt"], pair["it"], [0, 1]) == []
    assert config_problems({"pair": {"pt": pair["pt"], "it": pair["it"]}, "layers": [1]}) == []


def test_missing_models_are_one_line_each_naming_key_and_value(pair, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    no_config = Path(pair["root"]) / "empty"
    no_config.mkdir(exist_ok=True)
    problems = pair_problems("postdiff-tests/no-such-model", str(no_config), [0])
    assert len(problems) == 2
    assert problems[0].startswith("pair.pt: model 'postdiff-tests/no-such-model' is not in the Hugging Face cache")
    assert problems[1].startswith(f"pair.it: model directory {str(no_config)!r} has no config.json")
    assert all("\n" not in p for p in problems)


def test_other_vocabulary_and_layers_out_of_range(pair):
    problems = pair_problems(pair["pt"], pair["other"], [0, 2, 5])
    assert problems[0].startswith(f"pair.it: {pair['other']!r}: tokenizers of")
    assert problems[1].startswith("pair.it:") and "embedding rows" in problems[1]
    assert problems[2] == "layers: [2, 5] out of range: the pair has 2 decoder blocks (0..1)"


def test_a_pair_the_run_trains_is_left_to_its_pair_info_job():
    assert config_problems({"pair": {"pt": "builtin", "it": "builtin"}, "layers": [99]}) == []


def test_pair_info_writes_the_facts_once_for_every_job(pair, tmp_path):
    out = tmp_path / "info.json"
    pair_info(Job(input={}, output={"info": str(out)}, params={"pt": pair["pt"], "it": pair["it"], "layers": [0, 1]}))
    facts = read_json(out)
    assert facts["fingerprints"] == {"pt": fingerprint(pair["pt"]), "it": fingerprint(pair["it"])}
    assert facts["stop_ids"] == [1, 7]  # the tokenizer's EOS and IT's extra stop, for PT too
    assert (facts["architecture"], facts["n_layers"]) == ("Gemma3ForCausalLM", 2)
    with pytest.raises(ValueError, match=r"(?s)cannot be used:\npair.it: .*\nlayers: \[3\] out of range"):
        pair_info(Job(input={}, output={"info": str(tmp_path / "bad.json")},
                      params={"pt": pair["pt"], "it": pair["other"], "layers": [3]}))
    assert not (tmp_path / "bad.json").exists()


def _bad_pair_config(workdir: Path, pair: dict, **pair_keys) -> str:
    cfg = yaml.safe_load((workdir / TINY).read_text())
    cfg["pair"] = {"pt": pair["pt"], "it": "postdiff-tests/no-such-model", "dtype": "float32", "device": "cpu", **pair_keys}
    cfg["hf"] = {"home": str(workdir / "hf_home"), "offline": True}
    (workdir / "config" / "bad_pair.yaml").write_text(yaml.safe_dump(cfg))
    return "config/bad_pair.yaml"


def test_a_run_with_a_missing_model_stops_before_its_first_job(pair, tmp_path):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, configfile=_bad_pair_config(workdir, pair), check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pair.it: ")]
    assert lines == [f"pair.it: model 'postdiff-tests/no-such-model' is not in the Hugging Face cache and "
                     f"HF_HUB_OFFLINE is set (HF_HOME={workdir / 'hf_home'}, HF_HUB_OFFLINE=1)"]
    assert "Traceback" not in proc.stderr
    assert not (workdir / "results").exists()
    # A dry run never loads or looks for models.
    assert snakemake(workdir, "-n", configfile="config/bad_pair.yaml").returncode == 0


def test_preflight_off_leaves_the_check_to_the_pair_info_job(pair, tmp_path):
    workdir = copy_workflow(tmp_path)
    config = _bad_pair_config(workdir, pair, preflight=False)
    proc = snakemake(workdir, "results/tiny/pair/info.json", configfile=config, check=False)
    assert proc.returncode != 0 and "Error in rule pair_info" in proc.stdout + proc.stderr
    log = (workdir / "results/tiny/logs/pair/info.log").read_text()
    assert "Traceback" in log and "pair.it: model 'postdiff-tests/no-such-model' is not in the Hugging Face cache" in log
    said = [line for line in proc.stderr.splitlines() if line.startswith("postdiff: postdiff.models.preflight:pair_info failed")]
    assert len(said) == 1 and "pair.it: model 'postdiff-tests/no-such-model'" in said[0]
    assert said[0].endswith("(traceback in results/tiny/logs/pair/info.log)")


def _save_tiny_of(path: Path, model) -> str:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)


def test_a_model_whose_blocks_the_hooks_cannot_find_is_refused_before_any_weights_load(pair, tmp_path):
    """GPT-2 keeps its blocks in ``transformer.h`` and its final norm in ``ln_f``: built on the
    meta device from its config, the check names the key, the model and what is missing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = _save_tiny_of(tmp_path / "gpt2", GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=260)))
    Path(gpt2, "model.safetensors").unlink()  # loading weights would fail with another error
    problems = pair_problems(gpt2, pair["it"], [0])
    assert problems[0] == (f"pair.pt: {gpt2!r}: cannot find the decoder's layers in GPT2LMHeadModel: "
                           "the workflow hooks `model.get_decoder().layers` and reads `.norm`")


def test_pair_info_warns_about_an_architecture_no_family_test_covers(tmp_path, caplog):
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    torch.manual_seed(0)
    specs = [_save_tiny_of(tmp_path / role, Starcoder2ForCausalLM(Starcoder2Config(
        vocab_size=260, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1))) for role in ("pt", "it")]
    with caplog.at_level(logging.WARNING, logger="postdiff.models.preflight"):
        facts = pair_facts(*specs)
    assert facts["architecture"] == "Starcoder2ForCausalLM" and facts["family"] is None
    assert "Starcoder2ForCausalLM is not among the architectures the workflow is tested on" in caplog.text


def test_pair_info_names_a_tested_family_by_its_hub_ids():
    assert family_of("meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct").name == "llama3"
    assert family_of("meta-llama/Llama-3.2-1B-Instruct", "meta-llama/Llama-3.2-1B") is None


def test_a_config_no_causal_lm_takes_is_one_line(pair, tmp_path):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=16, num_heads=2, d_ff=32).save_pretrained(tmp_path / "t5")
    byte_tokenizer().save_pretrained(tmp_path / "t5")
    problems = pair_problems(pair["pt"], str(tmp_path / "t5"), [0])
    assert problems[0].startswith(f"pair.it: {str(tmp_path / 't5')!r}: transformers ")
    assert problems[0].endswith("builds no causal LM from its T5Config") and "\n" not in problems[0]


GEMMA = {"pair": {"pt": "google/gemma-3-4b-pt", "it": "google/gemma-3-4b-it"}, "layers": [17]}


def test_an_offline_hub_pair_needs_hf_home(pair, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    offline = {**GEMMA, "hf": {"home": None, "offline": True}}
    problem = hf_home_problem(offline, environ={})
    assert problem == ("hf.home: null, but hf.offline is true and pair.pt='google/gemma-3-4b-pt', "
                       "pair.it='google/gemma-3-4b-it' is a hub id: set hf.home to the Hugging Face cache "
                       "the jobs' nodes see (or export HF_HOME)")
    assert config_problems(offline) == [problem]  # before any look for the models
    # A cache named in the config or the environment, the hub reachable, or local directories: no problem.
    assert hf_home_problem({**GEMMA, "hf": {"home": "/shared/hf", "offline": True}}, environ={}) is None
    assert hf_home_problem(offline, environ={"HF_HOME": "/shared/hf"}) is None
    assert hf_home_problem({**GEMMA, "hf": {"home": None, "offline": False}}, environ={}) is None
    local = {"pair": {"pt": pair["pt"], "it": pair["it"]}, "hf": {"home": None, "offline": True}}
    assert hf_home_problem(local, environ={}) is None


def test_the_gemma_config_without_hf_home_stops_before_its_first_job(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HOME", raising=False)
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, configfile="config/gemma3-4b.yaml", check=False)
    assert proc.returncode != 0
    assert any(line.startswith("hf.home: null, but hf.offline is true") for line in proc.stderr.splitlines()), proc.stderr
    assert not (workdir / "results").exists()


def test_a_pt_tokenizer_adding_a_bos_that_its_prefixes_lack_is_one_line(pair, tmp_path):
    """The prefixes follow IT's tokenizer; a PT trained with a BOS it would not read is refused."""
    it = shutil.copytree(pair["it"], tmp_path / "it")
    spec = json.loads((it / "tokenizer.json").read_text())
    spec["post_processor"] = None  # IT names <bos> but neither adds it nor has a chat template
    (it / "tokenizer.json").write_text(json.dumps(spec))
    assert pair_problems(pair["pt"], str(it), [0]) == [
        f"pair.it: {str(it)!r}: PT's tokenizer opens every input with BOS id 2 ('<bos>'), but IT's prefixes, "
        "which PT reads too, start with no BOS"]


def test_the_login_node_checks_import_no_torch_without_pair_preflight():
    """With pair.preflight: false (the nodes' model cache unseen from the Snakemake host) onstart's
    checks read the config only: no torch or transformers start there."""
    script = ("import sys; from postdiff.models.preflight import exit_on_problems; "
              "from postdiff.workflow.config import placeholder_problems; "
              "exit_on_problems({'pair': {'preflight': False}}); placeholder_problems({'resources': {'gpu': {'gpu': 1}}}); "
              "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.strip() == "[]"
