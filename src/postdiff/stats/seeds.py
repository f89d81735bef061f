"""Results across surrogate seeds: every seed's Table 1 side by side with the mean and range. (The
figure of the spread is :func:`postdiff.stats.figures.seed_figure`; how stable the masks are is
:mod:`postdiff.outputs.stability`.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import polars as pl

from postdiff.stats import tables
from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

def _check_same_rows(tables_by_seed: Mapping[int, pl.DataFrame]) -> tuple[list[str], list[str]]:
    """The first table's variants and metrics, after checking every table has the same ones."""
    first_seed, first = next(iter(tables_by_seed.items()))
    variants, metric_names = first["Variant"].to_list(), [c for c in first.columns if c != "Variant"]
    for seed, table in tables_by_seed.items():
        names = table["Variant"].to_list()
        if len(set(names)) != len(names):
            raise ValueError(f"seed {seed}: duplicated variants in {names}")
        if set(names) != set(variants):
            raise ValueError(f"seed {seed}: variants differ from seed {first_seed}'s: missing "
                             f"{sorted(set(variants) - set(names))}, extra {sorted(set(names) - set(variants))}")
        if set(table.columns) - {"Variant"} != set(metric_names):
            raise ValueError(f"seed {seed}: metric columns {table.columns[1:]} differ from seed "
                             f"{first_seed}'s {metric_names}")
    return variants, metric_names


def across_seeds(tables_by_seed: Mapping[int, pl.DataFrame]) -> pl.DataFrame:
    """One row per variant and metric (variants in the first table's order, metrics in its
    column order): every seed's estimate as ``seed_<N>`` (seeds in the mapping's order), then
    ``n_finite``, ``mean``, ``min`` and ``max`` over the seeds whose estimate is not NaN (CapRec
    is NaN where the PT-to-IT gap is zero); all NaN gives NaN, with ``n_finite`` 0."""
    if not tables_by_seed:
        raise ValueError("across_seeds: no tables given")
    variants, metric_names = _check_same_rows(tables_by_seed)
    # [variant, metric, seed]; nulls (a column read back empty) are NaN too.
    values = np.stack([
        t.select(pl.col(m).cast(pl.Float64).fill_null(math.nan) for m in metric_names)
        .to_numpy()[[t["Variant"].to_list().index(v) for v in variants]]
        for t in tables_by_seed.values()], -1)
    known = ~np.isnan(values)
    n = known.sum(-1)
    with np.errstate(invalid="ignore"):
        mean = np.where(known, values, 0.0).sum(-1) / n
    lo = np.where(n > 0, np.where(known, values, np.inf).min(-1), np.nan)
    hi = np.where(n > 0, np.where(known, values, -np.inf).max(-1), np.nan)
    flat = values.reshape(-1, len(tables_by_seed))
    return pl.DataFrame({
        "Variant": np.repeat(variants, len(metric_names)).tolist(),
        "Metric": metric_names * len(variants),
        **{f"seed_{s}": flat[:, k] for k, s in enumerate(tables_by_seed)},
        "n_finite": n.reshape(-1).astype(np.int64),
        "mean": mean.reshape(-1), "min": lo.reshape(-1), "max": hi.reshape(-1),
    })


def seed_table(job: Job) -> None:
    """Stage. input.tables: every seed's table1.csv, in the order of params.seeds (ints);
    output.csv/md/tex (as Table 1's) and output.parquet (what :func:`postdiff.stats.figures.seed_figure` reads)."""
    paths, seeds = job.inputs("tables"), [int(s) for s in job.params["seeds"]]
    if len(paths) != len(seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seed_table: need one table per distinct seed, got {len(paths)} tables for seeds {seeds}")
    table = across_seeds({seed: pl.read_csv(path) for seed, path in zip(seeds, paths)})
    tables.write_all(table, table, None, job.output)
    write_parquet(table, job.output["parquet"])
    log.info("across seeds %s: %d variants x metrics", seeds, table.height)
