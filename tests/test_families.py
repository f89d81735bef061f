"""Every tested family end to end on its tiny twin (postdiff.models.twins): pair info, teacher, caches,
surrogates, gates, FullDelta evaluation and the feature lens, through the package's own stages.

The twins are built in a temporary directory (a fraction of a second per family). Each family's
slice checks the invariants that every pair must keep: a zero gate is PT exactly, PT and IT
stop on one set, BOS appears once (or never, for the families that add none), answer positions
are exact, and the lens reads the model's final norm and final-logit soft-cap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
import torch
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings
from workflow_utils import REPO, copy_workflow

from postdiff.data.splits import assign_splits
from postdiff.data.suite import builtin_suite
from postdiff.method import variants as V
from postdiff.method.cache import cache_shard, load_split
from postdiff.method.evaluate import evaluate_variant
from postdiff.method.records import read_rows
from postdiff.method.gates import calibrate
from postdiff.method.spec import Variant
from postdiff.method.standardise import standardiser
from postdiff.method.surrogate import train_layer
from postdiff.method.teacher import teacher
from postdiff.models import twins
from postdiff.models.families import FAMILIES, Family, family_of, paper_layers
from postdiff.models.forward import answer_logprobs, block_outputs
from postdiff.models.generation import generate
from postdiff.models.hook import LayerEdit, intervene
from postdiff.models.loading import family_prefix_problem, load_model, load_pair, load_tokenizer
from postdiff.models.preflight import pair_info
from postdiff.models.template import prefix_bos, render
from postdiff.outputs import features
from postdiff.workflow.io import read_json, write_parquet
from postdiff.workflow.runtime import Job

LAYERS = paper_layers(twins.N_LAYERS)  # [2, 3]: the last block too, read before the final norm
SIZES = {"train": 2, "calib": 1, "selector": 0, "test": 1}  # prompts per slice
MAX_NEW = 12
# fp32 from the twins' bf16 or fp32 weights. The slices pass in bf16 too (as the pair configs run
# on a GPU) on an AVX-512 CPU, but under ATEN_CPU_CAPABILITY=default torch's CPU bf16 SDPA refuses
# sequences of 64 tokens or more ("pack_vnni2 is only supported when avx512 is supported").
MODEL = {"dtype": "float32", "device": "cpu"}


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The world suite's prompts in train, calib and test splits (shared by every family)."""
    root = tmp_path_factory.mktemp("family_splits")
    suite = assign_splits(builtin_suite("world", 0, SIZES, {"seed": 0, "n_countries": 40}), SIZES, 0)
    out = {}
    for split in ("train", "calib", "test"):
        out[split] = str(root / f"{split}.parquet")
        write_parquet(suite.filter(pl.col("split") == split), out[split])
    return out


