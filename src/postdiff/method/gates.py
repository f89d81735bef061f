"""Per-layer gates ``alpha_l``, chosen on calib to minimise answer-phase KL(IT || variant) (SPEC §5).

Search: the grid's diagonal first (every layer sharing one alpha), then coordinate rounds, one
layer at a time from the earliest (later layers see the earlier layers' edits), until a round
moves nothing or ``max_rounds`` is reached (the log warns when that cuts a search off while an
alpha still moves). Starting from the best shared alpha rather than from all-0 or all-1 costs
one grid sweep and, since each coordinate move must strictly lower KL (or keep it and shrink the
edit), guarantees the result is no worse than PT (alpha 0), than the surrogate as trained (alpha
1), or than any other shared alpha. Ties go to the smaller edit, so an edit that only hurts, or
does nothing, is gated to 0.

Refinement: a grid's winner can be a near-tie with its neighbour, and another CPU's rounding
then flips the choice by a whole grid step (0.25 in alpha moved FullDelta's CapRec by 0.2 on the
embedded pair). So the alphas are then refined off the grid, all together, by Powell's method on
calib KL within the grid's range, until a round no longer lowers KL. A search one layer at a
time crawls along the valley where two layers' gates trade off (on the embedded pair, layer 1's
alpha down and layer 2's up, 0.1 in alpha a round at a KL gain of 1e-3), and, cut off after a
few rounds, ended wherever that CPU's path had reached; Powell's rounds turn along the valley.
The chosen gates are compared, prompt by prompt, with the choices that rounding could have
made instead: the grid's winner (when refinement moved off it) and each of its grid neighbours
(one layer's alpha one grid step down or up). A paired bootstrap interval over calib prompts
whose lower end is not above 0 makes the choice a statistical tie, which the log and the report
say; every other measured gate vector is tested the same way, so the report lists all that the
prompts cannot tell from the choice. Only measured points have per-prompt KL: a neighbour the
search never measured is listed as such, not compared. The calib prompts that chose the gates
also test them, so a tie is, if anything, understated.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import polars as pl
from scipy.optimize import OptimizeResult, minimize
from torch import Tensor, nn

from postdiff.method import variants as V
from postdiff.method.records import read_rows
from postdiff.method.spec import Variant
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.forward import BlockCache, reference_logprobs, variant_kl
from postdiff.models.loading import load_pair
from postdiff.stats import bootstrap, metrics
from postdiff.workflow.io import write_json, write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_MAX_ROUNDS = 10
# The refined alpha's tolerance; alphas are measured on this many decimals, so gate files stay
# readable and each point is measured once.
DEFAULT_TOL = 0.01
DECIMALS = 4
# Refinement ends when a round lowers calib KL by this share or less: along the valley where two
# layers' gates trade off, KL falls by about 1e-3 of itself a round for several rounds, and a
# search cut off there ends wherever the rounding's path left it.
REFINE_FTOL = 1e-4
REFINE_FLOOR = 1e-7  # nats: below any difference the calib prompts could show
# IT log-probs of the whole calib split are kept when they fit in this many bytes; beyond it
# (262k-token vocabularies) IT runs once per batch of each coordinate step instead. PT's block
# outputs before the first gated layer are kept up to the same size (the rest recomputed).
REFERENCE_BYTES = 2 << 30
TESTED_ON = "calib (the prompts that chose the gates)"

Point = tuple[float, ...]
CURVE_SCHEMA = {
    "round": pl.Int64,
    "layer": pl.Int64,
    "alpha": pl.Float64,
    "kl": pl.Float64,
    "shared": pl.Boolean,
    "refined": pl.Boolean,
    "gates": pl.String,
}


def check_grid(grid: Sequence[float]) -> list[float]:
    values = sorted({float(a) for a in grid})
    if not values or not all(math.isfinite(a) for a in values):
        raise ValueError(f"gate grid must be a non-empty list of finite numbers, got {list(grid)}")
    return values


def _rank(point: Point, kl: float) -> tuple[float, float]:
    # A NaN KL (a diverging edit) ranks last; among equal KLs the smaller edit wins.
    return (math.inf if math.isnan(kl) else kl, sum(abs(a) for a in point))


class _Measured:
    """Every gate vector measured so far (each once), the curve rows, and the best point."""

    def __init__(self, kl: Callable[[list[Point]], list[float]]) -> None:
        self.kl, self.seen, self.trace = kl, {}, []

    def __call__(self, points: list[Point], round_: int, layers: Sequence[int], shared: bool = False,
                 refined: bool = False) -> tuple[Point, float]:
        new = [p for p in dict.fromkeys(points) if p not in self.seen]
        if new:
            self.seen.update(zip(new, (float(v) for v in self.kl(new)), strict=True))
        for p in points:
            for i in layers:
                self.trace.append(dict(round=round_, layer=i, alpha=p[i], kl=self.seen[p], shared=shared,
                                       refined=refined, gates=p))
        return min(((p, self.seen[p]) for p in points), key=lambda pv: _rank(*pv))


def coordinate_search(
    kl: Callable[[list[Point]], list[float]], n_layers: int, grid: Sequence[float], max_rounds: int = DEFAULT_MAX_ROUNDS,
    tol: float | None = None,
) -> tuple[Point, float, list[dict]]:
    """Best gate vector, its KL, and every measured point as curve rows.

    ``kl`` maps gate vectors to mean KL; each vector is measured once. Curve rows carry the
    index of the layer moved (every layer for the shared sweep, round 0). With ``tol``, the
    grid's winner is then refined off the grid (:func:`refine`).
    """
    if n_layers < 1:
        raise ValueError("coordinate_search needs at least one layer")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    grid = check_grid(grid)
    measure = _Measured(kl)
    best, best_kl = measure([(a,) * n_layers for a in grid], 0, range(n_layers), shared=True)
    log.info("shared sweep: alpha %s, KL %.5f", best[0], best_kl)
    # With one layer the shared sweep already covers the whole grid.
    moved = False
    for round_ in range(1, max_rounds + 1 if n_layers > 1 else 1):
        moved = False
        for i in range(n_layers):
            point, value = measure([best[:i] + (a,) + best[i + 1 :] for a in grid], round_, [i])
            if _rank(point, value) < _rank(best, best_kl):
                best, best_kl, moved = point, value, True
        log.info("round %d: gates %s, KL %.5f", round_, best, best_kl)
        if not moved:
            break
    if moved:
        _stopped_short("coordinate", max_rounds, best)
    if tol is not None and len(grid) > 1:
        best, best_kl = refine(measure, best, best_kl, grid, tol, max(max_rounds, 1))
    return best, best_kl, measure.trace


def refine(measure: _Measured, best: Point, best_kl: float, grid: Sequence[float], tol: float,
           max_rounds: int) -> tuple[Point, float]:
    """Every alpha refined together from ``best`` by Powell's method within the grid's range,
    round after round until a round lowers the best KL by ``REFINE_FTOL`` of itself (plus
    ``REFINE_FLOOR``) or less, or ``max_rounds`` rounds; line searches end within ``tol`` in
    alpha. Returns the best point measured (ties: the smaller edit), never worse than ``best``."""
    if not tol > 0:
        raise ValueError(f"gate refinement tolerance must be > 0, got {tol}")
    n = len(best)
    round_ = 1 + max((row["round"] for row in measure.trace), default=0)
    last = best_kl

    def kl(x: np.ndarray) -> float:
        return _rank(*measure([tuple(round(float(a), DECIMALS) for a in x)], round_, range(n), refined=True))[0]

    def done_round(intermediate_result: OptimizeResult) -> None:
        nonlocal round_, last
        point, value = min(measure.seen.items(), key=lambda pv: _rank(*pv))
        log.info("refinement round %d: gates %s, KL %.5f", round_, point, value)
        round_, gain, last = round_ + 1, last - value, value
        if not gain > REFINE_FTOL * abs(value) + REFINE_FLOOR:
            raise StopIteration

    # scipy's own criterion is relative only, so a KL near 0 would never meet it: ours ends the rounds.
    found = minimize(kl, np.asarray(best, dtype=float), method="Powell", bounds=[(grid[0], grid[-1])] * n,
                     callback=done_round, options={"xtol": tol, "ftol": 0.0, "maxiter": max_rounds})
    best, best_kl = min(measure.seen.items(), key=lambda pv: _rank(*pv))
    if found.status == 2:  # scipy: the iteration limit, before our criterion ended the rounds
        _stopped_short("refinement", max_rounds, best)
    return best, best_kl


def _stopped_short(search: str, rounds: int, best: Point) -> None:
    # Cut off while still moving, the search has not reached a minimum, and where it stops
    # depends on its path, which another CPU's rounding can change.
    log.warning("gate %s search stopped at gates %s after max_rounds = %d rounds with an alpha still moving: "
                "these gates need not be a minimum of calib KL (raise gates.max_rounds)", search, best, rounds)


def grid_winner(trace: Sequence[Mapping]) -> Point:
    """The coordinate search's choice: the best measured point before refinement."""
    return min(((row["gates"], row["kl"]) for row in trace if not row["refined"]), key=lambda pv: _rank(*pv))[0]


