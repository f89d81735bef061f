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

from postdiff.method import variants as V
from postdiff.method.records import records_frame, teacher_records, variant_rows, write_records
from postdiff.method.spec import MASKED, Variant
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.forward import EditFactory, Edits, grouped_batches, variant_kl
from postdiff.models.generation import Verified, Watch, generate, verify_then_generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import load_model, load_pair
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

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


def tile_masks(
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
    tiled, factory = tile_masks(rows, variant, modules, masks)
    batches = grouped_batches([len(p) for p in rows["prefix_ids"].to_list()], len(masks), batch_size)
    return generate_records(
        model, tokenizer, tiled, variant.name, max_new_tokens, batch_size, edit_factory=factory, keep=("candidate",),
        batches=batches,
    )


def silent_features(
    modules: Mapping[int, TopKSurrogate], masks: Sequence[Mapping[int, Sequence[int]]], n: int, factory: EditFactory
) -> Watch:
    """The incumbent ``masks[0]`` generates watching the features in which any other mask
    differs from it; a mask whose differing features all stay at ``z = 0`` over a prompt's
    answer positions has the incumbent's edits there (``z * mask`` is the same vector), so the
    incumbent's tokens. The surrogate's code at a layer depends only on the tokens and on the
    edits before that layer, so this holds layer by layer."""
    differ = [{(layer, j) for layer in modules for j in set(m.get(layer, ())) ^ set(masks[0].get(layer, ()))}
              for m in masks]
    watched = {layer: sorted(js) for layer in modules if (js := {j for at, j in set().union(*differ) if at == layer})}
    column = {(layer, j): c for layer, js in watched.items() for c, j in enumerate(js)}
    steps: dict[tuple[int, ...], dict[int, list[Tensor]]] = {}

    def edit_factory(idx: list[int]) -> Edits:
        seen = steps[tuple(idx)] = {}

        def watching(layer: int, edit: LayerEdit) -> LayerEdit:
            cols, calls = torch.as_tensor(watched[layer], dtype=torch.long), seen.setdefault(layer, [])
            # One call per decoding step (the prefill's is its last column): its newest position.
            return V.watched(edit, modules[layer], lambda z: calls.append((z[:, -1, cols.to(z.device)] != 0).cpu()))

        return {layer: watching(layer, edit) if layer in watched else edit for layer, edit in factory(idx).items()}

    def identical(incumbent: Sequence[tuple[list[int], bool]]) -> list[bool]:
        fired = {}
        for idx, by_layer in steps.items():
            for layer, calls in by_layer.items():
                seen = torch.stack(calls, dim=1)  # [rows, steps, watched]
                fired.update({(layer, i): seen[row, : len(incumbent[i][0])].any(dim=0) for row, i in enumerate(idx)})
        return [not any(fired[layer, r % n][column[layer, j]] for layer, j in differ[r // n])
                for r in range(len(masks) * n)]

    return Watch(edit_factory, identical)


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
    records, as its greedy output is its tokens. A mask whose extra features stay silent on a
    prompt (:func:`silent_features`) needs no pass there."""
    tiled, factory = tile_masks(rows, variant, modules, masks)
    outputs, verified = verify_then_generate(model, tokenizer, rows["prefix_ids"].to_list(), len(masks), factory,
                                             max_new_tokens, batch_size, margin,
                                             silent_features(modules, masks, rows.height, factory))
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
    return records_frame(tiled, variant.name, outputs, texts, None, ("candidate",)), verified


def evaluate_variant(job: Job) -> None:
    """Stage: records of one variant on one split.

    input: ``variant`` (spec JSON), ``split`` (suite split Parquet), ``teacher`` (its teacher
    Parquet); params: ``pt``, ``it``, ``dtype``, ``device``, ``max_new_tokens``, ``batch_size``,
    optional ``shard`` of ``n_shards``; output: ``records`` (Parquet).
    """
    variant, rows = variant_rows(job)
    if variant.mode == "it":
        records = teacher_records(rows, variant.name)
    else:
        pair = load_pair(job.params["pt"], job.params["it"], job.params.get("dtype", "auto"), job.params.get("device", "auto"))
        modules, means = V.materialise(variant, next(pair.pt.parameters()).device)
        edits = V.edits(variant, modules, means)
        records = evaluate(pair.pt, pair.tokenizer, rows, variant, edits, int(job.params["max_new_tokens"]),
                           job.batch_size(), pair.it)
    write_records(records, job.output["records"])


def load_pt(params: Mapping) -> tuple[nn.Module, object]:
    """The PT model alone (stopping on the pair's stop set), for stages that need no KL (scoring, selection)."""
    return load_model(params["pt"], params.get("dtype", "auto"), params.get("device", "auto"), partner=params["it"])
