"""The qualitative page: a few prompts of each slice with every main variant's output."""

from __future__ import annotations

import html
import random
from collections.abc import Mapping, Sequence

import polars as pl

from postdiff.workflow.io import write_text
from postdiff.workflow.runtime import Job


def pick_prompts(suite: pl.DataFrame, per_slice: int, seed: int) -> pl.DataFrame:
    """``per_slice`` seeded prompts from each slice, in slice order."""
    rng = random.Random(f"postdiff-qualitative-{seed}")
    chosen = []
    for slice_name in suite["slice"].unique(maintain_order=True):
        ids = sorted(suite.filter(pl.col("slice") == slice_name)["id"].to_list())
        chosen += sorted(rng.sample(ids, min(per_slice, len(ids))))
    return suite.filter(pl.col("id").is_in(chosen)).sort(["slice", "id"])


def side_by_side(prompts: pl.DataFrame, outputs: Mapping[str, pl.DataFrame]) -> pl.DataFrame:
    """One row per prompt: slice, prompt, gold, and one text column per variant."""
    table = prompts.select("id", "slice", "prompt", pl.col("gold").list.join(" | ").alias("gold"))
    for name, df in outputs.items():
        table = table.join(df.select("id", pl.col("text").alias(name)), on="id", how="left")
    return table


def render_html(table: pl.DataFrame, variants: Sequence[str]) -> str:
    cell = lambda v: f"<td><pre>{html.escape(str(v if v is not None else ''))}</pre></td>"  # noqa: E731
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["slice", "prompt", "gold", *variants])
    rows = "".join(
        "<tr>" + "".join(cell(r[c]) for c in ["slice", "prompt", "gold", *variants]) + "</tr>"
        for r in table.iter_rows(named=True)
    )
    style = "table{border-collapse:collapse;font:13px sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}pre{white-space:pre-wrap;margin:0;max-width:28em}"
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Qualitative outputs</title><style>{style}</style></head><body><h1>Qualitative outputs</h1><table><tr>{head}</tr>{rows}</table></body></html>\n"


def qualitative(job: Job) -> None:
    """Stage: input ``suite`` (test split) and ``evals`` (Parquets, in ``params.variants`` order)."""
    variants = list(job.params["variants"])
    outputs = {name: pl.read_parquet(path) for name, path in zip(variants, job.input["evals"], strict=True)}
    prompts = pick_prompts(pl.read_parquet(job.input["suite"]), job.params["per_slice"], job.params["seed"])
    write_text(render_html(side_by_side(prompts, outputs), variants), job.output["html"])