def neighbours(point: Point, grid: Sequence[float]) -> list[Point]:
    """``point`` with one layer's alpha one grid step down or up (inside the grid)."""
    index = {a: j for j, a in enumerate(grid)}
    if missing := [a for a in point if a not in index]:
        raise ValueError(f"gates {point}: alphas {missing} are not on the grid {list(grid)}")
    return [point[:i] + (grid[k],) + point[i + 1 :] for i, a in enumerate(point) for k in (index[a] - 1, index[a] + 1)
            if 0 <= k < len(grid)]


def contenders(winner: Point, best: Point, grid: Sequence[float]) -> list[tuple[str, Point]]:
    """The gate vectors that another CPU's rounding could have chosen instead of ``best``: the
    grid's winner when refinement moved off it, and each of the winner's grid neighbours."""
    roles = [("grid winner", winner), *(("grid neighbour", p) for p in neighbours(winner, grid))]
    return [(role, p) for role, p in roles if p != best]


def tie_test(chosen: np.ndarray, other: np.ndarray, idx: np.ndarray, level: float) -> dict[str, float | bool]:
    """Paired bootstrap of mean KL(other) - mean KL(chosen) over prompts, on the resamples ``idx``
    (``[B, n]`` prompt positions, :func:`postdiff.stats.bootstrap.stratified_indices`). A lower
    end not above 0 means the prompts cannot tell the two gate choices apart."""
    diff = other - chosen
    lo, hi = bootstrap.percentile_interval(diff[idx].mean(axis=1), level)
    return {"diff": float(diff.mean()), "lo": lo, "hi": hi, "tie": not lo > 0}


