"""Seeded, disjoint splits stratified by slice (SPEC §2): train, calib, selector, test.

Stage ``split_suite`` reads ``suite.parquet`` (written by ``postdiff.suite:build_suite``) and
writes one Parquet file per split. Sizes are prompts per slice and split. A slice with exactly
their total (the built-in suite) gets exactly those counts; a slice of a user suite with any
other number of prompts is split in the same proportions by largest remainder, so every
prompt lands in exactly one split; the log says so for each such slice.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import polars as pl

from postdiff.io import write_parquet
from postdiff.runtime import Job

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "calib", "selector", "test")


def _check_sizes(sizes: Mapping[str, int]) -> list[str]:
    unknown = set(sizes) - set(SPLITS)
    if unknown:
        raise ValueError(f"sizes name unknown split(s) {sorted(unknown)}; known: {', '.join(SPLITS)}")
    bad = {k: v for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 0}
    if bad or not sum(sizes.values()):
        raise ValueError(f"sizes must be non-negative integers with a positive total, got {dict(sizes)}")
    return [s for s in SPLITS if s in sizes]


def allocate(n: int, sizes: Mapping[str, int]) -> dict[str, int]:
    """``n`` prompts over the splits in proportion to ``sizes`` (largest remainder; ties go to
    the earlier split); exactly ``sizes`` when ``n`` equals their total."""
    names = _check_sizes(sizes)
    total = sum(sizes.values())
    counts = {s: n * sizes[s] // total for s in names}
    # Compare remainders as integers (n * size mod total) so no float rounding decides a tie.
    by_remainder = sorted(names, key=lambda s: (-(n * sizes[s] % total), SPLITS.index(s)))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    return counts


def assign_splits(df: pl.DataFrame, sizes: Mapping[str, int], seed: int) -> pl.DataFrame:
    """``df`` with a ``split`` column. Within each slice the ids, sorted, are shuffled by a
    generator seeded with ``seed`` and the slice, so the result ignores the row order."""
    names = _check_sizes(sizes)
    dup = df.filter(pl.col("id").is_duplicated())["id"].unique().sort().to_list()
    if dup:
        raise ValueError(f"suite ids must be unique; duplicated: {dup[:5]}")
    target = sum(sizes.values())
    split_of: dict[str, str] = {}
    for slice_name in sorted(df["slice"].unique().to_list()):
        ids = sorted(df.filter(pl.col("slice") == slice_name)["id"].to_list())
        counts = allocate(len(ids), sizes)
        if len(ids) != target:
            log.warning(
                "slice %s has %d prompts, not %d: split proportionally as %s", slice_name, len(ids), target, counts
            )
        random.Random(f"postdiff-split-{seed}-{slice_name}").shuffle(ids)
        start = 0
        for s in names:
            split_of.update(dict.fromkeys(ids[start : start + counts[s]], s))
            start += counts[s]
    return df.with_columns(pl.col("id").replace_strict(split_of, return_dtype=pl.Utf8).alias("split"))


def split_suite(job: Job) -> None:
    """Stage: input ``suite``; params ``sizes`` and ``seed``; outputs one Parquet per split."""
    df = assign_splits(pl.read_parquet(job.input["suite"]), job.params["sizes"], int(job.params["seed"]))
    table = df.pivot("split", index="slice", values="id", aggregate_function="len")
    log.info("prompts per slice and split:\n%s", table)
    for s in SPLITS:
        write_parquet(df.filter(pl.col("split") == s), job.output[s])
