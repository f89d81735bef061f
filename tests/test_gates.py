"""Gate calibration: coordinate search over the alpha grid on calib KL (postdiff.method.gates)."""

import json
import logging

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import save_file
from test_evaluate import World

from postdiff.method import standardise
from postdiff.method import variants as V
from postdiff.method.gates import (
    CURVE_SCHEMA,
    DEFAULT_GRID,
    TESTED_ON,
    calibrate,
    calibrate_gates,
    check_grid,
    choice_report,
    contenders,
    coordinate_search,
    grid_winner,
    neighbours,
    tie_test,
)
from postdiff.method.spec import Variant
from postdiff.models.forward import answer_logprobs
from postdiff.models.loading import load_model
from postdiff.stats import bootstrap
from postdiff.stats.tables import gate_table
from postdiff.workflow.runtime import Job


def counting(fn):
    calls = []

    def kl(points):
        calls.extend(points)
        return [fn(p) for p in points]

    return kl, calls


def test_coordinate_search_finds_a_coupled_minimum_measuring_each_point_once():
    def bowl(p):
        a, b = p[0] - 0.5, p[1] - 1.25
        return a * a + b * b + 0.8 * a * b

    kl, calls = counting(bowl)
    best, value, trace = coordinate_search(kl, 2, DEFAULT_GRID, max_rounds=5)
    assert best == (0.5, 1.25) and value == 0.0
    assert len(calls) == len(set(calls))
    rounds = {row["round"] for row in trace}
    assert 0 in rounds and max(rounds) <= 5
    # The shared sweep records every layer at each diagonal point.
    shared = [row for row in trace if row["shared"]]
    assert len(shared) == 2 * len(DEFAULT_GRID) and all(row["gates"] == (row["alpha"],) * 2 for row in shared)


def test_ties_and_nan_go_to_the_smaller_edit():
    best, value, _ = coordinate_search(lambda ps: [1.0] * len(ps), 3, [1.5, 0.0, 0.5], max_rounds=3)
    assert best == (0.0, 0.0, 0.0) and value == 1.0
    best, _, _ = coordinate_search(lambda ps: [float("nan") if p[0] > 0 else 2.0 for p in ps], 1, DEFAULT_GRID)
    assert best == (0.0,)
    # Only strict improvements move a coordinate, and a round without one stops the search.
    kl, calls = counting(lambda p: (p[0] - 1.0) ** 2)
    best, _, trace = coordinate_search(kl, 2, DEFAULT_GRID, max_rounds=10)
    assert best == (1.0, 0.0) and max(row["round"] for row in trace) == 2  # a no-op layer shrinks to 0


def test_max_rounds_caps_the_search_and_bad_grids_fail():
    kl, _ = counting(lambda p: abs(p[0] - 0.25) + abs(p[1] - 1.5))
    best, _, trace = coordinate_search(kl, 2, DEFAULT_GRID, max_rounds=0)
    # KL is flat on the diagonal between 0.25 and 1.5: the smallest edit wins the tie.
    assert best == (0.25, 0.25)
    assert {row["round"] for row in trace} == {0}
    with pytest.raises(ValueError, match="gate grid"):
        check_grid([])
    with pytest.raises(ValueError, match="gate grid"):
        check_grid([0.0, float("inf")])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("gates"), n_per_slice=1)


def calib_job(world, tmp_path, **params) -> Job:
    inputs = {"split": world.split, "teacher": world.teacher}
    if params.get("mode", "full") == "full":
        inputs["surrogates"] = [world.surrogates[layer] for layer in params.get("layers", [0, 1])]
    return Job(
        input={**inputs, **params.pop("inputs", {})},
        output={"gates": str(tmp_path / "gates.json"), "curve": str(tmp_path / "curve.parquet"),
                "choice": str(tmp_path / "choice.json")},
        params={**world.model_params, "mode": "full", "layers": [0, 1], "grid": [0.0, 0.5, 1.0],
                "batch_size": 4, "max_rounds": 2, "refine": False, "bootstrap": {"B": 200, "seed": 0, "level": 0.95},
                **params},
    )


def test_identical_pt_and_it_gate_every_layer_to_zero(world, tmp_path):
    job = calib_job(world, tmp_path, it=world.pt)
    calibrate(job)
    gates = json.loads((tmp_path / "gates.json").read_text())
    assert gates == {"0": 0.0, "1": 0.0}
    curve = pl.read_parquet(tmp_path / "curve.parquet")
    assert dict(curve.schema) == CURVE_SCHEMA
    at_zero = curve.filter(pl.col("gates") == json.dumps({"0": 0.0, "1": 0.0}))
    assert at_zero["kl"].abs().max() < 1e-6
    assert curve.filter(pl.col("alpha") > 0)["kl"].min() > 1e-3
    assert set(curve["layer"]) == {0, 1}