def kl_reference(it: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], batch_size: int) -> nn.Module | list[Tensor]:
    """IT's answer log-probs once for every grid point, or IT itself when they would not fit."""
    vocab = it.get_output_embeddings().weight.shape[0]
    need = sum(len(a) for _, a in pairs) * vocab * 4
    if need > REFERENCE_BYTES:
        log.info("IT log-probs need %.1f GiB: IT reruns per batch", need / 2**30)
        return it
    return reference_logprobs(it, pairs, batch_size)


def calibrate_gates(
    model: nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    variant: Variant,
    modules: Mapping[int, TopKSurrogate],
    means: Mapping[int, Tensor] | None,
    grid: Sequence[float],
    batch_size: int,
    reference: nn.Module | Sequence[Tensor],
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    tol: float | None = DEFAULT_TOL,
) -> tuple[dict[int, float], pl.DataFrame, dict[Point, np.ndarray]]:
    """Gates ``{layer: alpha}`` of ``variant``'s layers, the curve (layer ids, not indices) and
    the per-prompt KL of every measured gate vector."""
    layers = variant.layers
    per_prompt: dict[Point, np.ndarray] = {}
    # Every measured point edits these layers only, so the blocks up to the first run once per batch.
    cache = BlockCache(model, min(layers), REFERENCE_BYTES)

    def kl(points: list[Point]) -> list[float]:
        edits = {
            str(i): V.edits(replace(variant, gates=dict(zip(layers, p, strict=True))), modules, means)
            for i, p in enumerate(points)
        }
        out = variant_kl(model, pairs, batch_size, edits, reference, cache)
        per_prompt.update((p, out[str(i)].numpy()) for i, p in enumerate(points))
        return [float(out[str(i)].mean()) for i in range(len(points))]

    best, _, trace = coordinate_search(kl, len(layers), grid, max_rounds, tol)
    curve = pl.DataFrame(
        [
            {**row, "layer": layers[row["layer"]], "gates": json.dumps(dict(zip(map(str, layers), row["gates"])))}
            for row in trace
        ],
        schema=CURVE_SCHEMA,
    )
    return dict(zip(layers, best, strict=True)), curve, per_prompt


def choice_report(gates: Mapping[int, float], per_prompt: Mapping[Point, np.ndarray], curve: pl.DataFrame,
                  grid: Sequence[float], codes: np.ndarray, B: int, seed: int, level: float) -> dict:
    """The chosen gates' calib KL against the grid's winner and its neighbours (``compared``;
    ``tie`` when any is not clearly worse), ``not_measured`` neighbours, and ``tied``: every
    measured gate vector whose paired interval against the choice has a lower end not above 0."""
    best = tuple(gates.values())
    grid = check_grid(grid)
    names = [str(k) for k in gates]
    trace = [{"gates": tuple(json.loads(g).values()), "kl": v, "refined": r}
             for g, v, r in curve.select("gates", "kl", "refined").iter_rows()]

    # One set of slice-stratified resamples for every comparison (each drew the same ones).
    idx = bootstrap.stratified_indices(codes, B, np.random.default_rng(seed))

    def against(point: Point) -> dict:
        test = tie_test(per_prompt[best], per_prompt[point], idx, level)
        return {"gates": dict(zip(names, point)), "kl": float(per_prompt[point].mean()), **test}

    winner = grid_winner(trace)
    wanted = contenders(winner, best, grid)
    compared = [{"role": role, **against(p)} for role, p in wanted if p in per_prompt]
    tied = sorted((t for t in map(against, (p for p in per_prompt if p != best)) if t["tie"]), key=lambda t: t["kl"])
    return {
        "gates": dict(zip(names, best)), "kl": float(per_prompt[best].mean()), "tested_on": TESTED_ON,
        "grid_step": min((b - a for a, b in zip(grid, grid[1:])), default=math.inf), "level": level,
        "n_prompts": len(codes), "grid_winner": dict(zip(names, winner)), "compared": compared,
        "not_measured": [dict(zip(names, p)) for _, p in wanted if p not in per_prompt],
        "closest": min(compared, key=lambda c: c["diff"], default=None),
        "tie": any(c["tie"] for c in compared), "n_measured": len(per_prompt) - 1, "tied": tied, "n_tied": len(tied),
    }


