"""Cutting a split into shards that run as separate jobs, and joining their outputs again."""

from __future__ import annotations

import polars as pl

from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job


def shard_rows(rows: pl.DataFrame, shard: int, n_shards: int) -> pl.DataFrame:
    """Rows ``shard, shard + n_shards, ...``: strided, so every shard mixes slices and lengths."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} is not in 0..{n_shards - 1}")
    return rows.gather_every(n_shards, offset=shard)


def merge(job: Job) -> None:
    """Stage: input ``shards`` (Parquets with an ``id`` column) -> output ``merged``, sorted by id."""
    frames = [pl.read_parquet(path) for path in job.input["shards"]]
    merged = pl.concat(frames)
    if merged["id"].is_duplicated().any():
        raise ValueError(f"shards {list(job.input['shards'])} overlap: duplicated prompt ids")
    write_parquet(merged.sort("id"), job.output["merged"])
