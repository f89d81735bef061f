"""Forward selection of CapMask / VMask, baseline masks and the sweep summary (postdiff.method.selection)."""

import json
import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from test_evaluate import NEW, F, World, split_frame

from postdiff.method import surrogate
from postdiff.method import variants as V
from postdiff.method.evaluate import evaluate, evaluate_masks, silent_features, tile_masks, verify_masks
from postdiff.method.records import read_rows, teacher_records
from postdiff.method.selection.baselines import baseline_masks, mass_mask, random_mask, score_mask
from postdiff.method.selection.jobs import (
    STEP_RECORD_SCHEMA,
    halves,
    select,
    select_finish,
    select_shard,
    select_step,
)
from postdiff.method.selection.maskfile import forced, layer_mask
from postdiff.method.selection.search import (
    RULES,
    STEP_SCHEMA,
    State,
    advance,
    candidates,
    forward_select,
    gain_interval,
    gain_rule,
    passed_prefix,
    selector_metrics,
    shard_candidates,
    start,
    step_gains,
)
from postdiff.method.selection.sweep import jaccard, pool_owner, sweep_summary, sweep_table
from postdiff.method.spec import Variant
from postdiff.method.teacher import teacher
from postdiff.models.forward import grouped_batches
from postdiff.models.generation import generate, verify_then_generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import load_model
from postdiff.stats import metrics
from postdiff.workflow.runtime import Job

A, B, C, D = (0, 1), (0, 2), (1, 5), (1, 6)


def additive(gains, interaction=None):
    """Objective of a mask: sum of per-feature gains plus pairwise interactions; counts calls."""
    calls = []

    def objective(masks):
        calls.append(list(masks))
        out = []
        for m in masks:
            value = sum(gains[f] for f in m)
            for (x, y), bonus in (interaction or {}).items():
                value += bonus if x in m and y in m else 0.0
            out.append(value)
        return out

    return objective, calls


def test_forward_selection_known_answer_order_and_stop():
    objective, calls = additive({A: 1.0, B: 3.0, C: 2.0, D: -1.0}, {(B, A): -5.0})
    mask, value, steps = forward_select([A, B, C, D], objective, base=0.0, size_cap=5)
    # B first (3), then C (5); A would add 1 but clashes with B (-4): stop, D only hurts.
    assert mask == (B, C) and value == 5.0
    assert dict(steps.schema) == STEP_SCHEMA
    assert steps["step"].to_list() == [1] * 4 + [2] * 3 + [3] * 2
    assert steps.filter("chosen").select("layer", "feature").rows() == [B, C]
    assert steps.filter("chosen")["passed"].all() and steps.filter("passed")["chosen"].all()
    # One batched call per step, the incumbent first.
    assert [len(batch) for batch in calls] == [5, 4, 3]
    assert calls[1] == [(B,), (B, A), (B, C), (B, D)]
    step3 = steps.filter(pl.col("step") == 3)
    assert dict(zip(step3["feature"], step3["objective"])) == {1: 1.0, 6: 4.0}  # both below 5: stop
    assert dict(zip(step3["feature"], step3["gain"])) == {1: -4.0, 6: -1.0}


def test_min_gain_requires_a_margin_per_step():
    objective, _ = additive({A: 1.0, B: 3.0, C: 2.0, D: -1.0}, {(B, A): -5.0})
    # B adds 3 (> 2.5); C would add 2 (not > 2.5): stop after one step.
    mask, value, steps = forward_select([A, B, C, D], objective, base=0.0, size_cap=5, accept=gain_rule(2.5))
    assert mask == (B,) and value == 3.0 and steps["step"].max() == 2
    # A gain equal to the margin is not enough; with no margin the same step is taken.
    assert forward_select([B], objective, base=0.0, size_cap=5, accept=gain_rule(3.0))[0] == ()
    assert forward_select([B], objective, base=0.0, size_cap=5, accept=gain_rule(0.0))[0] == (B,)


def test_fill_to_cap_takes_the_best_candidate_without_a_gain_and_records_it():
    objective, _ = additive({A: -1.0, B: -3.0, C: -2.0, D: 0.5})
    mask, value, steps = forward_select([A, B, C, D], objective, base=0.0, size_cap=3, fill_to_cap=True)
    # D gains (passes); then every candidate loses: the least bad fills the cap, not passing.
    assert mask == (D, A, C) and value == pytest.approx(-2.5)
    chosen = steps.filter("chosen")
    assert chosen["passed"].to_list() == [True, False, False]
    assert chosen["gain"].to_list() == pytest.approx([0.5, -1.0, -2.0])
    # Without it, the same pool stops after the one step that gains.
    assert forward_select([A, B, C, D], objective, base=0.0, size_cap=3)[0] == (D,)
    # An accept rule sees the step, the candidate and its gain.
    seen = []
    forward_select([A, D], objective, base=0.0, size_cap=2, accept=lambda *a: seen.append(a) or True)
    assert seen == [(1, D, 0.5), (2, A, -1.0)]


def test_the_passed_prefix_ends_at_the_first_failed_step():
    """A step that passes after a failed one is not in the passed prefix."""
    assert [passed_prefix(flags) for flags in ([], [True, True], [True, False, True], [False, True])] == [0, 2, 1, 0]


