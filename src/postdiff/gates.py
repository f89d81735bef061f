"""Per-layer gates ``alpha_l``, chosen on calib to minimise answer-phase KL(IT || variant) (SPEC §5).

Search: the grid's diagonal first (every layer sharing one alpha), then coordinate rounds, one
layer at a time from the earliest (later layers see the earlier layers' edits), until a round
moves nothing or ``max_rounds`` is reached. Starting from the best shared alpha rather than
from all-0 or all-1 costs one grid sweep and, since each coordinate move must strictly lower
KL (or keep it and shrink the edit), guarantees the result is no worse than PT (alpha 0), than
the surrogate as trained (alpha 1), or than any other shared alpha. Ties go to the smaller
edit, so an edit that only hurts, or does nothing, is gated to 0.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import polars as pl
from torch import Tensor, nn

from postdiff import variants as V
from postdiff.evaluate import read_rows
from postdiff.forward import reference_logprobs, variant_kl
from postdiff.io import write_json, write_parquet
from postdiff.models import load_pair
from postdiff.runtime import Job
from postdiff.surrogate import TopKSurrogate
from postdiff.spec import Variant

log = logging.getLogger(__name__)

DEFAULT_GRID = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5)
DEFAULT_MAX_ROUNDS = 3
# IT log-probs of the whole calib split are kept when they fit in this many bytes; beyond it
# (262k-token vocabularies) IT runs once per batch of each coordinate step instead.
REFERENCE_BYTES = 2 << 30

Point = tuple[float, ...]
CURVE_SCHEMA = {
    "round": pl.Int64,
    "layer": pl.Int64,
    "alpha": pl.Float64,
    "kl": pl.Float64,
    "shared": pl.Boolean,
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


def coordinate_search(
    kl: Callable[[list[Point]], list[float]], n_layers: int, grid: Sequence[float], max_rounds: int = DEFAULT_MAX_ROUNDS
) -> tuple[Point, float, list[dict]]:
    """Best gate vector, its KL, and every measured point as curve rows.

    ``kl`` maps gate vectors to mean KL; each vector is measured once. Curve rows carry the
    index of the layer moved (every layer for the shared sweep, round 0).
    """
    if n_layers < 1:
        raise ValueError("coordinate_search needs at least one layer")
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
    grid = check_grid(grid)
    seen: dict[Point, float] = {}
    trace: list[dict] = []

    def measure(points: list[Point], round_: int, layers: Sequence[int], shared: bool) -> tuple[Point, float]:
        new = [p for p in dict.fromkeys(points) if p not in seen]
        if new:
            seen.update(zip(new, (float(v) for v in kl(new)), strict=True))
        for p in points:
            for i in layers:
                trace.append(dict(round=round_, layer=i, alpha=p[i], kl=seen[p], shared=shared, gates=p))
        return min(((p, seen[p]) for p in points), key=lambda pv: _rank(*pv))

    best, best_kl = measure([(a,) * n_layers for a in grid], 0, range(n_layers), True)
    log.info("shared sweep: alpha %s, KL %.5f", best[0], best_kl)
    # With one layer the shared sweep already covers the whole grid.
    for round_ in range(1, max_rounds + 1 if n_layers > 1 else 1):
        moved = False
        for i in range(n_layers):
            point, value = measure([best[:i] + (a,) + best[i + 1 :] for a in grid], round_, [i], False)
            if _rank(point, value) < _rank(best, best_kl):
                best, best_kl, moved = point, value, True
        log.info("round %d: gates %s, KL %.5f", round_, best, best_kl)
        if not moved:
            break
    return best, best_kl, trace


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
) -> tuple[dict[int, float], pl.DataFrame]:
    """Gates ``{layer: alpha}`` of ``variant``'s layers and the curve (layer ids, not indices)."""
    layers = variant.layers

    def kl(points: list[Point]) -> list[float]:
        edits = {
            str(i): V.edits(replace(variant, gates=dict(zip(layers, p, strict=True))), modules, means)
            for i, p in enumerate(points)
        }
        out = variant_kl(model, pairs, batch_size, edits, reference)
        return [float(out[str(i)].mean()) for i in range(len(points))]

    best, _, trace = coordinate_search(kl, len(layers), grid, max_rounds)
    curve = pl.DataFrame(
        [
            {**row, "layer": layers[row["layer"]], "gates": json.dumps(dict(zip(map(str, layers), row["gates"])))}
            for row in trace
        ],
        schema=CURVE_SCHEMA,
    )
    return dict(zip(layers, best, strict=True)), curve


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
    ``standardiser`` (mode mean); params: ``mode``, ``layers``, ``grid``, ``max_rounds``, ``pt``,
    ``it``, ``dtype``, ``device``, ``batch_size``; output: ``gates`` (JSON), ``curve`` (Parquet).
    """
    p = job.params
    variant = calibration_variant(
        p["mode"], p["layers"], job.inputs("surrogates"), job.input.get("standardiser")
    )
    grid = check_grid(p.get("grid", DEFAULT_GRID))
    rows = read_rows(job.input["split"], job.input["teacher"])
    pair = load_pair(p["pt"], p["it"], p.get("dtype", "auto"), p.get("device", "auto"))
    modules, means = V.materialise(variant, next(pair.pt.parameters()).device)
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    batch_size = job.batch_size()
    reference = kl_reference(pair.it, pairs, batch_size)
    gates, curve = calibrate_gates(
        pair.pt, pairs, variant, modules, means, grid, batch_size, reference, int(p.get("max_rounds", DEFAULT_MAX_ROUNDS))
    )
    log.info("gates %s", gates)
    write_parquet(curve, job.output["curve"])
    write_json({str(layer): alpha for layer, alpha in gates.items()}, job.output["gates"])
