"""The selector split as scoring and selection read it: the FullDelta spec, the selector prompts
joined with their teacher completions, and records aligned to them, each checked. No model: a
selection job that copies another sweep point's selection, or merges a sharded step, reads
these and never imports torch."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from postdiff.method.records import join_teacher
from postdiff.method.spec import Variant
from postdiff.workflow.runtime import Job


def check_selector(split: pl.DataFrame, path: str) -> None:
    """Scoring and selection must never see held-out prompts."""
    if "split" in split.columns and (split["split"] == "test").any():
        raise ValueError(f"{path}: holds test-split prompts; scoring and selection read the selector split only")


def selector_inputs(job: Job, stage: str) -> tuple[Variant, pl.DataFrame]:
    """The FullDelta spec (input ``variant``) and the selector prompts (``split``) joined with
    their teacher completions (``teacher``), each checked."""
    variant = Variant.read(job.input["variant"])
    if variant.mode != "full":
        raise ValueError(f"{job.input['variant']}: {stage} needs the FullDelta spec, got mode {variant.mode!r}")
    split = pl.read_parquet(job.input["split"])
    check_selector(split, job.input["split"])
    return variant, join_teacher(split, pl.read_parquet(job.input["teacher"]), job.input["split"], job.input["teacher"])


def aligned_records(records: pl.DataFrame, ids: Sequence[str], path: str) -> pl.DataFrame:
    """``records`` in the order of ``ids``; they must hold exactly those prompts."""
    if records.height != len(ids) or set(records["id"]) != set(ids):
        raise ValueError(f"{path}: records hold {records.height} prompts, not the {len(ids)} of the split")
    return pl.DataFrame({"id": list(ids)}).join(records, on="id", how="left", maintain_order="left")