def test_gain_interval_known_answers():
    """A step that changes nothing gains exactly 0 in every resample; a step to IT-like records
    gains what the objectives say, with an interval around it; step_gains reads the roles."""
    frames = metrics.synthetic_records({"PT": 0.0, "IT": 1.0, "half": 0.5}, n_per_slice=30)
    refs = {"pt": frames["PT"], "it": frames["IT"]}
    point = metrics.summary(metrics.align({k: v.with_columns(pl.col("kl").fill_null(0.0)) for k, v in frames.items()}))
    same = gain_interval(RULES["cap"], 0.5, refs, frames["PT"], frames["PT"], B=200, seed=0, level=0.95)
    assert same == {"objective": pytest.approx(point["PT"]["Cap"]), "gain": 0.0, "lo": 0.0, "hi": 0.0}
    half = gain_interval(RULES["cap"], 0.5, refs, frames["PT"], frames["half"], B=200, seed=0, level=0.95)
    assert half["gain"] == pytest.approx(point["half"]["Cap"] - 0.5 * point["half"]["VerbCarry"] - point["PT"]["Cap"])
    assert half["lo"] < half["gain"] < half["hi"]
    records = pl.concat([f.with_columns(pl.lit(t, dtype=pl.Int64).alias("step"), pl.lit(role).alias("role"))
                         .select(list(STEP_RECORD_SCHEMA))
                         for t, pair in ((1, ("PT", "half")), (2, ("half", "IT")))
                         for role, f in zip(("incumbent", "chosen"), (frames[v] for v in pair))])
    two = step_gains(RULES["cap"], 0.5, refs, records, B=200, seed=0, level=0.95)
    assert [g["step"] for g in two] == [1, 2] and two[0] == {"step": 1, **half}
    assert two[1]["objective"] == pytest.approx(point["IT"]["Cap"] - 0.5)
    assert step_gains(RULES["cap"], 0.5, refs, records.clear(), B=10, seed=0, level=0.95) == []


def test_size_cap_base_ties_and_nan():
    objective, _ = additive({A: 1.0, B: 1.0, C: 1.0, D: 1.0})
    mask, value, _ = forward_select([C, A, B, D], objective, base=0.0, size_cap=2)
    assert mask == (C, A) and value == 2.0  # ties keep the pool order
    # The base is the reference objective, reported while nothing is taken; gains are measured
    # against the incumbent of each call (here the empty mask scores 0, so A and B gain 1).
    mask, value, steps = forward_select([A, B], objective, base=5.0, size_cap=3)
    assert mask == (A, B) and value == 2.0
    worse, _ = additive({A: -1.0, B: -2.0})
    mask, value, steps = forward_select([A, B], worse, base=5.0, size_cap=3)
    assert mask == () and value == 5.0 and not steps["chosen"].any()
    nan_first = lambda masks: [math.nan if A in m else 0.5 if m else 0.0 for m in masks]  # noqa: E731
    mask, _, _ = forward_select([A, B], nan_first, base=0.0, size_cap=1)
    assert mask == (B,)
    # An undefined incumbent (NaN: no reference gap) is improved on by any finite objective.
    undefined = lambda masks: [math.nan if not m else -1.0 for m in masks]  # noqa: E731
    mask, _, _ = forward_select([A], undefined, base=math.nan, size_cap=1)
    assert mask == (A,)
    assert forward_select([], objective, 0.0, 5)[0] == ()


def test_a_gain_of_float_rounding_is_no_gain():
    """Masks whose per-prompt changes cancel (a QA answer gained, a Format answer lost) have the
    objective of the incumbent, summed in another order: (0.1 + 0.2) - 0.3 is 5.6e-17, not 0.
    That noise must neither break the score-order tie nor pass a step (on the embedded pair a
    gain of 2.8e-17 did both, and the mask was no longer flagged forced)."""
    state, rows = advance(start([A, B], 0.3, 2), [A, B], [0.3, 0.1 + 0.2], [0.3, 0.3], 2, gain_rule(),
                          fill_to_cap=True)
    assert state.chosen == (A,) and rows["gain"].to_list() == [0.0, 0.0] and not rows["passed"].any()


def scores_frame():
    return pl.DataFrame({
        "layer": [0, 0, 0, 1, 1, 1],
        "feature": [0, 1, 2, 0, 1, 2],
        "cap_score": [2.0, 1.6, 0.2, 3.0, 1.6, -1.0],
        "verb_score": [0.0, 2.0, 1.8, 0.5, -0.3, 2.5],
        "activation_mass": [0.1, 0.9, 0.5, 0.3, 0.3, 0.0],
    })


def test_candidates_respect_cutoff_exclusion_cap_and_order():
    s = scores_frame()
    assert candidates(s, RULES["cap"], 1.5, 1.0, None) == [(1, 0), (0, 0), (1, 1)]
    assert candidates(s, RULES["cap"], 1.5, 1.0, 2) == [(1, 0), (0, 0)]
    assert candidates(s, RULES["cap"], 1.5, 5.0, None) == [(1, 0), (0, 0), (0, 1), (1, 1)]
    assert candidates(s, RULES["vmask"], 1.8, None, None) == [(1, 2), (0, 1), (0, 2)]
    assert layer_mask([(1, 5), (0, 3), (1, 2)]) == {0: [3], 1: [2, 5]}


def test_baselines_match_sizes_and_are_seeded():
    sizes, n = {0: 2, 1: 1}, {0: 3, 1: 3}
    r = random_mask(sizes, n, seed=3)
    assert {k: len(v) for k, v in r.items()} == sizes and r == random_mask(sizes, n, seed=3)
    assert all(0 <= j < 3 for v in r.values() for j in v)
    assert {str(random_mask({0: 3}, {0: 50}, s)) for s in range(5)} != {str(random_mask({0: 3}, {0: 50}, 0))}
    assert mass_mask(sizes, scores_frame()) == {0: [1, 2], 1: [0]}  # tie at layer 1 -> lower id
    with pytest.raises(ValueError, match="cannot draw 4 of 3"):
        random_mask({0: 4}, {0: 3}, 0)


