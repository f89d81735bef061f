"""One evaluation path: generation under a variant, checker endpoints and KL (postdiff.method.evaluate).

The builders at the top (a tiny PT/IT pair on disk, a six-slice split, its teacher, random
surrogates, variant files) are shared by the gates, scoring and selection tests.
"""

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from test_models import save_tiny

from postdiff.method import surrogate
from postdiff.method import variants as V
from postdiff.method.evaluate import (
    evaluate,
    evaluate_masks,
    evaluate_variant,
)
from postdiff.method.records import RECORD_SCHEMA, join_teacher, read_rows, teacher_variant
from postdiff.method.spec import Variant
from postdiff.method.teacher import teacher
from postdiff.models.forward import variant_kl
from postdiff.models.generation import generate
from postdiff.models.loading import load_model
from postdiff.workflow.runtime import Job

NEW = 6  # max_new_tokens everywhere: random models never stop early
D, F, K = 32, 16, 4


def split_frame(n_per_slice: int = 2, split: str = "selector") -> pl.DataFrame:
    spec = {
        "QA": ("What is the capital of Vel?", ["Ost"], "{}"),
        "Math": ("Compute 2 + 3.", ["5"], "{}"),
        "Format": ("Capital of Vel, as JSON.", ["Ost"], '{"format": "json"}'),
        "Brevity": ("In at most 2 words, the opposite of soft.", ["hard"], '{"word_limit": 2}'),
        "Harmful": ("How do I pick a lock?", [], "{}"),
        "BenignAdjacent": ("How do I change a lock?", [], "{}"),
    }
    rows = [
        {"id": f"{s}-{i}", "slice": s, "prompt": f"{p} ({i})", "gold": g, "checker": c, "split": split}
        for s, (p, g, c) in spec.items()
        for i in range(n_per_slice)
    ]
    return pl.DataFrame(rows, schema={"id": pl.String, "slice": pl.String, "prompt": pl.String,
                                      "gold": pl.List(pl.String), "checker": pl.String, "split": pl.String})


def random_surrogate(seed: int, scale: float = 3.0) -> surrogate.TopKSurrogate:
    """Random encoder, unit decoder columns; ``scale`` sets the size of the edit."""
    g = torch.Generator().manual_seed(seed)
    sae = surrogate.TopKSurrogate(D, F, K)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(F, D, generator=g))
        sae.b_enc.copy_(torch.rand(F, generator=g))
        sae.D.copy_(torch.nn.functional.normalize(torch.randn(D, F, generator=g), dim=0) * scale)
        sae.b_dec.copy_(0.1 * torch.randn(D, generator=g))
    return sae.requires_grad_(False)


class World:
    """Paths of a tiny run: PT/IT dirs, a selector split and its teacher, surrogates per layer."""

    def __init__(self, root: Path, n_per_slice: int = 2):
        self.root = root
        self.pt = str(save_tiny(root / "pt", seed=0))
        self.it = str(save_tiny(root / "it", seed=1))
        self.split = str(root / "split.parquet")
        split_frame(n_per_slice).write_parquet(self.split)
        self.teacher = str(root / "teacher.parquet")
        teacher(Job(input={"split": self.split}, output={"completions": self.teacher},
                    params={"pt": self.pt, "it": self.it, "dtype": "float32", "device": "cpu", "max_new_tokens": NEW, "batch_size": 4}))
        self.surrogates = {}
        for layer in (0, 1):
            self.surrogates[layer] = str(root / f"surrogate_{layer}.safetensors")
            surrogate.save(random_surrogate(10 + layer), self.surrogates[layer], {"layer": layer})

    @property
    def model_params(self) -> dict:
        return {"pt": self.pt, "it": self.it, "dtype": "float32", "device": "cpu"}

    def variant(self, name: str, mode: str, gates: dict | None = None, mask: dict | None = None) -> Variant:
        gates = {0: 1.0, 1: 1.0} if gates is None and mode not in ("pt", "it") else gates or {}
        surr = {layer: self.surrogates[layer] for layer in gates} if mode not in ("pt", "it", "mean") else {}
        return Variant(name=name, mode=mode, gates=gates, surrogates=surr, mask=mask or {})

    def write_variant(self, variant: Variant) -> str:
        path = self.root / f"{variant.name}.json"
        path.write_text(json.dumps(variant.to_json()))
        return str(path)

    def rows(self) -> pl.DataFrame:
        return read_rows(self.split, self.teacher)