def calibration_variant(mode: str, layers: int | Sequence[int], surrogates: Sequence[str], standardiser: str | None) -> Variant:
    """The variant whose gates are searched: ``full`` (surrogates, one per layer) or ``mean``."""
    if mode not in ("full", "mean"):
        raise ValueError(f"calibrate: mode must be 'full' or 'mean', got {mode!r}")
    layers = [int(layer) for layer in (layers if isinstance(layers, (list, tuple)) else [layers])]
    if len(set(layers)) != len(layers) or not layers:
        raise ValueError(f"calibrate: layers must be distinct and non-empty, got {layers}")
    if mode == "full" and len(surrogates) != len(layers):
        raise ValueError(f"calibrate: {len(surrogates)} surrogate files for {len(layers)} layers {layers}")
    if mode == "mean" and not standardiser:
        raise ValueError("calibrate: mode 'mean' needs input 'standardiser'")
    return Variant(
        name=f"calibrate_{mode}",
        mode=mode,
        gates={layer: 0.0 for layer in layers},
        surrogates=dict(zip(layers, surrogates, strict=True)) if mode == "full" else {},
        standardiser=standardiser if mode == "mean" else None,
    )


def calibrate(job: Job) -> None:
    """Stage: gates for one set of layers.

    input: ``split``, ``teacher`` (calib), ``surrogates`` (list, one per layer; mode full) or
    ``standardiser`` (mode mean); params: ``mode``, ``layers``, ``grid``, ``max_rounds``,
    ``refine`` and ``tol``, ``pt``, ``it``, ``dtype``, ``device``, ``batch_size``, ``bootstrap``
    (``B``, ``seed``, ``level`` of the tie test); output: ``gates`` (JSON), ``curve`` (Parquet)
    and ``choice`` (JSON: :func:`choice_report`).
    """
    p = job.params
    variant = calibration_variant(
        p["mode"], p["layers"], job.inputs("surrogates"), job.input.get("standardiser")
    )
    grid = check_grid(p.get("grid", DEFAULT_GRID))
    tol = float(p.get("tol", DEFAULT_TOL)) if p.get("refine", True) else None
    rows = read_rows(job.input["split"], job.input["teacher"])
    pair = load_pair(p["pt"], p["it"], p.get("dtype", "auto"), p.get("device", "auto"))
    modules, means = V.materialise(variant, next(pair.pt.parameters()).device)
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    batch_size = job.batch_size()
    reference = kl_reference(pair.it, pairs, batch_size)
    gates, curve, per_prompt = calibrate_gates(
        pair.pt, pairs, variant, modules, means, grid, batch_size, reference,
        int(p.get("max_rounds", DEFAULT_MAX_ROUNDS)), tol,
    )
    boot = p.get("bootstrap", {})
    codes = rows["slice"].replace_strict(list(metrics.SLICES), list(range(len(metrics.SLICES)))).to_numpy()
    choice = choice_report(gates, per_prompt, curve, grid, codes, int(boot.get("B", 10_000)), int(boot.get("seed", 0)),
                           float(boot.get("level", 0.95)))
    log.info("gates %s, calib KL %.5f (grid winner %s); %d of %d other measured gate vectors tie with it on %s",
             gates, choice["kl"], choice["grid_winner"], choice["n_tied"], choice["n_measured"], TESTED_ON)
    if choice["not_measured"]:
        log.info("grid neighbours %s were never measured, so not compared", choice["not_measured"])
    for c in (c for c in choice["compared"] if c["tie"]):
        log.warning("gates %s tie with the %s %s on calib KL: %+.5f [%.5f, %.5f]; results that depend on this "
                    "choice can move on another CPU", gates, c["role"], c["gates"], c["diff"], c["lo"], c["hi"])
    write_parquet(curve, job.output["curve"])
    write_json(choice, job.output["choice"])
    write_json({str(layer): alpha for layer, alpha in gates.items()}, job.output["gates"])
