"""The threshold sweep's summary: how each cutoff's pool and mask compare with the locked mask's."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

import polars as pl

from postdiff.method.selection.maskfile import forced, mask_of, read_mask_file
from postdiff.method.selection.search import RULES, Pair, candidates
from postdiff.workflow.io import write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)


def jaccard(a: Sequence[Pair], b: Sequence[Pair]) -> float:
    """|a & b| / |a | b|; two empty sets are the same set (1)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return 1.0 if not a | b else len(a & b) / len(a | b)


SWEEP_SCHEMA = {"rule": pl.String, "cutoff": pl.Float64, "exclusion": pl.Float64, "strict": pl.Boolean,
                "n_admitted": pl.Int64, "n_pool": pl.Int64, "cap_bound": pl.Boolean, "pool_jaccard": pl.Float64,
                "n_features": pl.Int64, "mask": pl.String, "mask_jaccard": pl.Float64, "same_as_locked": pl.Boolean,
                "objective": pl.Float64, "forced": pl.Boolean, "pools_differ": pl.Boolean}


# A sweep point: (verb_exclusion, cap_cutoff), as numbers or in their path form.
Point = tuple[float | str, float | str]


def pool_owner(scores: pl.DataFrame, points: Sequence[Point], point: Point, max_candidates: int | None) -> Point:
    """The first of ``points`` (then ``point`` itself) whose CapMask candidate pool is
    ``point``'s. Selection reads nothing of a point but its pool, so two points with one pool
    select the same mask: only the owner selects, and the others copy its result."""
    def pool(p: Point) -> list[Pair]:
        return candidates(scores, RULES["cap"], float(p[1]), float(p[0]), max_candidates)

    mine = pool(point)
    return next(p for p in [*points, point] if p == point or pool(p) == mine)


def sweep_table(masks: Sequence[Mapping], locked: Mapping) -> pl.DataFrame:
    """One row per sweep point: its thresholds (``strict``: another exclusion than the locked
    mask's), the features admitted before the candidate cap and the pool after it, whether the
    cap bound, the Jaccard index of its pool and mask with the locked ones, its objective,
    ``forced`` (:func:`~postdiff.method.selection.maskfile.forced`: every step a tie and the mask
    its pool's top by score) and ``pools_differ``: whether any two points under the locked
    exclusion had different pools. The strict point does not count there: its exclusion, not
    its cutoff, changed its pool. When no pools differ, or every mask is forced, agreeing with
    the locked mask says nothing about the cutoffs."""
    locked_pairs = [tuple(p) for p in locked.get("pool", [])]
    locked_mask = [(layer, f) for layer, fs in mask_of(locked).items() for f in fs]
    pools = [sorted(tuple(p) for p in obj.get("pool", [])) for obj in masks]
    strict = [obj.get("exclusion") != locked.get("exclusion") for obj in masks]
    if all(strict):
        raise ValueError(f"sweep: no point has the locked mask's exclusion {locked.get('exclusion')}")
    differ = len({tuple(p) for p, s in zip(pools, strict) if not s}) > 1
    rows = []
    for obj, pool, is_strict in zip(masks, pools, strict):
        mask = mask_of(obj)
        pairs = [(layer, f) for layer, fs in mask.items() for f in fs]
        rows.append({
            "rule": obj.get("rule"),
            "cutoff": obj.get("cutoff"),
            "exclusion": obj.get("exclusion"),
            "strict": is_strict,
            "n_admitted": obj.get("n_admitted"),
            "n_pool": len(pool),
            "cap_bound": obj.get("cap_bound"),
            "pool_jaccard": jaccard(pool, locked_pairs),
            "n_features": len(pairs),
            "mask": json.dumps({str(k): v for k, v in mask.items()}),
            "mask_jaccard": jaccard(pairs, locked_mask),
            "same_as_locked": mask == mask_of(locked),
            "objective": obj.get("objective"),
            "forced": forced(obj),
            "pools_differ": differ,
        })
    return pl.DataFrame(rows, schema=SWEEP_SCHEMA).sort(["rule", "strict", "cutoff"], nulls_last=True)


def sweep_summary(job: Job) -> None:
    """Stage: input ``masks`` (per-cutoff mask JSONs), ``locked`` (the locked mask JSON);
    output ``summary`` (Parquet) and, when named, ``csv``."""
    paths = job.input["masks"]
    paths = [paths] if isinstance(paths, str) else list(paths)
    table = sweep_table([read_mask_file(path) for path in paths], read_mask_file(job.input["locked"]))
    cutoffs = table.filter(~pl.col("strict"))
    if not table["pools_differ"].any():
        log.warning("every locked-exclusion sweep point selected from the same candidate pool: the sweep cannot "
                    "tell its cutoffs apart (pool of %d; cap bound at %d of %d points)", cutoffs["n_pool"][0],
                    int(cutoffs["cap_bound"].sum()), cutoffs.height)
    if cutoffs["forced"].all():
        log.warning("every locked-exclusion sweep point is forced: every step was a tie and each mask is its pool's top "
                    "%s by score, so reproducing the locked mask comes from the score order, not from selection",
                    "/".join(map(str, cutoffs["n_features"].unique(maintain_order=True))))
    write_parquet(table, job.output["summary"])
    if "csv" in job.output:
        write_text(table.write_csv(), job.output["csv"])