def run_slice(family: Family, root: Path, splits: dict[str, str]) -> dict:
    """The workflow's stages on the family's twin, in the workflow's order; the files they wrote."""
    dirs = twins.build(family, root)
    models = {"pt": str(dirs["pt"]), "it": str(dirs["it"]), **MODEL}
    out = root / "out"
    files = {"info": str(out / "info.json"), "std": str(out / "standardiser.safetensors"), "gates": str(out / "gates.json"),
             "gate_curve": str(out / "gate_curve.parquet"), "gate_choice": str(out / "gate_choice.json"),
             "teacher": {}, "cache": {}, "records": {},
             "surrogates": [str(out / f"surrogate_{layer}.safetensors") for layer in LAYERS]}
    pair_info(Job(input={}, output={"info": files["info"]}, params={**models, "layers": LAYERS}))
    pair = {"pair": files["info"]}
    for split, path in splits.items():
        files["teacher"][split] = str(out / f"teacher_{split}.parquet")
        teacher(Job(input={"split": path}, output={"completions": files["teacher"][split]},
                    params={**models, "max_new_tokens": MAX_NEW, "batch_size": 8}))
    for split in ("train", "calib"):
        files["cache"][split] = str(out / f"cache_{split}.safetensors")
        cache_shard(Job(input={"teacher": files["teacher"][split], **pair},
                        output={"tensors": files["cache"][split], "index": str(out / f"index_{split}.parquet")},
                        params={**models, "layers": LAYERS, "shard": 0, "n_shards": 1, "batch_size": 8}))
    standardiser(Job(input={"shards": [files["cache"]["train"]]}, output={"standardiser": files["std"]}, params={"layers": LAYERS}))
    for layer, module in zip(LAYERS, files["surrogates"], strict=True):
        train_layer(Job(input={"shards": [files["cache"]["train"]], "standardiser": files["std"],
                               "teacher": files["teacher"]["train"], **pair},
                        output={"module": module, "curve": str(out / f"curve_{layer}.parquet"),
                                "curve_png": str(out / f"curve_{layer}.png")},
                        params={**models, "layer": layer, "layers": LAYERS, "seed": 0, "expansion": 2, "k": 4,
                                "batch_size": 32, "steps": 20, "dead_steps": 10}))
    calibrate(Job(input={"split": splits["calib"], "teacher": files["teacher"]["calib"], "surrogates": files["surrogates"]},
                  output={"gates": files["gates"], "curve": files["gate_curve"], "choice": files["gate_choice"]},
                  params={**models, "mode": "full", "layers": LAYERS, "grid": [0.0, 0.5, 1.0], "max_rounds": 1, "batch_size": 8,
                          "bootstrap": {"B": 200, "seed": 0, "level": 0.95}}))
    gates = {int(k): v for k, v in read_json(files["gates"]).items()}
    for variant in (Variant("FullDelta", "full", gates, dict(zip(LAYERS, files["surrogates"]))), Variant("PT", "pt")):
        spec = out / f"{variant.name}.json"
        spec.write_text(json.dumps(variant.to_json()))
        files["records"][variant.name] = str(out / f"records_{variant.name}.parquet")
        evaluate_variant(Job(input={"variant": str(spec), "split": splits["test"], "teacher": files["teacher"]["test"]},
                             output={"records": files["records"][variant.name]},
                             params={**models, "max_new_tokens": MAX_NEW, "batch_size": 8}))
    return files


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_slice(name: str, tmp_path: Path, splits: dict[str, str]) -> None:
    family = FAMILIES[name]
    run = run_slice(family, tmp_path, splits)
    info = read_json(run["info"])
    pair = load_pair(str(tmp_path / family.name / "pt"), str(tmp_path / family.name / "it"), **MODEL)
    tok = pair.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in family.specials}

    # pair_info: the real class and depth, and one stop set: both tokenizers' EOS and both
    # generation configs' stops, on PT and IT alike.
    stops = sorted({ids[t] for role in ("pt", "it") for t in (family.eos[role], *family.stops[role])})
    assert (info["architecture"], info["n_layers"]) == (family.architecture, twins.N_LAYERS)
    assert info["stop_ids"] == stops
    assert pair.pt.generation_config.eos_token_id == pair.it.generation_config.eos_token_id == stops
    assert (pair.pt.get_output_embeddings().weight is pair.pt.get_input_embeddings().weight) == family.tied
    softcap = getattr(pair.pt.config, "attn_logit_softcapping", None)
    if softcap is not None:  # sdpa would drop the attention soft-cap
        assert pair.pt.config._attn_implementation == "eager"

    # The tokenizers' special-token behaviour as the family ships it: the BOS each role names,
    # whether encoding adds it, and what prefixes open with (OLMo 2: a BOS we add; SmolLM2: none).
    toks = {role: load_tokenizer(str(tmp_path / family.name / role)) for role in ("pt", "it")}
    for role, role_tok in toks.items():
        assert role_tok.bos_token == family.bos[role]
        assert role_tok.pad_token == (family.pad or family.eos[role])  # no pad named: load_tokenizer pads with EOS
        added = role_tok("x")["input_ids"][0] == role_tok.bos_token_id
        assert added == (family.adds_bos and family.bos[role] is not None)
    assert prefix_bos(toks["it"]) == (None if family.prefix is None else ids[family.prefix])

    # Teacher: the prefix is the template with the family's prefix BOS once, or with no BOS at all.
    bos = [ids[family.prefix]] if family.prefix else []
    for split, path in run["teacher"].items():
        rows = read_rows(splits[split], path)
        for prompt, prefix in rows.select("prompt", "prefix_ids").iter_rows():
            assert prefix == bos + tok(render(prompt), add_special_tokens=False)["input_ids"]
        for answer, eos in rows.select("token_ids", "teacher_eos").iter_rows():
            assert eos == (answer[-1] in stops) and not set(answer[:-1]) & set(stops)
    completions = pl.concat([pl.read_parquet(p) for p in run["teacher"].values()])
    # IT's known edit makes it end answers with the family's turn-end token, which PT's own
    # generation config may not name (Llama 3's <|eot_id|>, Gemma 2's <end_of_turn>).
    assert any(a[-1] == ids[family.turn_end] for a in completions["token_ids"].to_list())

    # Caches: one row per answer-phase position m-1 .. m+n-2 of every teacher row, in order.
    train = pl.read_parquet(run["teacher"]["train"])
    h_pt, delta, index = load_split([run["cache"]["train"]], LAYERS[0])
    want = [(pid, pos) for pid, p, a in train.select("id", "prefix_ids", "token_ids").iter_rows()
            for pos in range(len(p) - 1, len(p) + len(a) - 1)]
    assert list(index.iter_rows()) == want and h_pt.shape[0] == len(want)
    # The known edit: blocks before the edited one compute the same outputs, later ones differ.
    batch = torch.tensor([train["prefix_ids"][0]])
    before = {role: block_outputs(model, batch, torch.ones_like(batch), [twins.EDITED_LAYER - 1, LAYERS[0]])
              for role, model in (("pt", pair.pt), ("it", pair.it))}
    assert torch.equal(before["pt"][twins.EDITED_LAYER - 1], before["it"][twins.EDITED_LAYER - 1])
    assert not torch.equal(before["pt"][LAYERS[0]], before["it"][LAYERS[0]]) and delta.abs().sum() > 0

    # Gates never do worse on calib than PT (alpha 0 is on the grid).
    curve = pl.read_parquet(run["gate_curve"])
    gates = {int(k): v for k, v in read_json(run["gates"]).items()}
    zero = curve.filter(pl.col("gates") == json.dumps({str(layer): 0.0 for layer in LAYERS}))["kl"][0]
    chosen = curve.filter(pl.col("gates") == json.dumps({str(layer): gates[layer] for layer in LAYERS}))["kl"][0]
    assert chosen <= zero

    # FullDelta and PT records on test: every prompt, a KL to IT (PT's above 0: the gap is real),
    # and a zero-gate FullDelta is PT, teacher-forced and in generation.
    test = pl.read_parquet(run["teacher"]["test"])
    for path in run["records"].values():
        records = pl.read_parquet(path)
        assert records["id"].to_list() == sorted(test["id"].to_list()) and records["kl"].is_finite().all()
    assert pl.read_parquet(run["records"]["PT"])["kl"].min() > 0
    zero_gate = Variant("zero", "full", {layer: 0.0 for layer in LAYERS}, dict(zip(LAYERS, run["surrogates"])))
    edits = V.edits(zero_gate, V.materialise(zero_gate)[0])
    rows = list(zip(test["prefix_ids"].to_list(), test["token_ids"].to_list()))
    plain, gated = dict(answer_logprobs(pair.pt, rows, 4)), dict(answer_logprobs(pair.pt, rows, 4, edits=edits))
    assert all(torch.equal(plain[i], gated[i]) for i in plain)
    prefixes = test["prefix_ids"].to_list()
    assert generate(pair.pt, tok, prefixes, MAX_NEW, 4, edits=edits) == generate(pair.pt, tok, prefixes, MAX_NEW, 4)

    # The lens: for a unit-RMS vector at the last block's output, its logits are the model's own
    # (final norm, unembedding and final soft-cap as the model applies them).
    it = pair.it
    lens = features.Lens.of(it, len(tok))
    d = it.config.hidden_size
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    v = v / v.pow(2).mean().sqrt()
    last = twins.N_LAYERS - 1
    batch = torch.tensor([prefixes[0]])
    mask = torch.zeros_like(batch, dtype=torch.bool)
    mask[0, -1] = True
    with torch.no_grad(), intervene(it, {last: LayerEdit(1.0, lambda h: v.expand_as(h) - h)}, mask):
        model_logits = it(input_ids=batch).logits[0, -1, : len(tok)]
    (top,) = lens.top(v, 5)
    want = model_logits.topk(5)
    assert [t for t, _ in top["promoted"]] == want.indices.tolist()
    # rms_norm_eps (1e-6) in the model's norm, and fp32 rounding of h + (v - h): 1e-4 is ample.
    torch.testing.assert_close(torch.tensor([x for _, x in top["promoted"]]), want.values, rtol=1e-4, atol=1e-4)
    if family.layout.get("final_logit_softcapping"):
        assert lens.cap == family.layout["final_logit_softcapping"] and want.values.abs().max() < lens.cap


