"""End-to-end: the positive control (``config/control.yaml``), as shipped, on surrogate seed 0.

The pair's change is known: one planted neuron carries capability (it stops QA, Math and Format
answers), another, writing outside its direction, carries brevity on Brevity prompts, and five
decoys fire on one fact kind's answers each and cause nothing. Where the default pair's
capability null holds, selection finds the planted capability here, judged from an interval,
not a point value; a null next to this is a null of separation, not of power. Every feature is a
candidate, so the intervention step, not the score order, picks the mask. Only the locked
CapMask's selection, stopped at one feature, and the test records the assertions read are run
(no VMask, no other sweep point): the README gives the whole run's tables over three seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from workflow_utils import copy_workflow, snakemake

from postdiff.method import surrogate
from postdiff.method.cache import load_split
from postdiff.method.selection.maskfile import forced
from postdiff.models.toy.settings import PLANT_FILE
from postdiff.outputs.claims import CLAIMS, comparison_claims
from postdiff.outputs.planted import (
    alignment,
    feature_mass,
    firing_overlap,
    norm_in_span,
    planted_directions,
)
from postdiff.stats import metrics

pytestmark = pytest.mark.slow
RUN = "results/control"


VARIANTS = ("PT", "IT", "FullDelta", "CapMask", "RandomMask", "ActivationMassMask")
ACTIVITY = f"{RUN}/tables/plant_activity.csv"


def evals(variant: str) -> str:
    return f"{RUN}/eval/test/{variant}.parquet" if variant in ("PT", "IT") else f"{RUN}/seed0/eval/test/{variant}.parquet"


@pytest.fixture(scope="module")
def control_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("control_run"))
    # One step of five: step 1 is what the assertions are about, and each step verifies 128
    # candidates (about half a minute of the test's CPU each).
    overlay = {"surrogate": {"seeds": [0]}, "selection": {"size_cap": 1}}
    (workdir / "config/one_seed.yaml").write_text(yaml.safe_dump(overlay))
    snakemake(workdir, *map(evals, VARIANTS), ACTIVITY, configfile=["config/config.yaml", "config/control.yaml", "config/one_seed.yaml"])
    return workdir


def arrays(workdir: Path) -> metrics.PromptArrays:
    return metrics.align(metrics.read_eval([workdir / evals(v) for v in VARIANTS]))


def locked_point(workdir: Path) -> Path:
    cfg = yaml.safe_load((workdir / "config/control.yaml").read_text())["selection"]
    return workdir / f"{RUN}/seed0/sweep/verb_exclusion={float(cfg['verb_exclusion'])}/cap_cutoff={float(cfg['cap_cutoff'])}"


def cap_mask(workdir: Path) -> dict:
    return json.loads((locked_point(workdir) / "cap_mask.json").read_text())


def test_forward_selection_takes_a_planted_feature_by_its_gain(control_run: Path) -> None:
    """Step 1 passes on the judge half, so the mask is selected, not its pool's top by score
    (replacing forward selection by the score order makes this fail), and the feature it took
    sits on the capability neurons' span, not the brevity neurons', and fires where they fire."""
    mask = cap_mask(control_run)
    first = mask["step_gains"][0]
    assert first["passed"] and first["lo"] <= first["gain"] and first["choose_gain"] > 0, first
    assert not forced(mask) and mask["passed_order"][0] == mask["order"][0]
    # The pool is in score order. On seed 0 its top feature is a weaker capability latent (3):
    # step 1 measured it (+0.094 on the choose half) and took the largest gain, 19's (+0.125).
    # A mask in score order would start with 3.
    first_step = pl.read_parquet(locked_point(control_run) / "steps.parquet").filter(pl.col("step") == 1)
    gain = {(layer, feature): g for layer, feature, g in first_step.select("layer", "feature", "gain").iter_rows()}
    top, chosen = tuple(mask["pool"][0]), tuple(mask["order"][0])
    assert top != chosen and gain[top] < gain[chosen] == max(gain.values()), (top, chosen, gain)
    layer, feature = mask["order"][0]
    module = surrogate.load(control_run / f"{RUN}/seed0/surrogate/L{layer}.safetensors")[0]
    planted = planted_directions(json.loads((control_run / f"{RUN}/pair/it/{PLANT_FILE}").read_text()))
    span = {group: float(alignment(module.D.detach()[:, [feature]], directions)[1][0])
            for group, (_, directions) in planted.items()}
    assert span["cap"] > 0.9 and span["verb"] < 0.3, span
    # ... and it fires where that neuron does: 99.7% of its activation mass on the train split (the
    # one cache this run builds).
    h_pt, delta, _ = load_split(sorted((control_run / f"{RUN}/cache/train").glob("*.safetensors")), layer)
    mass = feature_mass(module, h_pt)[:, [feature]]
    on_group = {group: float(firing_overlap(mass, norm_in_span(delta, directions))[0][0])
                for group, (_, directions) in planted.items()}
    assert on_group["cap"] > 0.9 and on_group["verb"] < 0.1, on_group


def test_the_capability_null_fails_on_the_control(control_run: Path) -> None:
    """The paper's claim "a frozen capability mask recovers no capability" as the claims table
    judges it: here the interval of CapMask - PT on Cap is clear of 0."""
    null = next(c for c in CLAIMS if c.label == "CapMask vs PT")
    table = comparison_claims(arrays(control_run), {"pt": "PT", "cap": "CapMask"},
                              {"cap": cap_mask(control_run)}, B=2000, seed=0, level=0.95)
    row = table.filter(pl.col("claim") == null.paper).row(0, named=True)
    assert row["lo"] > 0 and row["verdict"] == "fails", row


def test_capmask_recovers_half_of_fulldelta_and_neither_baseline_does(control_run: Path) -> None:
    """Random features and the most massive ones, as many as CapMask holds, recover under half:
    on seed 0 five decoys' latents outweigh the brevity neuron's (6th by mass) and the capability
    neuron's (19, 9th)."""
    rec = {v: m["CapRec"] for v, m in metrics.summary(arrays(control_run)).items()}
    assert rec["FullDelta"] > 0.5, rec
    assert rec["CapMask"] >= 0.5 * rec["FullDelta"], rec
    assert rec["RandomMask"] < 0.5 * rec["FullDelta"], rec
    assert rec["ActivationMassMask"] < 0.5 * rec["FullDelta"], rec