def test_gate_recovers_the_alpha_that_made_the_reference(world):
    """The reference is PT under the layer-1 surrogate at alpha 0.5: the search finds it."""
    model, _ = load_model(world.pt, "float32", "cpu")
    rows = world.rows()
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list()))
    variant = Variant(name="c", mode="full", gates={1: 0.0}, surrogates={1: world.surrogates[1]})
    modules, _ = V.materialise(variant, "cpu")
    target = V.edits(Variant(name="t", mode="full", gates={1: 0.5}, surrogates=variant.surrogates), modules)
    reference = [torch.empty(0)] * len(pairs)
    for i, lp in answer_logprobs(model, pairs, 4, edits=target):
        reference[i] = lp
    gates, curve, _ = calibrate_gates(model, pairs, variant, modules, None, DEFAULT_GRID, 4, reference, tol=None)
    assert gates == {1: 0.5}
    assert curve.filter(pl.col("alpha") == 0.5)["kl"].item() < 1e-6
    assert curve.height == len(DEFAULT_GRID)  # one layer: the shared sweep is the whole search


def test_mean_mode_reads_the_standardiser_and_single_layer_ablation(world, tmp_path):
    path = tmp_path / "standardiser.safetensors"
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in (0, 1):
        tensors[f"mu.{layer}"] = torch.zeros(32)
        tensors[f"sigma.{layer}"] = torch.ones(32)
        tensors[f"delta_mean.{layer}"] = torch.randn(32, generator=g)
    save_file(tensors, str(path), metadata={"format": standardise.FORMAT, "layers": "[0, 1]"})
    calibrate(calib_job(world, tmp_path, mode="mean", layers=[1], it=world.pt, inputs={"standardiser": str(path)}))
    assert json.loads((tmp_path / "gates.json").read_text()) == {"1": 0.0}
    curve = pl.read_parquet(tmp_path / "curve.parquet")
    assert curve["layer"].to_list() == [1, 1, 1] and curve["kl"][0] < 1e-6 < curve["kl"][1]
    with pytest.raises(ValueError, match="surrogate files for 2 layers"):
        calibrate(calib_job(world, tmp_path, inputs={"surrogates": [world.surrogates[0]]}))
    with pytest.raises(ValueError, match="mode must be"):
        calibrate(calib_job(world, tmp_path, mode="add_mask"))


def test_refinement_finds_an_off_grid_minimum_within_tolerance():
    """A coupled bowl whose minimum lies between grid points: the grid picks a neighbour, the
    refinement lands within tol of the true minimum, and no point is measured twice."""
    def bowl(p):
        a, b = p[0] - 0.37, p[1] - 1.13
        return a * a + b * b + 0.5 * a * b

    kl, calls = counting(bowl)
    grid_best, _, _ = coordinate_search(kl, 2, DEFAULT_GRID, max_rounds=3)
    assert grid_best == (0.5, 1.0)
    kl, calls = counting(bowl)
    best, value, trace = coordinate_search(kl, 2, DEFAULT_GRID, max_rounds=3, tol=0.01)
    assert abs(best[0] - 0.37) <= 0.02 and abs(best[1] - 1.13) <= 0.02
    assert value < bowl(grid_best) and len(calls) == len(set(calls))
    refined = [row["alpha"] for row in trace if row["refined"]]
    assert refined and all(DEFAULT_GRID[0] <= a <= DEFAULT_GRID[-1] for a in refined)
    # A flat function stays at the grid's smallest edit: refinement never trades KL for size.
    best, _, _ = coordinate_search(lambda ps: [1.0] * len(ps), 2, DEFAULT_GRID, tol=0.01)
    assert best == (0.0, 0.0)


def test_refinement_turns_along_a_valley_where_two_gates_trade_off(caplog):
    """The embedded pair's calib KL has a narrow valley along which layer 1's alpha falls as
    layer 2's rises. Searched one layer at a time, each round moves a little way along it, and
    where the rounds run out depends on the path; Powell's rounds turn along the valley and
    reach its minimum, (0.05, 1.45), in a few rounds and say nothing."""
    def valley(p):
        a, b = p
        return 0.8 + 50 * (0.4 * a + b - 1.47) ** 2 + (a - 0.05) ** 2

    with caplog.at_level(logging.WARNING, logger="postdiff.method.gates"):
        best, value, trace = coordinate_search(counting(valley)[0], 2, DEFAULT_GRID, max_rounds=5, tol=0.01)
    assert abs(best[0] - 0.05) <= 0.02 and abs(best[1] - 1.45) <= 0.02 and value - 0.8 < 1e-3
    assert not caplog.records
    assert max(row["round"] for row in trace if row["refined"]) - max(row["round"] for row in trace if not row["refined"]) <= 4