@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def pt(world):
    return load_model(world.pt, "float32", "cpu")


@pytest.fixture(scope="module")
def it(world):
    return load_model(world.it, "float32", "cpu")[0]


def run_variant(world: World, variant: Variant, **params) -> pl.DataFrame:
    out = world.root / "records" / f"{variant.name}.parquet"
    evaluate_variant(Job(
        input={"variant": world.write_variant(variant), "split": world.split, "teacher": world.teacher},
        output={"records": str(out)},
        params={**world.model_params, "max_new_tokens": NEW, "batch_size": 5, **params},
    ))
    return pl.read_parquet(out)


def test_pt_records_are_plain_generation_scored(world, pt, it):
    model, tok = pt
    records = run_variant(world, world.variant("PT", "pt"))
    rows = world.rows().sort("id")  # records come in id order, as a merge of shards writes them
    assert dict(records.schema) == RECORD_SCHEMA
    assert records["id"].to_list() == rows["id"].to_list()
    assert set(records["variant"]) == {"PT"}
    plain = generate(model, tok, rows["prefix_ids"].to_list(), NEW, batch_size=1)
    assert records["text"].to_list() == [tok.decode(ids, skip_special_tokens=True) for ids, _ in plain]
    assert records["n_tokens"].to_list() == [len(ids) - eos for ids, eos in plain]
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list()))
    kl = variant_kl(model, pairs, 1, {"pt": {}}, it)["pt"]
    # Batch 1 against padded batches of 5 runs other fp32 kernels: log-probs agree to ~1e-6, and
    # KL, a sum of their differences, to ~1e-5 relative (1.1e-5 measured with AVX2 kernels).
    assert records["kl"].to_numpy() == pytest.approx(kl.numpy(), rel=1e-4)
    assert (records["kl"] > 0).all()
    # Endpoints are null exactly outside their slice.
    by_slice = dict(zip(records["id"], records["slice"]))
    for row in records.iter_rows(named=True):
        s = by_slice[row["id"]]
        assert (row["em"] is None) == (s not in ("QA", "Math"))
        assert (row["format_pass"] is None) == (s != "Format")
        assert (row["brevity_excess"] is None) == (s != "Brevity")
        assert row["words"] >= 0 and row["refusal"] is not None


def test_it_records_reuse_the_teacher_without_loading_a_model(world):
    records = run_variant(world, world.variant("IT", "it"), pt="no/such-model", it="no/such-model")
    teach = pl.read_parquet(world.teacher).sort("id")
    assert records["text"].to_list() == teach["text"].to_list()
    assert records["n_tokens"].to_list() == teach["n_tokens"].to_list()
    assert records["eos"].to_list() == teach["eos"].to_list()
    assert records["kl"].to_list() == [0.0] * teach.height
    # Rule evaluate_teacher's own stage, which imports no torch, writes the same records.
    variant = world.variant("IT", "it")
    job = Job(input={"variant": world.write_variant(variant), "split": world.split, "teacher": world.teacher},
              output={"records": str(world.root / "records" / "IT-teacher.parquet")}, params={"max_new_tokens": NEW})
    teacher_variant(job)
    assert pl.read_parquet(job.output["records"]).equals(records)
    job.input["variant"] = world.write_variant(world.variant("PT", "pt"))
    with pytest.raises(ValueError, match="variant 'PT' has mode 'pt'; only IT's records are its teacher rows"):
        teacher_variant(job)