def test_sweep_points_with_one_pool_have_one_owner():
    """The owner of a point's pool is the first listed point with that pool (the locked point
    comes first), whatever point asks; a point nobody shares owns its pool."""
    s = scores_frame()
    locked, grid, strict = ("1.0", "1.5"), [("1.0", "1.0"), ("1.0", "1.8"), ("1.0", "2.5")], ("0.0", "1.5")
    points = [locked, *grid, strict]
    # No score lies in [1.0, 1.5): cutoff 1.0 admits the locked pool; 1.8 drops (1, 1).
    owners = {p: pool_owner(s, points, p, None) for p in points}
    assert owners == {locked: locked, grid[0]: locked, grid[1]: grid[1], grid[2]: grid[2], strict: strict}
    # With a cap of 2, 1.8's pool is the locked one too; the strict one keeps its own.
    owners = {p: pool_owner(s, points, p, 2) for p in points}
    assert owners == {locked: locked, grid[0]: locked, grid[1]: locked, grid[2]: grid[2], strict: strict}
    # Owners own themselves, so no owner reads another point's selection.
    assert all(pool_owner(s, points, o, 2) == o for o in owners.values())
    # A point outside the list reads a listed owner; a point added before the locked one does not move it.
    assert pool_owner(s, points, ("1.0", "1.2"), None) == locked
    assert pool_owner(s, [locked, ("1.0", "1.2"), *grid], grid[0], None) == locked


@pytest.mark.parametrize("n_shards", [1, 2, 3, 7])
def test_sharded_steps_equal_one_loop(n_shards):
    """Cutting each step's candidates into shards, evaluated in any order, then merged, gives
    the same masks, objectives and step rows as the one-job loop, ties included."""
    gains = {A: 1.0, B: 3.0, C: 3.0, D: -1.0, (2, 0): float("nan")}
    pool = [D, A, B, C, (2, 0)]
    objective, _ = additive(gains, {(B, A): -5.0})
    for size_cap in (0, 1, 2, 5):
        expected = forward_select(pool, objective, base=0.5, size_cap=size_cap)
        state, steps = start(pool, 0.5, size_cap), []
        for _ in range(size_cap):
            tried = [c for s in reversed(range(n_shards)) for c in shard_candidates(state, s, n_shards)]
            assert sorted(tried) == (sorted(state.remaining) if not state.stopped else [])
            state = State.from_json(json.loads(json.dumps(state.to_json())))
            incumbent = objective([state.chosen])[0] if tried else math.nan
            state, rows = advance(state, tried, objective([state.chosen + (c,) for c in tried]),
                                  [incumbent] * len(tried), size_cap)
            steps.append(rows)
        assert state.stopped
        assert (state.chosen, state.objective) == expected[:2]
        assert pl.concat([pl.DataFrame(schema=STEP_SCHEMA), *steps]).equals(expected[2])
    assert expected[0] == (B, C)  # B and C tie at 3: the earlier in the pool wins
    with pytest.raises(ValueError, match="not the remaining pool"):
        advance(start(pool, 0.0, 2), [A, B], [1.0, 2.0], [0.0, 0.0], 2)


def test_baseline_and_sweep_stages(tmp_path):
    scores_frame().write_parquet(tmp_path / "scores.parquet")
    locked = {"rule": "cap", "mask": {"1": [0], "0": [0]}, "objective": 0.3, "cutoff": 1.5, "exclusion": 1.0,
              "pool": [[1, 0], [0, 0], [1, 1]], "n_admitted": 3, "cap_bound": False}
    (tmp_path / "cap.json").write_text(json.dumps(locked))
    baseline_masks(Job(input={"cap_mask": str(tmp_path / "cap.json"), "scores": str(tmp_path / "scores.parquet")},
                       output={"random": str(tmp_path / "r.json"), "mass": str(tmp_path / "m.json"),
                               "score": str(tmp_path / "s.json")},
                       params={"seed": 1}))
    assert json.loads((tmp_path / "m.json").read_text())["mask"] == {"0": [1], "1": [0]}
    assert json.loads((tmp_path / "s.json").read_text())["mask"] == {"0": [0], "1": [0]}
    # Without forward selection: the pool's first n, whatever the selection chose.
    assert score_mask([[1, 1], [0, 3], [1, 0]], 2) == {0: [3], 1: [1]}
    assert {k: len(v) for k, v in json.loads((tmp_path / "r.json").read_text())["mask"].items()} == {"0": 1, "1": 1}
    # The strict point's pool is the locked one in another score order: its mask is not its top.
    points = [(1.0, 1.0, {"0": [0], "1": [0]}, 0.3, [[1, 0], [0, 0], [1, 1]], 5, [False, False]),
              (2.0, 1.0, {"1": [0], "0": [0]}, 0.3, [[1, 0], [0, 0]], 2, [True, False]),
              (2.5, 1.0, {"1": [0]}, 0.2, [[1, 0]], 1, [False]),
              (1.5, 1.0, {"0": [0], "1": [0], "2": []}, 0.3, [[1, 0], [0, 0], [1, 1]], 3, [False, False]),
              (1.5, 0.0, {"1": [0]}, 0.1, [[0, 0], [1, 0], [1, 1]], 4, [False])]
    paths = []
    for i, (cutoff, exclusion, mask, obj, pool, n_admitted, passed) in enumerate(points):
        paths.append(str(tmp_path / f"sweep{i}.json"))
        (tmp_path / f"sweep{i}.json").write_text(json.dumps(
            {**locked, "cutoff": cutoff, "exclusion": exclusion, "mask": mask, "objective": obj, "pool": pool,
             "n_admitted": n_admitted, "cap_bound": n_admitted > len(pool), "step_gains": gains(*passed)}))
    sweep_summary(Job(input={"masks": paths, "locked": str(tmp_path / "cap.json")},
                      output={"summary": str(tmp_path / "sweep.parquet"), "csv": str(tmp_path / "sweep.csv")}))
    table = pl.read_parquet(tmp_path / "sweep.parquet")
    # The locked exclusion's cutoffs first, then the strict exclusion's point.
    assert table["cutoff"].to_list() == [1.0, 1.5, 2.0, 2.5, 1.5]
    assert table["strict"].to_list() == [False] * 4 + [True]
    assert table["same_as_locked"].to_list() == [True, True, True, False, False]
    assert table["n_features"].to_list() == [2, 2, 2, 1, 1]
    assert table["n_admitted"].to_list() == [5, 3, 2, 1, 4] and table["n_pool"].to_list() == [3, 3, 2, 1, 3]
    assert table["cap_bound"].to_list() == [True, False, False, False, True]
    assert table["pool_jaccard"].to_list() == pytest.approx([1.0, 1.0, 2 / 3, 1 / 3, 1.0])
    assert table["mask_jaccard"].to_list() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5])
    assert table["forced"].to_list() == [True, True, False, True, False]
    assert table["pools_differ"].all()
    assert pl.read_csv(tmp_path / "sweep.csv").height == 5


