"""End-to-end: config/rehearsal.yaml, the real-pair path (Gemma3ForConditionalGeneration, bf16,
hub ids from a local Hugging Face cache, IT's <end_of_turn> stop) on the CPU.

It runs what the assertions read: PT's, IT's and FullDelta's test records, the pair's gap and the
R^2 table, with every job they need (25 of the config's 77: the pair's facts, the teacher and the
caches of every split, the surrogates and their metrics, FullDelta's gates). What it leaves out
is checked elsewhere: on this twin in bf16, selection's verification and the masks' records
(tests/test_selection.py, ``twin_selection``) and the exports' hook points (tests/test_export.py);
every other job of the workflow on the tiny config (tests/test_workflow.py). The README gives the
whole rehearsal run's Table 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml
from safetensors import safe_open
from test_plan import assert_plan_matches_run
from workflow_utils import copy_workflow, snakemake

from postdiff.method import variants as V
from postdiff.method.evaluate import answer_kl
from postdiff.method.records import read_rows
from postdiff.method.spec import Variant
from postdiff.models.forward import reference_logprobs
from postdiff.models.loading import load_model
from postdiff.models.rehearsal import REPO_IDS
from postdiff.stats import metrics
from postdiff.stats.tables import table1_frame

pytestmark = pytest.mark.slow
CONFIG = "config/rehearsal.yaml"
RUN = "results/rehearsal"
VARIANTS = ("PT", "IT", "FullDelta")
EVALS = {"PT": f"{RUN}/eval/test/PT.parquet", "IT": f"{RUN}/eval/test/IT.parquet",
         "FullDelta": f"{RUN}/seed0/eval/test/FullDelta.parquet"}
TARGETS = (*EVALS.values(), f"{RUN}/pair_gap.json", f"{RUN}/seed0/tables/r2.csv")


# FullDelta's gates from the grid search alone: Powell's refinement measured three of every four
# gate vectors (78 of 102), while no assertion here reads the gates beyond FullDelta's records;
# refinement runs on the default and tiny configs.
GRID_GATES = {"gates": {"refine": False}}


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("rehearsal"))
    (workdir / "config/grid_gates.yaml").write_text(yaml.safe_dump(GRID_GATES))
    snakemake(workdir, *TARGETS, configfile=[CONFIG, "config/grid_gates.yaml"])
    return workdir


def _snapshot(workdir: Path, role: str) -> Path:
    repo = workdir / "workflow/resources/hf_home/hub" / f"models--{REPO_IDS[role].replace('/', '--')}"
    return repo / "snapshots" / (repo / "refs/main").read_text()


def test_table1_and_a_real_gap(rehearsal: Path) -> None:
    """Table 1's rows of PT, IT and FullDelta, as the table1 job computes them."""
    run = rehearsal / RUN
    table1 = table1_frame(metrics.align(metrics.read_eval([rehearsal / EVALS[v] for v in VARIANTS])))
    assert table1["Variant"].to_list() == list(VARIANTS)
    row = {v: r for v, r in zip(table1["Variant"], table1.iter_rows(named=True))}
    gap = json.loads((run / "pair_gap.json").read_text())
    assert gap["cap_it"] - gap["cap_pt"] >= 0.2
    assert math.isfinite(row["FullDelta"]["CapRec"])
    assert row["PT"]["KL"] > 0
    assert set(gap["teacher_truncated"]) == {"train", "calib", "selector", "test"}
    info = json.loads((run / "pair/info.json").read_text())
    assert info["architecture"] == "Gemma3ForConditionalGeneration"
    assert info["fingerprints"]["it"] == f"{REPO_IDS['it']}@{_snapshot(rehearsal, 'it').name}"


def test_it_and_steered_pt_stop_on_end_of_turn(rehearsal: Path) -> None:
    info = json.loads((rehearsal / RUN / "pair/info.json").read_text())
    end_of_turn = info["stop_ids"][-1]
    assert info["stop_ids"] == [1, end_of_turn] and end_of_turn > 1
    teacher = pl.read_parquet(rehearsal / RUN / "teacher/test.parquet")
    stopped = teacher.filter(pl.col("eos"))
    assert stopped.height > 0.9 * teacher.height
    assert {ids[-1] for ids in stopped["token_ids"]} == {end_of_turn}  # the twin's IT ends turns as Gemma IT does
    # PT's own generation config stops on <eos> alone: FullDelta stops at all only through the shared stop set.
    full = pl.read_parquet(rehearsal / EVALS["FullDelta"])
    assert full["eos"].any()
    assert (full.filter(pl.col("eos"))["n_tokens"] < 32).all()


def test_it_to_itself_through_the_hooked_bf16_forward(rehearsal: Path) -> None:
    """KL(IT || IT) measured, not assumed: IT under FullDelta's hook at zero gates, in bf16,
    against IT's own log-probs computed in other batches."""
    it, _ = load_model(str(_snapshot(rehearsal, "it")), "bfloat16", "cpu")
    assert next(it.parameters()).dtype == torch.bfloat16
    run = rehearsal / RUN
    rows = read_rows(str(run / "suite/test.parquet"), str(run / "teacher/test.parquet"))
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    full = Variant.read(str(run / "seed0/variants/FullDelta.json"))
    full = replace(full, surrogates={layer: str(rehearsal / path) for layer, path in full.surrogates.items()})
    modules, _ = V.materialise(full)
    edits = V.edits(replace(full, gates={layer: 0.0 for layer in full.gates}), modules)
    assert edits, "the hook must be installed for this to measure anything"
    reference = reference_logprobs(it, pairs, batch_size=7)
    kl = answer_kl(it, rows, edits, 64, reference)
    assert len(kl) == rows.height and 0 <= max(kl) <= 1e-3


def test_caches_are_bf16_and_surrogates_fp32(rehearsal: Path) -> None:
    run = rehearsal / RUN
    for shard in (run / "cache").rglob("*.safetensors"):
        if shard.name == "standardiser.safetensors":
            continue
        with safe_open(str(shard), framework="pt") as f:
            assert f.metadata()["dtype"] == "bfloat16"
            assert str(f.get_slice("delta.1").get_dtype()) == "BF16"
    for layer in (1, 2):
        with safe_open(str(run / f"seed0/surrogate/L{layer}.safetensors"), framework="pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F32"}  # noqa: SIM118
        log = (run / f"logs/seed0/surrogate/L{layer}.log").read_text()
        assert "trains in torch.float32 on cache torch.bfloat16" in log


def test_the_cost_preview_matches_the_run(rehearsal: Path) -> None:
    assert_plan_matches_run(rehearsal, CONFIG, test_variants=("PT", "FullDelta"))
