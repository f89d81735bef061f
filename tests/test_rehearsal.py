"""The rehearsal pair: Gemma 3 4B's structure around the embedded pair's weights (postdiff.models.rehearsal)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_models import save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

from postdiff.models.rehearsal import (
    REPO_IDS,
    build_twin,
    padded_rows,
    remap_embeddings,
    snapshot_commit,
    twin_model,
    twin_tokenizer,
)
from postdiff.workflow.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "workflow" / "resources" / "hf_home"


def test_remap_embeddings_moves_the_stop_row_and_fills_new_rows_with_the_unused_one():
    embed = torch.arange(12.0).view(6, 2)
    out = remap_embeddings(embed, n_rows=10, unused=3, stop=1, end_of_turn=7)
    expected = torch.stack([embed[i] for i in (0, 3, 2, 3, 4, 5, 3, 1, 3, 3)])
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="do not fit"):
        remap_embeddings(embed, n_rows=5, unused=3, stop=1, end_of_turn=4)


def test_padded_rows_round_up_to_the_multiple():
    assert (padded_rows(1029), padded_rows(1088), padded_rows(1)) == (1088, 1088, 64)


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("twin")
    hf_home = root / "hf_home"
    sources = {role: save_tiny(root / role, seed) for role, seed in (("pt", 0), ("it", 1))}
    # Shards small enough that even these models come in several, as the 4B checkpoints do.
    snapshots = {role: build_twin(path, role, hf_home, shard_size="40KB") for role, path in sources.items()}
    return {"hf_home": hf_home, "sources": sources, "snapshots": snapshots}


def test_twin_has_the_real_pairs_structure(twin: dict):
    for role, snapshot in twin["snapshots"].items():
        config = json.loads((snapshot / "config.json").read_text())
        assert config["architectures"] == ["Gemma3ForConditionalGeneration"] and config["model_type"] == "gemma3"
        assert config["vision_config"]["model_type"] == "siglip_vision_model"
        tok = AutoTokenizer.from_pretrained(snapshot)
        ids = {t: tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>", "<eos>")}
        assert ids["<end_of_turn>"] != tok.unk_token_id and tok.eos_token_id == ids["<eos>"] == 1
        assert config["text_config"]["vocab_size"] == padded_rows(len(tok)) > len(tok)
        index = json.loads((snapshot / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 2
        for shard in shards:
            with safe_open(str(snapshot / shard), framework="pt") as f:
                assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"BF16"}  # noqa: SIM118
        generation = json.loads((snapshot / "generation_config.json").read_text())
        expected = [1, ids["<end_of_turn>"]] if role == "it" else 1
        assert generation["eos_token_id"] == expected, role


def test_twin_is_a_hub_cache_snapshot(twin: dict):
    for role, snapshot in twin["snapshots"].items():
        repo = twin["hf_home"] / "hub" / f"models--{REPO_IDS[role].replace('/', '--')}"
        assert (repo / "refs" / "main").read_text() == snapshot.name
        blobs = {}
        for link in snapshot.iterdir():
            assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()
            target = link.resolve()
            assert target.parent == (repo / "blobs").resolve() and target.name == sha256_file(target)
            blobs[link.name] = target.name
        assert snapshot_commit(blobs) == snapshot.name


def test_twin_computes_the_source_model_with_the_stop_token_moved(twin: dict):
    """In fp32, before the bf16 cast: the wrapper's logits are the source's, except that the
    source's EOS logit now belongs to <end_of_turn> and EOS takes the unused <unk> logit."""
    path = twin["sources"]["it"]
    source = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    ids = twin_tokenizer(tok)
    model = twin_model(source, tok, ids)
    x = torch.tensor([[2, 40, 77, 91, 120, 5]])
    with torch.no_grad():
        want, got = source(input_ids=x).logits, model(input_ids=x).logits
    eos, unk, eot = tok.eos_token_id, tok.unk_token_id, ids["<end_of_turn>"]
    keep = [j for j in range(want.shape[-1]) if j != eos]
    # Another wrapper class and a padded, permuted unembedding may block fp32 reductions
    # differently (~1e-7 at logits of size <= 0.45); measured bit-identical under default, avx2
    # and avx512.
    torch.testing.assert_close(got[..., keep], want[..., keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., eot], want[..., eos], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[..., eos], want[..., unk], rtol=1e-5, atol=1e-5)


def _load_by_hub_id(hf_home: Path) -> str:
    """Load the pair by hub ids in a fresh process (the hub client reads HF_HOME on import)."""
    code = (
        "from postdiff.models.loading import load_pair\n"
        f"p = load_pair({REPO_IDS['pt']!r}, {REPO_IDS['it']!r}, 'bfloat16', 'cpu')\n"
        "print(type(p.pt).__name__, next(p.it.parameters()).dtype, p.pt.generation_config.eos_token_id)\n"
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_twin_loads_by_hub_id_with_the_hub_offline_and_one_stop_set(twin: dict):
    eot = AutoTokenizer.from_pretrained(twin["snapshots"]["it"]).convert_tokens_to_ids("<end_of_turn>")
    assert _load_by_hub_id(twin["hf_home"]) == f"Gemma3ForConditionalGeneration torch.bfloat16 [1, {eot}]"


def test_shipped_twin_matches_its_checksums():
    """The shipped cache is content-addressed: every blob is named by its sha256 and every
    snapshot's commit hashes its files' blobs, so one changed byte fails here."""
    for repo_id in REPO_IDS.values():
        repo = SHIPPED / "hub" / f"models--{repo_id.replace('/', '--')}"
        commit = (repo / "refs" / "main").read_text()
        snapshot = repo / "snapshots" / commit
        blobs = {link.name: link.resolve().name for link in snapshot.iterdir()}
        assert {"config.json", "model.safetensors.index.json", "tokenizer.json", "generation_config.json"} <= set(blobs)
        for blob in (repo / "blobs").iterdir():
            assert sha256_file(blob) == blob.name, blob
        assert snapshot_commit(blobs) == commit, repo_id