def gains(*passed: bool, chose: bool | None = None) -> list[dict]:
    """A mask file's ``step_gains``, one per taken step, with whether it passed; the half that
    chose each step saw the same gain unless ``chose`` says otherwise."""
    return [{"step": i + 1, "gain": 0.01 if p else 0.0, "passed": p,
             "choose_gain": 0.01 if (p if chose is None else chose) else 0.0} for i, p in enumerate(passed)]


def test_a_mask_is_forced_when_no_step_was_taken_for_a_gain_and_it_is_its_pools_top():
    pool = [[1, 4], [0, 2], [1, 0], [0, 7]]
    filled = {"mask": {"0": [2], "1": [4]}, "pool": pool, "step_gains": gains(False, False)}
    assert forced(filled)
    # One step gained and passed: selection chose at least that feature.
    assert not forced({**filled, "step_gains": gains(True, False)})
    # Taken at a tie on the choosing half, a step that happens to gain on the judge half was
    # still not chosen for its gain (the embedded pair's seed 1, step 5); and a step chosen for a
    # gain that the judge half does not confirm was chosen all the same.
    assert forced({**filled, "step_gains": gains(False, True, chose=False)})
    assert not forced({**filled, "step_gains": gains(False, False, chose=True)})
    # No step passed, yet the mask is not the top two by score: the gains ordered it.
    assert not forced({**filled, "mask": {"0": [2, 7]}})
    assert not forced({"mask": {}, "pool": pool, "step_gains": []})
    with pytest.raises(ValueError, match="1 step gains for 2 features"):
        forced({**filled, "step_gains": gains(False)})


def summarise(objs: list[dict], tmp_path: Path) -> None:
    """The sweep summary stage on mask files of ``objs``, the second one locked."""
    paths = []
    for i, obj in enumerate(objs):
        paths.append(str(tmp_path / f"m{i}.json"))
        (tmp_path / f"m{i}.json").write_text(json.dumps(obj))
    sweep_summary(Job(input={"masks": paths, "locked": paths[1]}, output={"summary": str(tmp_path / "s.parquet")}))


def test_a_strict_point_with_another_pool_does_not_make_pools_differ(tmp_path, caplog):
    """Three cutoffs under the locked exclusion share one pool, every mask forced; the strict
    exclusion's pool differs. The summary and the log say the sweep had no power."""
    pool = [[0, 3], [1, 1], [0, 5]]
    objs = [{"rule": "cap", "cutoff": c, "exclusion": 1.0, "mask": {"0": [3], "1": [1]}, "objective": 0.0,
             "pool": pool, "n_admitted": 3, "cap_bound": False, "step_gains": gains(False, False)}
            for c in (4.0, 5.0, 6.0)]
    objs.append({**objs[1], "exclusion": 0.0, "pool": pool[1:], "mask": {"0": [5], "1": [1]}})
    table = sweep_table(objs, objs[1])
    assert table["strict"].to_list() == [False, False, False, True]
    assert table["n_pool"].to_list() == [3, 3, 3, 2] and not table["pools_differ"].any()
    assert table["forced"].all()
    with caplog.at_level("WARNING"):
        summarise(objs, tmp_path)
    assert "cannot tell its cutoffs apart (pool of 3" in caplog.text
    assert "every locked-exclusion sweep point is forced" in caplog.text and "top 2 by score" in caplog.text
    # With a locked-exclusion point of another pool, the pools differ; no sweep without the locked exclusion.
    assert sweep_table([*objs, {**objs[0], "cutoff": 7.0, "pool": pool[:2]}], objs[1])["pools_differ"].all()
    with pytest.raises(ValueError, match="no point has the locked mask's exclusion 1.0"):
        sweep_table(objs[3:], objs[1])


def test_a_sweep_whose_cap_always_binds_says_it_cannot_tell_the_cutoffs_apart(tmp_path, caplog):
    """Every cutoff admits more than the cap: every pool is the same top of the ranking, every
    mask is the locked one, and the summary says the sweep had no power."""
    scores = pl.DataFrame({"layer": [0] * 40, "feature": list(range(40)), "cap_score": np.linspace(4, 0, 40),
                           "verb_score": np.zeros(40), "activation_mass": np.ones(40)})
    objs = []
    for cutoff in (1.0, 1.5, 2.0):
        everything = [list(p) for p in candidates(scores, RULES["cap"], cutoff, 1.0, None)]
        pool = [list(p) for p in candidates(scores, RULES["cap"], cutoff, 1.0, 4)]
        objs.append({"rule": "cap", "cutoff": cutoff, "exclusion": 1.0, "mask": {"0": [0, 1]}, "objective": 0.1,
                     "pool": pool, "n_admitted": len(everything), "cap_bound": len(everything) > len(pool),
                     "step_gains": gains(False, True)})
    table = sweep_table(objs, objs[1])
    assert table["cap_bound"].all() and (table["n_admitted"] > table["n_pool"]).all()
    assert table["pool_jaccard"].to_list() == [1.0] * 3 and table["same_as_locked"].all()
    assert not table["pools_differ"].any()
    with caplog.at_level("WARNING"):
        summarise(objs, tmp_path)
    assert "cannot tell its cutoffs apart" in caplog.text and "is forced" not in caplog.text
    assert jaccard([], []) == 1.0 and jaccard([A], []) == 0.0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("selection"))