PAIRS = sorted((REPO / "config" / "pairs").glob("*.yaml"))


def test_every_family_has_a_config_with_its_hub_ids_and_the_papers_layers() -> None:
    families = {}
    for path in PAIRS:
        config = yaml.safe_load(path.read_text())
        family = family_of(config["pair"]["pt"], config["pair"]["it"])
        assert family is not None, f"{path.name}: {config['pair']} is no tested family's pair"
        assert config["layers"] == paper_layers(family.n_layers), path.name
        families[family.name] = path.name
    assert sorted(families) == sorted(FAMILIES)
    # Gemma 3 4B's layers are where paper_layers puts them on its 34 blocks.
    assert yaml.safe_load((REPO / "config" / "gemma3-4b.yaml").read_text())["layers"] == paper_layers(34)


def test_every_pair_config_dry_runs_over_the_gemma_config(tmp_path: Path) -> None:
    """``snakemake -n --configfile config/gemma3-4b.yaml config/pairs/<pair>.yaml``, in process
    (one Snakemake start for all of them); a dry run never loads a model."""
    workdir = copy_workflow(tmp_path)
    gemma = yaml.safe_load((workdir / "config" / "gemma3-4b.yaml").read_text())
    for path in PAIRS:
        overlay = yaml.safe_load(path.read_text())
        with mock.patch.dict(os.environ), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
            workflow = api.workflow(
                resource_settings=ResourceSettings(cores=1),
                config_settings=ConfigSettings(configfiles=[workdir / "config" / "gemma3-4b.yaml", workdir / "config" / "pairs" / path.name]),
                snakefile=workdir / "Snakefile",
                workdir=workdir,
            )
            workflow.dag(DAGSettings()).execute_workflow(executor="dryrun")
            config = workflow._workflow.config
            jobs = list(workflow._workflow.dag.jobs)
        assert (config["run"], config["pair"]["pt"], config["layers"]) == (overlay["run"], overlay["pair"]["pt"], overlay["layers"])
        # The overlay keeps the Gemma config's sizes, dtype and resources.
        assert config["surrogate"] == gemma["surrogate"] and config["pair"]["dtype"] == "bfloat16"
        caches = [job for job in jobs if job.rule.name == "cache_shard"]
        assert caches and all(job.params.layers == overlay["layers"] for job in caches), path.name
        assert all(str(job.output[0]).startswith(f"results/{overlay['run']}/") for job in jobs if job.output), path.name


