"""Every tested family end to end on its tiny twin (postdiff.twins): pair info, teacher, caches,
surrogates, gates, FullDelta evaluation and the feature lens, through the package's own stages.

The twins are built in a temporary directory (a fraction of a second per family). Each family's
slice checks the invariants that every pair must keep: a zero gate is PT exactly, PT and IT
stop on one set, BOS appears once (or never, for the families that add none), answer positions
are exact, and the lens reads the model's final norm and final-logit soft-cap.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch

from postdiff import features, twins
from postdiff.cache import cache_shard, load_split
from postdiff.evaluate import evaluate_variant, read_rows
from postdiff.families import FAMILIES, Family, paper_layers
from postdiff.forward import answer_logprobs, block_outputs
from postdiff.gates import calibrate
from postdiff.generation import generate
from postdiff.hook import LayerEdit, intervene
from postdiff.io import read_json, write_parquet
from postdiff.models import load_pair
from postdiff.preflight import pair_info
from postdiff.runtime import Job
from postdiff.spec import Variant
from postdiff.splits import assign_splits
from postdiff.standardise import standardiser
from postdiff.suite import builtin_suite
from postdiff.surrogate import train_layer
from postdiff.template import render

LAYERS = paper_layers(twins.N_LAYERS)  # [2, 3]: the last block too, read before the final norm
SIZES = {"train": 2, "calib": 1, "selector": 0, "test": 1}  # prompts per slice
MAX_NEW = 12
MODEL = {"dtype": "auto", "device": "cpu"}  # fp32 on the CPU, from the twins' bf16 or fp32 weights


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
    """The workflow's stages on the family's twin, in dependency order; what the checks read."""
    dirs = twins.build(family, root)
    pair = {"pt": str(dirs["pt"]), "it": str(dirs["it"])}
    out = root / "out"
    info = out / "info.json"
    pair_info(Job(input={}, output={"info": str(info)}, params={**pair, "layers": LAYERS}))
    common = {"input": {"pair": str(info)}, "params": {**pair, **MODEL}}
    teacher = {}
    for split in splits:
        teacher[split] = str(out / f"teacher_{split}.parquet")
        from postdiff.teacher import teacher as teacher_stage

        teacher_stage(Job(input={"split": splits[split]}, output={"completions": teacher[split]},
                          params={**pair, **MODEL, "max_new_tokens": MAX_NEW, "batch_size": 8}))
    shards = {}
    for split in ("train", "calib"):
        shards[split] = str(out / f"cache_{split}.safetensors")
        cache_shard(Job(input={"teacher": teacher[split], **common["input"]},
                        output={"tensors": shards[split], "index": str(out / f"index_{split}.parquet")},
                        params={**common["params"], "layers": LAYERS, "shard": 0, "n_shards": 1, "batch_size": 8}))
    std = str(out / "standardiser.safetensors")
    standardiser(Job(input={"shards": [shards["train"]]}, output={"standardiser": std}, params={"layers": LAYERS}))
    surrogates = [str(out / f"surrogate_{layer}.safetensors") for layer in LAYERS]
    for layer, module in zip(LAYERS, surrogates):
        train_layer(Job(input={"shards": [shards["train"]], "standardiser": std, "teacher": teacher["train"], **common["input"]},
                        output={"module": module, "curve": str(out / f"curve_{layer}.parquet"), "curve_png": str(out / f"curve_{layer}.png")},
                        params={**common["params"], "layer": layer, "layers": LAYERS, "seed": 0, "expansion": 2, "k": 4,
                                "batch_size": 32, "steps": 20, "dead_steps": 10}))
    gates = str(out / "gates.json")
    calibrate(Job(input={"split": splits["calib"], "teacher": teacher["calib"], "surrogates": surrogates},
                  output={"gates": gates, "curve": str(out / "gate_curve.parquet")},
                  params={**common["params"], "mode": "full", "layers": LAYERS, "grid": [0.0, 0.5, 1.0], "max_rounds": 1,
                          "batch_size": 8}))
    full = Variant("FullDelta", "full", {int(k): v for k, v in read_json(gates).items()}, dict(zip(LAYERS, surrogates)))
    records = {}
    for variant in (full, Variant("PT", "pt")):
        spec = out / f"{variant.name}.json"
        spec.write_text(json.dumps(variant.to_json()))
        records[variant.name] = str(out / f"records_{variant.name}.parquet")
        evaluate_variant(Job(input={"variant": str(spec), "split": splits["test"], "teacher": teacher["test"]},
                             output={"records": records[variant.name]},
                             params={**common["params"], "max_new_tokens": MAX_NEW, "batch_size": 8}))
    return {"pair": pair, "info": read_json(info), "teacher": teacher, "shards": shards, "surrogates": surrogates,
            "gates": gates, "records": records, "gate_curve": str(out / "gate_curve.parquet")}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_slice(name: str, tmp_path: Path, splits: dict[str, str]) -> None:
    family = FAMILIES[name]
    run = run_slice(family, tmp_path, splits)
    pair = load_pair(run["pair"]["pt"], run["pair"]["it"], **MODEL)
    tok = pair.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in family.specials}

    # pair_info: the real class and depth, and one stop set: both tokenizers' EOS and both
    # generation configs' stops, on PT and IT alike.
    stops = sorted({ids[t] for role in ("pt", "it") for t in (family.eos[role], *family.stops[role])})
    assert (run["info"]["architecture"], run["info"]["n_layers"]) == (family.architecture, twins.N_LAYERS)
    assert run["info"]["stop_ids"] == stops
    assert pair.pt.generation_config.eos_token_id == pair.it.generation_config.eos_token_id == stops
    assert (pair.pt.get_output_embeddings().weight is pair.pt.get_input_embeddings().weight) == family.tied
    softcap = getattr(pair.pt.config, "attn_logit_softcapping", None)
    if softcap is not None:  # sdpa would drop the attention soft-cap
        assert pair.pt.config._attn_implementation == "eager"

    # Teacher: the prefix is the template with the family's BOS once, or with no BOS at all.
    bos = [ids[family.bos]] if family.bos else []
    for split, path in run["teacher"].items():
        rows = read_rows(splits[split], path)
        for prompt, prefix in rows.select("prompt", "prefix_ids").iter_rows():
            assert prefix == bos + tok(render(prompt), add_special_tokens=False)["input_ids"]
        for answer, eos in rows.select("token_ids", "teacher_eos").iter_rows():
            assert eos == (answer[-1] in stops) and not set(answer[:-1]) & set(stops)
    teacher = pl.concat([pl.read_parquet(p) for p in run["teacher"].values()])
    # IT's known edit makes it end answers with the family's turn-end token, which PT's own
    # generation config may not name (Llama 3's <|eot_id|>, Gemma 2's <end_of_turn>).
    assert any(a[-1] == ids[family.turn_end] for a in teacher["token_ids"].to_list())

    # Caches: one row per answer-phase position m-1 .. m+n-2 of every teacher row, in order.
    train = pl.read_parquet(run["teacher"]["train"])
    h_pt, delta, index = load_split([run["shards"]["train"]], LAYERS[0])
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

    # FullDelta and PT records on test: every prompt, a KL to IT, and a zero-gate FullDelta is PT.
    test = pl.read_parquet(run["teacher"]["test"])
    for path in run["records"].values():
        records = pl.read_parquet(path)
        assert records["id"].to_list() == test["id"].to_list() and records["kl"].is_finite().all()
    from postdiff import variants as V

    zero_gate = Variant("zero", "full", {layer: 0.0 for layer in LAYERS}, dict(zip(LAYERS, run["surrogates"])))
    edits = V.edits(zero_gate, V.materialise(zero_gate)[0])
    rows = list(zip(test["prefix_ids"].to_list(), test["token_ids"].to_list()))
    plain, gated = dict(answer_logprobs(pair.pt, rows, 4)), dict(answer_logprobs(pair.pt, rows, 4, edits=edits))
    assert all(torch.equal(plain[i], gated[i]) for i in plain)
    prefixes = test["prefix_ids"].to_list()
    assert generate(pair.pt, tok, prefixes, MAX_NEW, 4, edits=edits) == generate(pair.pt, tok, prefixes, MAX_NEW, 4)

    # The lens: for a unit-RMS vector at the last block's output, its logits are the model's own
    # (final norm, unembedding and final soft-cap as the model applies them).
    lens = features.Lens.of(pair.it, len(tok))
    d = pair.it.config.hidden_size
    v = torch.randn(1, d, generator=torch.Generator().manual_seed(0))
    v = v / v.pow(2).mean().sqrt()
    last = twins.N_LAYERS - 1
    batch = torch.tensor([prefixes[0]])
    mask = torch.zeros_like(batch, dtype=torch.bool)
    mask[0, -1] = True
    with torch.no_grad(), intervene(pair.it, {last: LayerEdit(1.0, lambda h: v.to(h.dtype).expand_as(h) - h)}, mask):
        model_logits = pair.it(input_ids=batch).logits[0, -1, : len(tok)]
    (top,) = lens.top(v, 5)
    want = model_logits.topk(5)
    assert [t for t, _ in top["promoted"]] == want.indices.tolist()
    # rms_norm_eps (1e-6) in the model's norm, and fp32 rounding of h + (v - h): 1e-4 is ample.
    torch.testing.assert_close(torch.tensor([x for _, x in top["promoted"]]), want.values, rtol=1e-4, atol=1e-4)
    if family.layout.get("final_logit_softcapping"):
        assert lens.cap == family.layout["final_logit_softcapping"] and want.values.abs().max() < lens.cap