def test_selection_stages_pick_the_feature_that_makes_the_gold_answers(world, tmp_path):
    """End to end on the tiny pair. Gold answers of QA/Math are set to what one candidate's
    intervention generates, so that candidate must be chosen first; every step's objective
    is that mask's objective measured alone; the written mask is the chosen steps'."""
    model, tok = load_model(world.pt, "float32", "cpu")
    full = world.variant("FullDelta", "full")
    modules, _ = V.materialise(full, "cpu")
    scores = pl.DataFrame({
        "layer": [0] * F + [1] * F,
        "feature": list(range(F)) * 2,
        "cap_score": np.linspace(3, -3, 2 * F),
        "verb_score": np.linspace(-3, 3, 2 * F)[::-1] * np.tile([1, -1], F),
        "activation_mass": np.ones(2 * F),
    })
    scores.write_parquet(tmp_path / "scores.parquet")
    pt = world.variant("PT", "pt")
    stages = {"cap": ({"cap_cutoff": 1.0, "verb_exclusion": 10.0}, (1.0, 10.0), pt),
              "vmask": ({"verb_cutoff": 1.5}, (1.5, None), full)}
    for rule, (params, thresholds, unmasked) in stages.items():
        pool = candidates(scores, RULES[rule], *thresholds, 4)
        template = Variant(name="x", mode=RULES[rule].mode, gates=full.gates, surrogates=full.surrogates)
        rows = world.rows()
        tried = evaluate_masks(model, tok, rows, template, modules, [layer_mask([c]) for c in pool], NEW, 16)
        base = evaluate(model, tok, rows, unmasked, V.edits(unmasked, modules), NEW, 4, None)
        capability = pl.col("slice").is_in(["QA", "Math"])
        texts = [tried.filter(pl.col("candidate") == c).filter(capability)["text"].to_list() for c in range(len(pool))]
        target = next(c for c in range(len(pool))
                      if texts[c] != base.filter(capability)["text"].to_list() and texts.count(texts[c]) == 1)
        split = pl.read_parquet(world.split)
        gold = dict(zip(rows.filter(capability)["id"], texts[target]))
        split = split.with_columns(pl.Series("gold", [[gold[i]] if i in gold else g for i, g in zip(split["id"], split["gold"])]))
        split_path = str(tmp_path / f"split_{rule}.parquet")
        split.write_parquet(split_path)
        rows = read_rows(split_path, world.teacher)
        pt_rec = evaluate(model, tok, rows, pt, {}, NEW, 4, None)
        full_rec = evaluate(model, tok, rows, full, V.edits(full, modules), NEW, 4, None)
        # Random models never stop and say little: widen the references' gap so VerbCarry is defined.
        pt_ref = pt_rec.with_columns(pl.col("brevity_excess") + 3.0)
        it_ref = pt_rec.with_columns(pl.lit(2, dtype=pl.Int64).alias("n_tokens"),
                                     pl.when(pl.col("slice") == "Brevity").then(0.0).otherwise(None).alias("brevity_excess"))
        paths = {}
        for name, rec in (("pt", pt_ref), ("it", it_ref), ("full", full_rec)):
            paths[f"{name}_records"] = str(tmp_path / f"{rule}_{name}.parquet")
            rec.write_parquet(paths[f"{name}_records"])
        refs = {name[:-8]: selector_metrics(pl.read_parquet(p)) for name, p in paths.items()}
        out = {"mask": str(tmp_path / f"{rule}.json"), "steps": str(tmp_path / f"{rule}_steps.parquet"),
               "records": str(tmp_path / f"{rule}_records.parquet")}
        inputs = {"variant": world.write_variant(full), "split": split_path, "teacher": world.teacher,
                  "scores": str(tmp_path / "scores.parquet"), **paths}
        params = {**world.model_params, **params, "selection": rule, "lambda": 0.5, "size_cap": 2, "max_candidates": 4,
                  "max_new_tokens": NEW, "batch_size": 16, "gain_bootstrap": {"B": 500, "seed": 0, "level": 0.95},
                  "fill_to_cap": False, "evidence": "same", "verify": False}
        select(Job(input=inputs, output=out, params=params))
        # Verify-then-generate selects the same mask from the same records.
        verified = {k: str(tmp_path / f"{rule}_verified_{k}") for k in out}
        select(Job(input=inputs, output=verified, params={**params, "verify": True, "verify_margin": 1e-3}))
        checks = json.loads(open(verified["mask"]).read()).pop("verified")
        assert json.loads(open(verified["mask"]).read()) == {**json.loads(open(out["mask"]).read()), "verified": checks}
        assert [c["call"] for c in checks] == [1, 2, 3][: len(checks)] and all(c["verified"] <= c["rows"] for c in checks)
        for key in ("steps", "records"):
            assert pl.read_parquet(verified[key]).equals(pl.read_parquet(out[key])), key
        # The same selection as a cluster runs it: two candidate shards per step, merged; with
        # verify, each shard's counts reach the mask file through the step files.
        for verify in (False, True):
            state, step_rows, step_records = [], [], []
            run = {**params, "verify": verify, "verify_margin": 1e-3}
            for step in (1, 2):
                shard = [{k: str(tmp_path / f"{rule}_{verify}_s{step}_{s}{k}")
                          for k in ("values", "records", "verified")} for s in range(2)]
                for s, files in enumerate(shard):
                    select_shard(Job(input={**inputs, "state": state}, output=files,
                                     params={**run, "shard": s, "n_shards": 2}))
                step_rows.append(str(tmp_path / f"{rule}_{verify}_s{step}_rows.parquet"))
                step_records.append(str(tmp_path / f"{rule}_{verify}_s{step}_records.parquet"))
                select_step(Job(input={**inputs, "state": state, **{k: [f[k] for f in shard] for k in shard[0]}},
                                output={"state": str(tmp_path / f"{rule}_{verify}_s{step}.json"),
                                        "steps": step_rows[-1], "records": step_records[-1]},
                                params=run))
                state = str(tmp_path / f"{rule}_{verify}_s{step}.json")
            sharded = {k: str(tmp_path / f"{rule}_{verify}_sharded_{k}") for k in out}
            select_finish(Job(input={**inputs, "state": state, "steps": step_rows, "step_records": step_records},
                              output=sharded, params=run))
            mask = json.loads(open(sharded["mask"]).read())
            calls = mask.pop("verified", [])
            assert mask == json.loads(open(out["mask"]).read())
            # Every step's call in each shard that had candidates to try, its rows that shard's.
            tried = pl.read_parquet(out["steps"]).group_by("step").len().sort("step")["len"].to_list()
            expected = [(t, s) for t, n in enumerate(tried, 1) for s in range(2) if s < n] if verify else []
            assert [(c["call"], c["shard"]) for c in calls] == expected
            assert all(c["identical"] + c["verified"] + c["diverged"] + c["near_tie"] == c["rows"] for c in calls)
            assert pl.read_parquet(sharded["steps"]).equals(pl.read_parquet(out["steps"]))
            assert pl.read_parquet(sharded["records"]).equals(pl.read_parquet(out["records"]))
        result = json.loads((tmp_path / f"{rule}.json").read_text())
        steps = pl.read_parquet(out["steps"])
        assert result["n_candidates"] == 4 and steps.filter(pl.col("step") == 1).height == 4
        chosen = steps.filter("chosen").select("layer", "feature").rows()
        assert chosen[0] == pool[target], rule
        assert [tuple(p) for p in result["order"]] == chosen
        assert result["mask"] == {str(k): v for k, v in layer_mask(chosen).items()}
        assert result["base_objective"] == pytest.approx(
            RULES[rule].objective(refs[RULES[rule].unmasked], refs, 0.5))
        assert result["objective"] > result["base_objective"]
        # Each taken step: its records are its mask's alone, its incumbent's the mask before it
        # (the unmasked variant before step 1), and its gain the objective's rise over the incumbent.
        records, gains = pl.read_parquet(out["records"]), result["step_gains"]
        assert [(g["step"], g["layer"], g["feature"]) for g in gains] == [(t + 1, *c) for t, c in enumerate(chosen)]
        assert result["fill_to_cap"] is False and result["accept"] == "gain" and all(g["passed"] for g in gains)
        unmasked_rec = {"cap": pt_rec, "vmask": full_rec}[rule]
        assert records.filter((pl.col("step") == 1) & (pl.col("role") == "incumbent"))["text"].to_list() \
            == unmasked_rec["text"].to_list()
        previous = RULES[rule].objective(selector_metrics(unmasked_rec), refs, 0.5)
        for g in gains:
            mask = layer_mask(chosen[: g["step"]])
            alone = Variant(name="x", mode=template.mode, gates=full.gates, surrogates=full.surrogates, mask=mask)
            rec = evaluate(model, tok, rows, alone, V.edits(alone, modules), NEW, 5, None)
            chosen_rec = records.filter((pl.col("step") == g["step"]) & (pl.col("role") == "chosen"))
            assert chosen_rec["text"].to_list() == rec["text"].to_list()
            assert g["gain"] == pytest.approx(g["objective"] - previous, abs=1e-12) and g["lo"] <= g["hi"]
            previous = g["objective"]
        assert previous == pytest.approx(result["objective"], abs=1e-12)
        if rule == "cap":
            shared_pool_is_read_not_selected(inputs, out, params, tmp_path)
        # Every step's objective is its mask's objective measured alone.
        for step, layer, feature, objective in steps.select("step", "layer", "feature", "objective").rows():
            mask = layer_mask([*chosen[: step - 1], (layer, feature)])
            alone = Variant(name="x", mode=template.mode, gates=full.gates, surrogates=full.surrogates, mask=mask)
            rec = evaluate(model, tok, rows, alone, V.edits(alone, modules), NEW, 5, None)
            assert objective == pytest.approx(RULES[rule].objective(selector_metrics(rec), refs, 0.5), abs=1e-12)