def test_plant_activity_covers_every_answer_position_and_the_capability_stops(control_run: Path) -> None:
    """The planted neurons read in IT's own answers: one row per slice, position kind and
    neuron, every selector answer position counted once per neuron, and the capability neuron
    firing at the stops of QA, Math and Format answers far above the answers' other positions."""
    table = pl.read_csv(control_run / ACTIVITY)
    teacher = pl.read_parquet(control_run / f"{RUN}/teacher/selector.parquet")
    plant = json.loads((control_run / f"{RUN}/pair/it/{PLANT_FILE}").read_text())
    n_neurons = sum(len(g["directions"]) for g in plant["groups"].values())
    counted = table.group_by("group", "neuron").agg(pl.col("n_positions").sum())
    assert counted.height == n_neurons and (counted["n_positions"] == teacher["token_ids"].list.len().sum()).all()
    cap = table.filter((pl.col("group") == "cap") & pl.col("slice").is_in(["QA", "Math", "Format"]))
    by = {(r["slice"], r["position"]): r["mean_output"] for r in cap.iter_rows(named=True)}
    for name in ("QA", "Math", "Format"):
        # Math, the closest: 20.6 against 6.8 (80 answer positions of 40 two-token answers, the
        # first of each, where it also fires; with one answer of 24 tokens among them it was 3.8).
        assert by[(name, "stop")] > 2.5 * by[(name, "answer")], (name, by)
