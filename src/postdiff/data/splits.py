"""Seeded, disjoint splits stratified by slice (SPEC §2): train, calib, selector, test.

Stage ``split_suite`` reads ``suite.parquet`` (written by ``postdiff.data.suite:build_suite``) and
writes one Parquet file per split. Sizes are prompts per slice and split. A slice with exactly
their total (the built-in suite) gets exactly those counts; a slice of a user suite with any
other number of prompts is split in the same proportions by largest remainder, so every
prompt lands in exactly one split; the log says so for each such slice.

A suite may carry a ``group`` column (the real-world suite does): prompts of one group (one
fact, one request template) are kept in one split, so nothing a split is fitted on is asked
again in another. Groups are shuffled and laid end to end before the cut; a group that a cut
would divide is divided, and the log counts such groups. Without the column each prompt is its
own group, which is the plain per-prompt split.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping

import polars as pl

from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "calib", "selector", "test")
GROUP = "group"


def check_sizes(sizes: Mapping[str, int]) -> list[str]:
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
    names = check_sizes(sizes)
    total = sum(sizes.values())
    counts = {s: n * sizes[s] // total for s in names}
    # Compare remainders as integers (n * size mod total) so no float rounding decides a tie.
    by_remainder = sorted(names, key=lambda s: (-(n * sizes[s] % total), SPLITS.index(s)))
    for s in by_remainder[: n - sum(counts.values())]:
        counts[s] += 1
    return counts


def _group_keys(df: pl.DataFrame) -> pl.Series:
    """Each row's group: the ``group`` column, or the id; a group must lie in one slice."""
    if GROUP not in df.columns:
        return df["id"]
    if df[GROUP].is_null().any():
        raise ValueError(f"suite column {GROUP!r} is null for prompt {df.filter(pl.col(GROUP).is_null())['id'][0]!r}")
    spans = df.group_by(GROUP).agg(pl.col("slice").unique().sort()).filter(pl.col("slice").list.len() > 1)
    if spans.height:
        raise ValueError(f"suite group {spans[GROUP][0]!r} spans slices {spans['slice'][0].to_list()}; "
                         "a group must lie in one slice")
    return df[GROUP]


def _ordered(ids: list[str], groups: list[str], rng: random.Random) -> list[tuple[str, str]]:
    """``(id, group)`` with each group's members together (sorted), groups in a shuffled order.
    With one id per group this is ``rng.shuffle(sorted(ids))``, the plain per-prompt split."""
    members: dict[str, list[str]] = {}
    for i, g in sorted(zip(ids, groups)):
        members.setdefault(g, []).append(i)
    order = sorted(members)
    rng.shuffle(order)
    return [(i, g) for g in order for i in members[g]]


def assign_splits(df: pl.DataFrame, sizes: Mapping[str, int], seed: int) -> pl.DataFrame:
    """``df`` with a ``split`` column. Within each slice the groups (see the module docstring),
    sorted, are shuffled by a generator seeded with ``seed`` and the slice, so the result
    ignores the row order."""
    names = check_sizes(sizes)
    dup = df.filter(pl.col("id").is_duplicated())["id"].unique().sort().to_list()
    if dup:
        raise ValueError(f"suite ids must be unique; duplicated: {dup[:5]}")
    df_groups = df.select("id", "slice", _group_keys(df).alias("_group"))
    target = sum(sizes.values())
    split_of: dict[str, str] = {}
    for slice_name in sorted(df["slice"].unique().to_list()):
        rows = df_groups.filter(pl.col("slice") == slice_name)
        counts = allocate(rows.height, sizes)
        if rows.height != target:
            log.warning(
                "slice %s has %d prompts, not %d: split proportionally as %s", slice_name, rows.height, target, counts
            )
        rng = random.Random(f"postdiff-split-{seed}-{slice_name}")
        ordered = _ordered(rows["id"].to_list(), rows["_group"].to_list(), rng)
        splits_of_group: dict[str, set[str]] = {}
        start = 0
        for s in names:
            for i, g in ordered[start : start + counts[s]]:
                split_of[i] = s
                splits_of_group.setdefault(g, set()).add(s)
            start += counts[s]
        divided = sorted(g for g, found in splits_of_group.items() if len(found) > 1)
        if divided:
            log.warning("slice %s: %d group(s) divided between splits (sizes not a multiple of the group "
                        "sizes): %s", slice_name, len(divided), divided[:5])
    return df.with_columns(pl.col("id").replace_strict(split_of, return_dtype=pl.Utf8).alias("split"))


def split_suite(job: Job) -> None:
    """Stage: input ``suite``; params ``sizes`` and ``seed``; outputs one Parquet per split."""
    df = assign_splits(pl.read_parquet(job.input["suite"]), job.params["sizes"], int(job.params["seed"]))
    table = df.pivot("split", index="slice", values="id", aggregate_function="len")
    log.info("prompts per slice and split:\n%s", table)
    for s in SPLITS:
        write_parquet(df.filter(pl.col("split") == s), job.output[s])