def shared_pool_is_read_not_selected(inputs: dict, owner: dict, params: dict, tmp_path: Path) -> None:
    """A sweep point whose pool is the owner's (a lower cutoff the cap makes no difference to)
    writes the owner's mask, steps and records under its own thresholds, selecting nothing;
    a point with another pool cannot read it."""
    shared = {f"shared_{k}": v for k, v in owner.items()}
    out = {k: str(tmp_path / f"shared_{k}") for k in owner}
    select(Job(input={**inputs, **shared}, output=out, params={**params, "cap_cutoff": 0.5}))
    mine, theirs = json.loads(open(out["mask"]).read()), json.loads(open(owner["mask"]).read())
    assert mine["cutoff"] == 0.5 and mine["n_admitted"] > theirs["n_admitted"] and mine["cap_bound"]
    assert mine["selected_at"] == theirs["selected_at"] == {"cutoff": 1.0, "exclusion": 10.0}
    different = ("cutoff", "n_admitted", "cap_bound")
    assert {k: v for k, v in mine.items() if k not in different} == {k: v for k, v in theirs.items() if k not in different}
    for key in ("steps", "records"):
        assert pl.read_parquet(out[key]).equals(pl.read_parquet(owner[key]))
    with pytest.raises(ValueError, match="its pool is not this point's"):
        select(Job(input={**inputs, **shared}, output=out, params={**params, "cap_cutoff": 2.9}))


@pytest.mark.parametrize("mode", ["add_mask", "minus_mask"])
def test_verified_masks_have_the_records_of_full_generation(world, mode):
    """Teacher-forcing each mask on the incumbent's tokens, then generating what does not
    agree, gives every mask the records that generating all of them gives, row for row; a
    copy of the incumbent is verified, masks that change the answer are generated."""
    model, tok = load_model(world.pt, "float32", "cpu")
    full = world.variant("FullDelta", "full")
    modules, _ = V.materialise(full, "cpu")
    template = Variant(name="x", mode=mode, gates=full.gates, surrogates=full.surrogates)
    rows = world.rows()
    masks = [{0: [1]}, {0: [1]}, *({0: [1], layer: sorted({1, f})} for layer in (0, 1) for f in range(0, F, 3))]
    expected = evaluate_masks(model, tok, rows, template, modules, masks, NEW, 16)
    for batch_size in (16, 5):
        records, verified = verify_masks(model, tok, rows, template, modules, masks, NEW, batch_size, 1e-3)
        assert records.equals(expected), batch_size
        assert verified.rows == (len(masks) - 1) * rows.height
        assert verified.identical + verified.verified + verified.diverged + verified.near_tie == verified.rows
        # The incumbent's copy differs in no feature; other masks' extra features stay silent on
        # some prompts and fire on others, which the pass then settles or generates.
        assert verified.identical > rows.height and verified.verified > 0 and verified.diverged > 0
        assert sum(verified.diverged_at.values()) == verified.diverged


