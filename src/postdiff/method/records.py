"""The records' contract, with no model: a split's prompts joined with their teacher completions,
the per-prompt record of a text (its checker endpoints) and IT's records, which are its teacher
rows. Apart from generation (:mod:`postdiff.method.evaluate`) so that IT's evaluation job (rule
``evaluate_teacher``) and the stages that only read records import no torch.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import polars as pl

from postdiff.data.checkers import parse_checker, score
from postdiff.method.spec import Variant
from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job
from postdiff.workflow.shards import shard_rows

log = logging.getLogger(__name__)

RECORD_SCHEMA = {
    "id": pl.String,
    "slice": pl.String,
    "variant": pl.String,
    "text": pl.String,
    "n_tokens": pl.Int64,
    "eos": pl.Boolean,
    "em": pl.Boolean,
    "lenient": pl.Boolean,
    "format_pass": pl.Boolean,
    "words": pl.Int64,
    "brevity_excess": pl.Float64,
    "refusal": pl.Boolean,
    "kl": pl.Float64,
}
SPLIT_COLUMNS = ("id", "slice", "prompt", "gold", "checker")
TEACHER_COLUMNS = ("id", "slice", "prefix_ids", "token_ids", "text", "eos", "n_tokens")
# Teacher columns carried next to the split's, renamed so they never clash with a variant's.
TEACHER_RENAME = {"text": "teacher_text", "eos": "teacher_eos", "n_tokens": "teacher_n_tokens"}


def _require(df: pl.DataFrame, columns: Sequence[str], path: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")


def join_teacher(
    split: pl.DataFrame, teacher: pl.DataFrame, split_path: str = "split", teacher_path: str = "teacher"
) -> pl.DataFrame:
    """The split's rows, in its order, with their teacher completion; both must hold the same
    prompts with the same slices."""
    _require(split, SPLIT_COLUMNS, split_path)
    _require(teacher, TEACHER_COLUMNS, teacher_path)
    for df, path in ((split, split_path), (teacher, teacher_path)):
        dup = df.filter(pl.col("id").is_duplicated())
        if dup.height:
            raise ValueError(f"{path}: duplicated prompt id {dup['id'][0]!r}")
    for pid, slice_name, checker in split.select("id", "slice", "checker").iter_rows():
        try:
            parse_checker(checker, slice_name)
        except ValueError as err:
            # Checked before generation, which would otherwise fail only when scoring.
            raise ValueError(f"{split_path}: prompt {pid!r}: {err}") from err
    extra = set(teacher["id"]) - set(split["id"])
    if extra:
        raise ValueError(f"{teacher_path}: prompt {sorted(extra)[0]!r} is not in {split_path} ({len(extra)} such)")
    joined = split.join(
        teacher.select(TEACHER_COLUMNS).rename({"slice": "teacher_slice", **TEACHER_RENAME}),
        on="id",
        how="left",
        maintain_order="left",
    )
    lost = joined.filter(pl.col("prefix_ids").is_null())
    if lost.height:
        raise ValueError(f"{teacher_path}: no completion for prompt {lost['id'][0]!r} ({lost.height} missing)")
    moved = joined.filter(pl.col("slice") != pl.col("teacher_slice"))
    if moved.height:
        raise ValueError(
            f"{teacher_path}: prompt {moved['id'][0]!r} has slice {moved['teacher_slice'][0]!r}, "
            f"but {moved['slice'][0]!r} in {split_path}"
        )
    empty = joined.filter((pl.col("prefix_ids").list.len() == 0) | (pl.col("token_ids").list.len() == 0))
    if empty.height:
        raise ValueError(f"{teacher_path}: prompt {empty['id'][0]!r} has empty prefix_ids or token_ids")
    return joined.drop("teacher_slice")


def check_budget(rows: pl.DataFrame, max_new_tokens: int, teacher_path: str = "teacher") -> None:
    """Variants must be generated under the teacher's token budget, or IT and the variants
    would be compared on different lengths."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    longest = int(rows["teacher_n_tokens"].max() or 0)
    if longest > max_new_tokens:
        raise ValueError(
            f"{teacher_path}: teacher completions run to {longest} tokens, longer than "
            f"max_new_tokens={max_new_tokens}; use the teacher's max_new_tokens"
        )


def records_frame(
    rows: pl.DataFrame,
    variant: str,
    outputs: Sequence[tuple[Sequence[int], bool]],
    texts: Sequence[str],
    kl: Sequence[float] | None,
    keep: Sequence[str] = (),
) -> pl.DataFrame:
    """Contract records: checker endpoints of each text; ``kl`` None leaves the column null;
    ``keep`` names columns of ``rows`` to carry along (e.g. ``candidate``)."""
    scored = [
        score(s, c, list(g), t)
        for s, c, g, t in zip(rows["slice"], rows["checker"], rows["gold"], texts, strict=True)
    ]
    frame = pl.DataFrame(
        {
            "id": rows["id"],
            "slice": rows["slice"],
            "variant": [variant] * rows.height,
            "text": list(texts),
            "n_tokens": [len(ids) - int(eos) for ids, eos in outputs],
            "eos": [eos for _, eos in outputs],
            **{k: [s[k] for s in scored] for k in ("em", "lenient", "format_pass", "words", "brevity_excess", "refusal")},
            "kl": list(kl) if kl is not None else [None] * rows.height,
        },
        schema=RECORD_SCHEMA,
    )
    return frame.with_columns(rows.select(keep)) if keep else frame


def teacher_records(rows: pl.DataFrame, variant: str) -> pl.DataFrame:
    """IT's records are its teacher completions: regenerating would only repeat them, and
    KL(IT || IT) is 0 by definition."""
    outputs = list(zip(rows["token_ids"].to_list(), rows["teacher_eos"].to_list(), strict=True))
    return records_frame(rows, variant, outputs, rows["teacher_text"].to_list(), [0.0] * rows.height)


def read_rows(split_path: str, teacher_path: str) -> pl.DataFrame:
    return join_teacher(pl.read_parquet(split_path), pl.read_parquet(teacher_path), split_path, teacher_path)


def variant_rows(job: Job) -> tuple[Variant, pl.DataFrame]:
    """A variant job's spec (input ``variant``) and its shard (params ``shard`` of ``n_shards``) of
    the split's teacher-joined rows (``split``, ``teacher``), within the ``max_new_tokens`` budget."""
    variant = Variant.read(job.input["variant"])
    rows = read_rows(job.input["split"], job.input["teacher"])
    rows = shard_rows(rows, int(job.params.get("shard", 0)), int(job.params.get("n_shards", 1)))
    check_budget(rows, int(job.params["max_new_tokens"]), job.input["teacher"])
    log.info("variant %s (%s): %d prompts from %s", variant.name, variant.mode, rows.height, job.input["split"])
    return variant, rows


def write_records(records: pl.DataFrame, path: str) -> None:
    # Sorted by id as the merge of shards is: one unsharded job writes the merged file's bytes.
    write_parquet(records.sort("id"), path)


def teacher_variant(job: Job) -> None:
    """Stage: IT's records on one split, from its teacher rows; inputs, ``max_new_tokens`` and
    output as :func:`postdiff.method.evaluate.evaluate_variant`'s, and no model."""
    variant, rows = variant_rows(job)
    if variant.mode != "it":
        raise ValueError(f"{job.input['variant']}: variant {variant.name!r} has mode {variant.mode!r}; "
                         "only IT's records are its teacher rows")
    write_records(teacher_records(rows, variant.name), job.output["records"])