def test_a_search_cut_off_while_it_still_moves_says_so(caplog):
    """Rounds that end at ``max_rounds`` while an alpha still moves leave gates that need not be
    a minimum (where they stop depends on the path); the log says so, and a search that
    converges says nothing."""
    def bowl(p):
        a, b = p[0] - 0.37, p[1] - 1.13
        return a * a + b * b + 0.5 * a * b

    with caplog.at_level(logging.WARNING, logger="postdiff.method.gates"):
        short, _, _ = coordinate_search(counting(bowl)[0], 2, DEFAULT_GRID, max_rounds=1, tol=0.01)
    assert [r.getMessage().split(" search")[0] for r in caplog.records] == ["gate coordinate", "gate refinement"]
    assert all("still moving" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="postdiff.method.gates"):
        best, _, _ = coordinate_search(counting(bowl)[0], 2, DEFAULT_GRID, max_rounds=10, tol=0.01)
    assert not caplog.records and bowl(best) < bowl(short)


def test_the_grid_winner_and_its_neighbours_are_the_contenders():
    grid = [0.0, 0.25, 0.5, 0.75]
    trace = [{"gates": (0.25, 0.5), "kl": 1.0, "refined": False}, {"gates": (0.5, 0.5), "kl": 1.01, "refined": False},
             {"gates": (0.3, 0.5), "kl": 0.9, "refined": True}]
    assert grid_winner(trace) == (0.25, 0.5)
    # The edge of the grid has one neighbour.
    assert neighbours((0.0, 0.5), grid) == [(0.25, 0.5), (0.0, 0.25), (0.0, 0.75)]
    assert [p for _, p in contenders((0.25, 0.5), (0.3, 0.5), grid)] == \
        [(0.25, 0.5), (0.0, 0.5), (0.5, 0.5), (0.25, 0.25), (0.25, 0.75)]
    # Refinement that stayed on the winner: the winner is the choice, not a contender.
    assert [role for role, _ in contenders((0.25, 0.5), (0.25, 0.5), grid)] == ["grid neighbour"] * 4
    with pytest.raises(ValueError, match=r"alphas \[0.3\] are not on the grid"):
        neighbours((0.3, 0.5), grid)