def test_pt_and_it_stop_on_both_tokenizers_eos_without_generation_configs(tmp_path: Path) -> None:
    """SmolLM2's PT tokenizer ends on <|endoftext|>, its IT tokenizer on <|im_end|>. Without the
    generation configs that name both, each model would stop on its own tokenizer's EOS alone, and a
    steered PT would run past the <|im_end|> that ends IT's answers."""
    dirs = twins.build(FAMILIES["smollm2"], tmp_path)
    for path in dirs.values():
        (path / "generation_config.json").unlink()
    pt, pt_tok = load_model(str(dirs["pt"]), device="cpu", partner=str(dirs["it"]))
    it, it_tok = load_model(str(dirs["it"]), device="cpu", partner=str(dirs["pt"]))
    assert (pt_tok.eos_token, it_tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
    assert pt.generation_config.eos_token_id == it.generation_config.eos_token_id == [0, 2]


def test_a_tested_familys_tokenizer_that_opens_prefixes_otherwise_is_refused(tmp_path: Path) -> None:
    """Preflight's line for a hub tokenizer that no longer opens prefixes as families.py states."""
    olmo = FAMILIES["olmo2"]
    smollm_it = twins.tokenizer(FAMILIES["smollm2"], "it")
    assert family_prefix_problem(olmo.pt, olmo.it, twins.tokenizer(olmo, "it")) is None
    assert family_prefix_problem(olmo.pt, olmo.it, smollm_it) == (
        "its tokenizer opens every prefix with no BOS, but olmo2's published one opens them with <|endoftext|> "
        "(postdiff.models.families): check its files before trusting results")
    assert family_prefix_problem("some/pt", "some/it", smollm_it) is None  # not a tested family: nothing stated