def test_silent_features_prove_only_equal_generations(world):
    """Every copy that watching the incumbent's features calls identical generates, beside the
    incumbent in one batch, exactly the incumbent's tokens: the proof never takes a copy whose
    tokens would differ, and it takes some but not all of the others."""
    model, tok = load_model(world.pt, "float32", "cpu")
    full = world.variant("FullDelta", "full")
    modules, _ = V.materialise(full, "cpu")
    template = Variant(name="x", mode="add_mask", gates=full.gates, surrogates=full.surrogates)
    rows = world.rows()
    masks = [{0: [1]}, *({0: [1], layer: sorted({1, f})} for layer in (0, 1) for f in range(0, F, 2))]
    _, factory = tile_masks(rows, template, modules, masks)
    prefixes, n = rows["prefix_ids"].to_list(), rows.height
    watch = silent_features(modules, masks, n, factory)
    identical = watch.identical(generate(model, tok, prefixes, NEW, 8, edit_factory=watch.edit_factory))
    assert all(identical[:n]) and 0 < sum(identical[n:]) < len(identical) - n
    every = generate(model, tok, prefixes * len(masks), NEW, 8, edit_factory=factory,
                     batches=grouped_batches([len(p) for p in prefixes], len(masks), 8))
    assert [every[r] == every[r % n] for r in range(len(every)) if identical[r]] == [True] * sum(identical)
    assert any(every[r] != every[r % n] for r in range(len(every)))


def test_a_candidate_that_changes_one_token_mid_answer_is_generated(world):
    """A candidate that pushes the last block's output at answer position 3 only keeps the
    incumbent's first three tokens and then leaves them: verification finds it diverging at
    position 3, and its generated tokens are those of full generation, not the incumbent's."""
    model, tok = load_model(world.pt, "float32", "cpu")
    prefixes = world.rows()["prefix_ids"].to_list()
    n, at = len(prefixes), 3
    push = 40.0 * model.get_output_embeddings().weight[5].detach()

    def factory(idx: list[int]) -> dict[int, LayerEdit]:
        calls = iter(range(10**6))  # a fresh count per batch: generation calls once per position
        starts = torch.tensor([len(prefixes[r % n]) - 1 + at for r in idx])

        def fn(h: torch.Tensor) -> torch.Tensor:
            delta = torch.zeros_like(h)
            if h.shape[1] == 1:
                delta[:, 0] = push if next(calls) == at else 0.0
            else:
                delta[torch.arange(len(idx)), starts] = push
            return delta

        return {1: LayerEdit(torch.tensor([float(r >= n) for r in idx]), fn)}

    expected = generate(model, tok, prefixes * 2, NEW, 8, edit_factory=factory,
                        batches=grouped_batches([len(p) for p in prefixes], 2, 8))
    changed = [i for i in range(n) if expected[n + i] != expected[i]]
    assert changed and all(expected[n + i][0][:at] == expected[i][0][:at] for i in changed)
    outputs, verified = verify_then_generate(model, tok, prefixes, 2, factory, NEW, 8, 1e-3)
    assert outputs == expected
    assert verified.diverged_at == {at: len(changed)} and verified.verified + verified.near_tie == n - len(changed)


SHIPPED_TWIN = Path(__file__).resolve().parents[1] / "workflow/resources/hf_home/hub"


