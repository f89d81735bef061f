"""Generation under a variant, scored into per-prompt records (SPEC §8).

The one path from a variant to evaluation records: final evaluation, feature scoring and mask
selection all call it, so a variant means the same thing everywhere. Prompts are the teacher's
exact ``prefix_ids``; KL is teacher-forced on the IT completion.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import polars as pl
import torch
from torch import Tensor, nn

from postdiff.data.checkers import parse_checker, score
from postdiff.method import variants as V
from postdiff.method.spec import MASKED, Variant
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.forward import EditFactory, Edits, grouped_batches, variant_kl
from postdiff.models.generation import Verified, generate, verify_then_generate
from postdiff.models.loading import load_model, load_pair
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


def generate_records(
    model: nn.Module,
    tokenizer,
    rows: pl.DataFrame,
    variant: str,
    max_new_tokens: int,
    batch_size: int,
    edits: Edits | None = None,
    edit_factory: EditFactory | None = None,
    keep: Sequence[str] = (),
    batches: Sequence[list[int]] | None = None,
) -> pl.DataFrame:
    """Greedy generation from the teacher's prefixes under the edits, scored (``kl`` null).

    Rows may repeat a prompt (one row per candidate mask): ``edit_factory`` gets row indices.
    """
    outputs = generate(
        model, tokenizer, rows["prefix_ids"].to_list(), max_new_tokens, batch_size, edits=edits, edit_factory=edit_factory,
        batches=batches,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
    return records_frame(rows, variant, outputs, texts, None, keep)


def answer_kl(
    model: nn.Module, rows: pl.DataFrame, edits: Edits, batch_size: int, reference: nn.Module | Sequence[Tensor]
) -> list[float]:
    """Per-prompt mean answer-phase KL(IT || variant), teacher-forced on the IT completion."""
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    return variant_kl(model, pairs, batch_size, {"v": edits}, reference)["v"].tolist()


def evaluate(
    model: nn.Module | None,
    tokenizer,
    rows: pl.DataFrame,
    variant: Variant,
    edits: Edits,
    max_new_tokens: int,
    batch_size: int,
    reference: nn.Module | Sequence[Tensor] | None,
) -> pl.DataFrame:
    """Records of ``variant`` on teacher-joined ``rows``; ``reference`` None skips KL (null)."""
    if variant.mode == "it":
        return teacher_records(rows, variant.name)
    records = generate_records(model, tokenizer, rows, variant.name, max_new_tokens, batch_size, edits=edits)
    if reference is None:
        return records
    return records.with_columns(pl.Series("kl", answer_kl(model, rows, edits, batch_size, reference), dtype=pl.Float64))


def stacked_masks(masks: Sequence[Mapping[int, Sequence[int]]], modules: Mapping[int, TopKSurrogate]) -> dict[int, Tensor]:
    """``{layer: [C, F]}`` boolean rows, one per candidate mask."""
    out = {}
    for layer, sae in modules.items():
        rows = [V.feature_mask(m.get(layer, []), sae.n_features, sae.b_dec.device) for m in masks]
        out[layer] = torch.stack(rows)
    return out


def _candidates(
    rows: pl.DataFrame, variant: Variant, modules: Mapping[int, TopKSurrogate], masks: Sequence[Mapping[int, Sequence[int]]]
) -> tuple[pl.DataFrame, EditFactory]:
    """Rows tiled over the masks (``candidate`` column; copy ``c`` of row ``i`` is ``c * n + i``)
    and the factory giving each tiled row its mask's edits."""
    if variant.mode not in MASKED:
        raise ValueError(f"variant {variant.name!r}: mode {variant.mode!r} takes no mask (one of {MASKED})")
    if not masks:
        raise ValueError("evaluate_masks: no masks given")
    n = rows.height
    tiled = pl.concat([rows.with_columns(pl.lit(c, dtype=pl.Int64).alias("candidate")) for c in range(len(masks))])
    stack = stacked_masks(masks, modules)

    def factory(idx: list[int]) -> Edits:
        cand = torch.as_tensor([i // n for i in idx], dtype=torch.long)
        return V.edits(variant, modules, masks={layer: m[cand.to(m.device)] for layer, m in stack.items()})

    return tiled, factory


def evaluate_masks(
    model: nn.Module,
    tokenizer,
    rows: pl.DataFrame,
    variant: Variant,
    modules: Mapping[int, TopKSurrogate],
    masks: Sequence[Mapping[int, Sequence[int]]],
    max_new_tokens: int,
    batch_size: int,
) -> pl.DataFrame:
    """Records of a masked variant under each of ``masks`` at once (``kl`` null).

    Rows are candidates x prompts in one batched generation, each row carrying its own mask;
    the ``candidate`` column indexes ``masks``. Every prompt's rows share a batch
    (:func:`postdiff.models.forward.grouped_batches`), so two masks whose edits are equal give equal
    records, in bf16 too.
    """
    tiled, factory = _candidates(rows, variant, modules, masks)
    batches = grouped_batches([len(p) for p in rows["prefix_ids"].to_list()], len(masks), batch_size)
    return generate_records(
        model, tokenizer, tiled, variant.name, max_new_tokens, batch_size, edit_factory=factory, keep=("candidate",),
        batches=batches,
    )


def verify_masks(
    model: nn.Module,
    tokenizer,
    rows: pl.DataFrame,
    variant: Variant,
    modules: Mapping[int, TopKSurrogate],
    masks: Sequence[Mapping[int, Sequence[int]]],
    max_new_tokens: int,
    batch_size: int,
    margin: float,
) -> tuple[pl.DataFrame, Verified]:
    """The records of :func:`evaluate_masks`, generating only ``masks[0]`` (the incumbent) and
    the masks whose teacher-forced argmax leaves its tokens
    (:func:`postdiff.models.generation.verify_then_generate`); a mask that keeps them has its
    records, as its greedy output is its tokens."""
    tiled, factory = _candidates(rows, variant, modules, masks)
    outputs, verified = verify_then_generate(model, tokenizer, rows["prefix_ids"].to_list(), len(masks), factory,
                                             max_new_tokens, batch_size, margin)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
    return records_frame(tiled, variant.name, outputs, texts, None, ("candidate",)), verified


def read_rows(split_path: str, teacher_path: str) -> pl.DataFrame:
    return join_teacher(pl.read_parquet(split_path), pl.read_parquet(teacher_path), split_path, teacher_path)


def evaluate_variant(job: Job) -> None:
    """Stage: records of one variant on one split.

    input: ``variant`` (spec JSON), ``split`` (suite split Parquet), ``teacher`` (its teacher
    Parquet); params: ``pt``, ``it``, ``dtype``, ``device``, ``max_new_tokens``, ``batch_size``,
    optional ``shard`` of ``n_shards``; output: ``records`` (Parquet).
    """
    variant = Variant.read(job.input["variant"])
    rows = read_rows(job.input["split"], job.input["teacher"])
    rows = shard_rows(rows, int(job.params.get("shard", 0)), int(job.params.get("n_shards", 1)))
    max_new_tokens, batch_size = int(job.params["max_new_tokens"]), job.batch_size()
    check_budget(rows, max_new_tokens, job.input["teacher"])
    log.info("variant %s (%s): %d prompts from %s", variant.name, variant.mode, rows.height, job.input["split"])
    if variant.mode == "it":
        records = teacher_records(rows, variant.name)
    else:
        pair = load_pair(job.params["pt"], job.params["it"], job.params.get("dtype", "auto"), job.params.get("device", "auto"))
        modules, means = V.materialise(variant, next(pair.pt.parameters()).device)
        edits = V.edits(variant, modules, means)
        records = evaluate(pair.pt, pair.tokenizer, rows, variant, edits, max_new_tokens, batch_size, pair.it)
    # Sorted by id as the merge of shards is: one unsharded job writes the merged file's bytes.
    write_parquet(records.sort("id"), job.output["records"])


def load_pt(params: Mapping) -> tuple[nn.Module, object]:
    """The PT model alone (stopping on the pair's stop set), for stages that need no KL (scoring, selection)."""
    return load_model(params["pt"], params.get("dtype", "auto"), params.get("device", "auto"), partner=params["it"])