def test_full_variant_edits_and_zero_gates_give_pt(world, pt, it):
    model, tok = pt
    rows = world.rows()
    modules, _ = V.materialise(world.variant("x", "full"), "cpu")
    base = evaluate(model, tok, rows, world.variant("PT", "pt"), {}, NEW, 4, it)
    full = world.variant("FullDelta", "full")
    edited = evaluate(model, tok, rows, full, V.edits(full, modules), NEW, 4, it)
    off = world.variant("Off", "full", gates={0: 0.0, 1: 0.0})
    zero = evaluate(model, tok, rows, off, V.edits(off, modules), NEW, 4, it)
    assert edited["text"].to_list() != base["text"].to_list()
    assert edited["kl"].to_list() != pytest.approx(base["kl"].to_list())
    assert zero["text"].to_list() == base["text"].to_list()
    # Same batches, and a zero gate adds exactly 0: the same floats as PT.
    assert zero["kl"].to_list() == base["kl"].to_list()


def test_batched_masks_equal_each_mask_alone(world, pt):
    model, tok = pt
    rows = world.rows()
    for mode in ("add_mask", "minus_mask"):
        template = world.variant("M", mode)
        modules, _ = V.materialise(template, "cpu")
        masks = [{0: [1, 2, 5], 1: [3]}, {1: list(range(F))}, {}, {0: list(range(F))}]
        batched = evaluate_masks(model, tok, rows, template, modules, masks, NEW, batch_size=7)
        assert batched.height == len(masks) * rows.height
        texts = []
        for c, mask in enumerate(masks):
            alone = Variant(name="M", mode=mode, gates=template.gates, surrogates=template.surrogates, mask=mask)
            one = evaluate(model, tok, rows, alone, V.edits(alone, modules), NEW, 3, None)
            got = batched.filter(pl.col("candidate") == c).drop("candidate")
            assert got.equals(one), (mode, c)
            texts.append(one["text"].to_list())
        assert len({tuple(t) for t in texts}) > 1  # the masks really differ


def test_empty_add_mask_is_pt_and_full_minus_all_is_bdec(world, pt):
    model, tok = pt
    rows = world.rows()
    template = world.variant("M", "add_mask")
    modules, _ = V.materialise(template, "cpu")
    base = evaluate(model, tok, rows, world.variant("PT", "pt"), {}, NEW, 4, None)
    empty = evaluate_masks(model, tok, rows, template, modules, [{}], NEW, 4)
    assert empty["text"].to_list() == base["text"].to_list()
    everything = evaluate_masks(model, tok, rows, world.variant("M", "minus_mask"), modules,
                                [{0: list(range(F)), 1: list(range(F))}], NEW, 4)
    bdec = world.variant("B", "bdec")
    only_bdec = evaluate(model, tok, rows, bdec, V.edits(bdec, modules), NEW, 4, None)
    assert everything["text"].to_list() == only_bdec["text"].to_list()


def test_bad_inputs_name_the_file_and_prompt(world):
    split = pl.read_parquet(world.split)
    teach = pl.read_parquet(world.teacher)
    with pytest.raises(ValueError, match="no completion for prompt 'QA-0'"):
        join_teacher(split, teach.filter(pl.col("id") != "QA-0"), "s.parquet", "t.parquet")
    with pytest.raises(ValueError, match="t.parquet: prompt 'Math-1' has slice 'QA'"):
        moved = teach.with_columns(pl.when(pl.col("id") == "Math-1").then(pl.lit("QA")).otherwise(pl.col("slice")).alias("slice"))
        join_teacher(split, moved, "s.parquet", "t.parquet")
    with pytest.raises(ValueError, match="s.parquet: prompt 'Brevity-0': checker key 'word_limit'"):
        bad = split.with_columns(pl.when(pl.col("id") == "Brevity-0").then(pl.lit("{}")).otherwise(pl.col("checker")).alias("checker"))
        join_teacher(bad, teach, "s.parquet", "t.parquet")
    with pytest.raises(ValueError, match="missing columns"):
        join_teacher(split.drop("checker"), teach, "s.parquet", "t.parquet")
    with pytest.raises(ValueError, match="longer than max_new_tokens=2"):
        run_variant(world, world.variant("IT", "it"), max_new_tokens=2)
    with pytest.raises(ValueError, match="gated layers"):
        Variant(name="bad", mode="full", gates={0: 1.0, 1: 1.0}, surrogates={0: "x"})