@pytest.fixture(scope="module")
def twin_selection(tmp_path_factory):
    """The rehearsal twin in bf16 with a layer-1 surrogate whose feature 0 has a zero decoder
    row, and every input of a CapMask selection over features [0, 1, 2] (0 ranked first)."""
    root = tmp_path_factory.mktemp("twin_selection")
    snap = {r: str(next((SHIPPED_TWIN / f"models--postdiff-rehearsal--gemma-3-tiny-{r}/snapshots").iterdir()))
            for r in ("pt", "it")}
    params = {"pt": snap["pt"], "it": snap["it"], "dtype": "bfloat16", "device": "cpu"}
    split_frame(2).write_parquet(root / "split.parquet")
    teacher(Job(input={"split": str(root / "split.parquet")}, output={"completions": str(root / "teacher.parquet")},
                params={**params, "max_new_tokens": 8, "batch_size": 8}))
    rows = read_rows(str(root / "split.parquet"), str(root / "teacher.parquet"))
    model, tok = load_model(snap["pt"], "bfloat16", "cpu")
    d = model.config.get_text_config().hidden_size
    g = torch.Generator().manual_seed(0)
    sae = surrogate.TopKSurrogate(d, 16, 4)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(16, d, generator=g))
        sae.b_enc.copy_(torch.rand(16, generator=g))
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(16, d, generator=g), dim=1) * 8.0)
        sae.W_dec[0].zero_()
    surrogate.save(sae, root / "L1.safetensors", {"layer": 1})
    full = Variant(name="FullDelta", mode="full", gates={1: 1.0}, surrogates={1: str(root / "L1.safetensors")})
    (root / "FullDelta.json").write_text(json.dumps(full.to_json()))
    evaluate(model, tok, rows, Variant(name="PT", mode="pt"), {}, 8, 8, None).write_parquet(root / "pt.parquet")
    teacher_records(rows, "IT").write_parquet(root / "it.parquet")
    pl.DataFrame({"layer": [1, 1, 1], "feature": [0, 1, 2], "cap_score": [3.0, 2.0, 1.5], "verb_score": [0.0] * 3,
                  "activation_mass": [1.0] * 3}).write_parquet(root / "scores.parquet")
    inputs = {"variant": str(root / "FullDelta.json"), "split": str(root / "split.parquet"),
              "teacher": str(root / "teacher.parquet"), "scores": str(root / "scores.parquet"),
              "pt_records": str(root / "pt.parquet"), "it_records": str(root / "it.parquet")}
    return root, inputs, {**params, "selection": "cap", "cap_cutoff": 1.0, "verb_exclusion": 1.0, "lambda": 0.5,
                          "size_cap": 2, "max_candidates": 3, "max_new_tokens": 8, "fill_to_cap": False,
                          "evidence": "same", "gain_bootstrap": {"B": 500, "seed": 0, "level": 0.95}}


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("accept", ["gain", "interval"])
def test_a_zero_decoder_candidate_is_never_accepted_in_bf16(twin_selection, accept, verify):
    """bf16 greedy tokens depend on batch layout. A candidate that adds a zero decoder row edits
    nothing, so its gain over the incumbent must be exactly 0 whatever the batch size. Step 1
    generates 12 prompts x 4 masks: batch sizes 3 and 5 give one prompt's 4 rows a batch, 64
    all 48 rows one batch. (Rows merely sorted by length, as before, spread a prompt's masks
    over batches of 3 or 5: on this twin that changed 1 to 3 prompts' tokens for this
    do-nothing candidate, measured with AVX-512 kernels.) With verification, a prompt whose
    candidates are generated again takes its incumbent's tokens from the same batch."""
    root, inputs, params = twin_selection
    for batch_size in (3, 5, 64):
        out = {k: str(root / f"{accept}_{batch_size}_{verify}_{k}") for k in ("mask", "steps", "records")}
        select(Job(input=inputs, output=out, params={**params, "accept": accept, "batch_size": batch_size,
                                                     "verify": verify}))
        steps = pl.read_parquet(out["steps"])
        zero = steps.filter(pl.col("feature") == 0)
        assert (zero["gain"] == 0.0).all() and not zero["chosen"].any(), (batch_size, zero)
        # The other candidates do edit PT: the test has power to see a change.
        assert (steps.filter(pl.col("step") == 1, pl.col("feature") != 0)["gain"] != 0.0).any()
        assert [1, 0] not in json.loads(Path(out["mask"]).read_text())["order"]


def test_verified_masks_have_the_records_of_full_generation_in_bf16(twin_selection):
    """On the rehearsal twin in bf16, where batch layout moves greedy tokens, verification at
    the default margin gives the records of generating every mask (measured here with AVX-512
    kernels; another CPU's rounding could put a near tie the other way in either path)."""
    root, inputs, params = twin_selection
    model, tok = load_model(params["pt"], "bfloat16", "cpu")
    full = Variant.from_json(json.loads(Path(inputs["variant"]).read_text()))
    modules, _ = V.materialise(full, "cpu")
    template = Variant(name="x", mode="add_mask", gates=full.gates, surrogates=full.surrogates)
    rows = read_rows(inputs["split"], inputs["teacher"])
    masks = [{}, {1: [0]}, {1: [1]}, {1: [2]}, {1: [0, 1]}]
    for batch_size in (5, 64):
        expected = evaluate_masks(model, tok, rows, template, modules, masks, 8, batch_size)
        records, verified = verify_masks(model, tok, rows, template, modules, masks, 8, batch_size, 0.05)
        assert records.equals(expected), batch_size
        # Feature 0's decoder row is zero: that mask edits as the incumbent does, on every prompt.
        assert verified.verified >= rows.height and verified.diverged > 0


def test_halves_split_each_slice_in_two_by_seed():
    slices = ["QA"] * 7 + ["Math"] * 4 + ["Format"] * 1
    choose = halves(slices, 0)
    assert [int(choose[np.asarray(slices) == s].sum()) for s in ("QA", "Math", "Format")] == [3, 2, 0]
    assert (halves(slices, 0) == choose).all() and not (halves(slices, 1) == choose).all()


def test_split_evidence_picks_on_one_half_and_judges_on_the_other(twin_selection, tmp_path):
    """Each step's pass/fail is its gain on the judge half alone, recomputed here from the
    step's records; the passed prefix is the leading run of passed steps."""
    root, inputs, params = twin_selection
    out = {k: str(tmp_path / f"{k}.{ext}") for k, ext in (("mask", "json"), ("steps", "parquet"), ("records", "parquet"))}
    params = {**params, "evidence": "split", "split_seed": 3, "fill_to_cap": True, "batch_size": 64}
    select(Job(input=inputs, output=out, params=params))
    result = json.loads(Path(out["mask"]).read_text())
    split = pl.read_parquet(inputs["split"])
    choose = halves(split["slice"].to_list(), 3)
    judge_ids = set(split.filter(pl.Series(~choose))["id"])
    assert result["evidence"] == "split" and result["n_prompts"] == {"choose": int(choose.sum()), "judge": len(judge_ids)}
    records = pl.read_parquet(out["records"]).filter(pl.col("id").is_in(judge_ids))
    refs = {k: pl.read_parquet(inputs[f"{k}_records"]).filter(pl.col("id").is_in(judge_ids)) for k in ("pt", "it")}
    ref_metrics = {k: selector_metrics(v) for k, v in refs.items()}
    passed = []
    for g in result["step_gains"]:
        at = records.filter(pl.col("step") == g["step"])
        value = {role: RULES["cap"].objective(selector_metrics(at.filter(pl.col("role") == role)), ref_metrics, 0.5)
                 for role in ("incumbent", "chosen")}
        assert g["gain"] == pytest.approx(value["chosen"] - value["incumbent"], abs=1e-12)
        assert g["passed"] == (g["gain"] > 0)
        passed.append(g["passed"])
    assert len(result["order"]) == 2  # filled to size_cap whatever passed
    n_passed = next((t for t, p in enumerate(passed) if not p), len(passed))
    assert result["passed_order"] == result["order"][:n_passed]
    assert [g["in_passed_prefix"] for g in result["step_gains"]] == [t < n_passed for t in range(len(passed))]