def test_tie_test_is_paired():
    codes = np.repeat(np.arange(3), 20)
    idx = bootstrap.stratified_indices(codes, 500, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    chosen = rng.uniform(0, 1, 60)
    same = tie_test(chosen, chosen.copy(), idx, level=0.95)
    assert same == {"diff": 0.0, "lo": 0.0, "hi": 0.0, "tie": True}
    # Every prompt worse by 0.1 plus noise far smaller than that: a clear choice.
    clear = tie_test(chosen, chosen + 0.1 + rng.normal(0, 0.01, 60), idx, level=0.95)
    assert clear["lo"] > 0.09 and not clear["tie"] and clear["lo"] < clear["diff"] < clear["hi"]
    # Half the prompts better, half worse: the paired interval straddles 0.
    swing = np.where(np.arange(60) % 2 == 0, 0.2, -0.2)
    assert tie_test(chosen, chosen + swing, idx, level=0.95)["tie"]


def test_calibrate_writes_the_choice_and_the_seed_table(world, tmp_path):
    """Identical PT and IT: alpha 0 is exact (KL 0) and every other gate is worse on every prompt,
    so the choice is clear, not a tie; the table carries it."""
    job = calib_job(world, tmp_path, it=world.pt, refine=True, tol=0.05)
    calibrate(job)
    choice = json.loads((tmp_path / "choice.json").read_text())
    assert choice["gates"] == {"0": 0.0, "1": 0.0} and choice["kl"] < 1e-6
    assert choice["grid_winner"] == choice["gates"] and choice["tested_on"] == TESTED_ON
    # Each layer's one neighbour (0.5), both measured by the coordinate rounds, both clearly worse.
    assert [c["gates"] for c in choice["compared"]] == [{"0": 0.5, "1": 0.0}, {"0": 0.0, "1": 0.5}]
    assert all(c["lo"] > 0 and c["kl"] > choice["kl"] for c in choice["compared"]) and choice["tie"] is False
    assert choice["not_measured"] == [] and choice["closest"] in choice["compared"]
    assert pl.read_parquet(tmp_path / "curve.parquet")["refined"].any()
    gate_table(Job(input={"choices": [str(tmp_path / "choice.json")] * 2}, output={"csv": str(tmp_path / "g.csv")},
                   params={"names": ["full", "mean"]}))
    table = pl.read_csv(tmp_path / "g.csv")
    assert table["gates"].to_list() == ["full", "mean"] and not table["tie"].any()
    assert table["calib_kl"][0] == pytest.approx(choice["kl"]) and table["n_compared"].to_list() == [2, 2]
    assert table["closest_kl"][0] == pytest.approx(choice["closest"]["kl"]) and table["lo"][0] > 0
    assert table["tested_on"][0] == TESTED_ON and table["n_tied"][0] == choice["n_tied"]


def curve_of(points: dict[tuple[float, ...], np.ndarray], refined: set) -> pl.DataFrame:
    return pl.DataFrame({"gates": [json.dumps({"1": p[0], "2": p[1]}) for p in points],
                         "kl": [float(v.mean()) for v in points.values()], "refined": [p in refined for p in points]})


def test_a_near_tied_neighbour_and_the_grid_winner_are_reported_as_ties():
    """Refinement moved from the grid's winner (0.25, 0.5) to (0.3, 0.5). The winner and the
    neighbour (0.5, 0.5) are within noise of the choice, both less than a grid step from it;
    the other measured neighbours are clearly worse; (0.25, 0.75) was never measured; a far
    point within noise is listed among the ties without being a contender."""
    codes = np.repeat(np.arange(3), 20)
    rng = np.random.default_rng(0)
    best = rng.uniform(0.5, 1.0, 60)
    swing = np.where(np.arange(60) % 2 == 0, 0.1, -0.1)
    per_prompt = {(0.3, 0.5): best, (0.25, 0.5): best + 0.002 + swing, (0.5, 0.5): best + 0.005 - swing,
                  (0.0, 0.5): best + 0.2 + rng.normal(0, 0.01, 60), (0.25, 0.25): best + 0.3,
                  (0.75, 0.0): best + 0.01 + swing, (0.75, 0.75): best + 0.5}
    report = choice_report({1: 0.3, 2: 0.5}, per_prompt, curve_of(per_prompt, {(0.3, 0.5)}), [0.0, 0.25, 0.5, 0.75],
                           codes, 500, 0, 0.95)
    assert report["grid_winner"] == {"1": 0.25, "2": 0.5} and report["tested_on"] == TESTED_ON
    compared = {(c["role"], tuple(c["gates"].values())): c["tie"] for c in report["compared"]}
    assert compared == {("grid winner", (0.25, 0.5)): True, ("grid neighbour", (0.5, 0.5)): True,
                        ("grid neighbour", (0.0, 0.5)): False, ("grid neighbour", (0.25, 0.25)): False}
    assert report["tie"] is True and report["not_measured"] == [{"1": 0.25, "2": 0.75}]
    assert [tuple(t["gates"].values()) for t in report["tied"]] == [(0.25, 0.5), (0.5, 0.5), (0.75, 0.0)]
    assert report["n_tied"] == 3 and report["n_measured"] == 6
    assert report["closest"]["gates"] == {"1": 0.25, "2": 0.5} and report["closest"]["diff"] == pytest.approx(0.002)
    worse = next(c for c in report["compared"] if c["gates"] == {"1": 0.0, "2": 0.5})
    assert worse["lo"] > 0.19 and worse["kl"] == pytest.approx(per_prompt[(0.0, 0.5)].mean())


def test_a_clear_choice_on_the_grid_has_no_tie():
    codes = np.repeat(np.arange(2), 10)
    best = np.linspace(0.1, 0.3, 20)
    per_prompt = {(0.5,): best, (0.0,): best + 0.1, (1.0,): best + 0.05}
    report = choice_report({1: 0.5}, per_prompt, pl.DataFrame({"gates": [json.dumps({"1": p[0]}) for p in per_prompt],
                                                               "kl": [float(v.mean()) for v in per_prompt.values()],
                                                               "refined": [False] * 3}),
                           [0.0, 0.5, 1.0], codes, 200, 0, 0.95)
    assert [c["role"] for c in report["compared"]] == ["grid neighbour"] * 2 and report["tie"] is False
    assert report["tied"] == [] and report["closest"]["gates"] == {"1": 1.0}


def test_choice_report_with_nothing_to_compare():
    curve = pl.DataFrame({"gates": [json.dumps({"1": 0.0})], "kl": [0.3], "refined": [False]})
    report = choice_report({1: 0.0}, {(0.0,): np.array([0.2, 0.4])}, curve, [0.0], np.array([0, 1]), 10, 0, 0.95)
    assert report["compared"] == [] and report["closest"] is None and report["tie"] is False
    assert report["kl"] == pytest.approx(0.3) and report["n_tied"] == 0
