"""Teacher-forced passes over ``(prefix_ids, token_ids)`` rows: answer log-probs, KL, block outputs.

Rows run in length-sorted batches; a row's answer-phase positions are ``m-1 .. m+n-2`` (SPEC §3)
and every result is in the order of those positions, rows in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from postdiff.models.hook import LayerEdit, intervene
from postdiff.models.loading import check_layers, decoder_layers
from postdiff.models.template import teacher_forced_batch

Row = tuple[Sequence[int], Sequence[int]]
Edits = Mapping[int, LayerEdit]
# Called with the input-order indices of a batch's rows (in batch row order): per-row edits.
EditFactory = Callable[[list[int]], Edits]
Variant = Edits | EditFactory | None


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first so an out-of-memory batch size fails at once."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def grouped_batches(lengths: Sequence[int], n_groups: int, batch_size: int) -> list[list[int]]:
    """Batches over ``n_groups`` copies of the rows (copy ``g`` of row ``i`` is ``g * n + i``) that
    keep every copy of a row in one batch: ``batch_size // n_groups`` rows a batch (at least one),
    longest first. Copies then share padding and batch shape, so identical edits give identical
    outputs whatever ``batch_size`` is, even where batch layout moves the floats (bf16)."""
    n = len(lengths)
    return [[g * n + i for g in range(n_groups) for i in chunk]
            for chunk in length_sorted_batches(lengths, max(1, batch_size // n_groups))]


def edits_for(idx: list[int], variant: Variant) -> Edits:
    if variant is None:
        return {}
    return variant(idx) if callable(variant) else variant


def as_variant(edits: Edits | None, edit_factory: EditFactory | None) -> Variant:
    if edits is not None and edit_factory is not None:
        raise ValueError("pass edits or edit_factory, not both")
    return edit_factory if edit_factory is not None else edits


def _check_rows(rows: Sequence[Row]) -> None:
    for i, (prefix, answer) in enumerate(rows):
        if len(prefix) == 0 or len(answer) == 0:
            raise ValueError(f"row {i}: prefix_ids and token_ids must both be non-empty")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Batch:
    """One right-padded teacher-forced batch, on the model's device."""

    def __init__(self, rows: Sequence[Row], idx: list[int], device: torch.device) -> None:
        # Pad columns are masked out and lie after every answer position: any valid id works.
        ids, attn, mask = teacher_forced_batch([rows[i][0] for i in idx], [rows[i][1] for i in idx], pad_id=0)
        self.idx = idx
        self.input_ids, self.attention_mask, self.answer_mask = ids.to(device), attn.to(device), mask.to(device)
        self.counts = [len(rows[i][1]) for i in idx]
        # Logits before the earliest answer position are never needed (large vocabularies).
        self.start = min(len(rows[i][0]) for i in idx) - 1

    @torch.inference_mode()
    def logits(self, model: nn.Module, edits: Edits) -> Tensor:
        """Float32 logits ``[N, V]`` at the batch's answer positions, row-major."""
        with intervene(model, edits, self.answer_mask):
            logits = model(
                input_ids=self.input_ids,
                attention_mask=self.attention_mask,
                use_cache=False,
                logits_to_keep=self.input_ids.shape[1] - self.start,
            ).logits
        return logits[self.answer_mask[:, self.start :]].float()

    def logprobs(self, model: nn.Module, edits: Edits) -> Tensor:
        """Float32 log-probs ``[N, V]`` at the batch's answer positions, row-major."""
        return torch.log_softmax(self.logits(model, edits), dim=-1)


def _batches(rows: Sequence[Row], batch_size: int, model: nn.Module, desc: str) -> Iterator[_Batch]:
    _check_rows(rows)
    device = _device(model)
    for idx in tqdm(length_sorted_batches([len(p) + len(a) for p, a in rows], batch_size), desc=desc):
        yield _Batch(rows, idx, device)


def answer_logprobs(
    model: nn.Module,
    rows: Sequence[Row],
    batch_size: int,
    edits: Edits | None = None,
    edit_factory: EditFactory | None = None,
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(row index, log-probs [n, V])`` per row, in batch order (longest rows first)."""
    variant = as_variant(edits, edit_factory)
    for batch in _batches(rows, batch_size, model, "answer log-probs"):
        lp = batch.logprobs(model, edits_for(batch.idx, variant))
        yield from zip(batch.idx, lp.split(batch.counts))


def answer_argmax(
    model: nn.Module, rows: Sequence[Row], batch_size: int, edit_factory: EditFactory
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(row index, argmax [n], margin [n])`` per row, in batch order: the greedy token at
    each answer position of a teacher-forced pass and its logit's lead over the runner-up."""
    for batch in _batches(rows, batch_size, model, "answer argmax"):
        top = batch.logits(model, edit_factory(batch.idx)).topk(2, dim=-1)
        margin = top.values[:, 0] - top.values[:, 1]
        yield from zip(batch.idx, top.indices[:, 0].split(batch.counts), margin.split(batch.counts))


def reference_logprobs(model: nn.Module, rows: Sequence[Row], batch_size: int) -> list[Tensor]:
    """Per-row answer log-probs in input order, to reuse across calls of :func:`variant_kl`.

    Holds ``sum(n) * V`` floats: for large vocabularies let :func:`variant_kl` run IT per batch.
    """
    out: list[Tensor] = [torch.empty(0)] * len(rows)
    for i, lp in answer_logprobs(model, rows, batch_size):
        out[i] = lp.cpu()
    return out


def position_kl(it_logprobs: Tensor, variant_logprobs: Tensor) -> Tensor:
    """KL(P_IT || P_variant) per position, from log-probs ``[..., V]``."""
    terms = it_logprobs.exp() * (it_logprobs - variant_logprobs)
    # 0 * log 0 is 0, not the NaN of 0 * -inf
    return torch.where(it_logprobs.isneginf(), 0.0, terms).sum(-1)


def answer_kl(it_logprobs: Tensor, variant_logprobs: Tensor, counts: Sequence[int] | None = None) -> Tensor:
    """Per-prompt mean over answer positions of KL(P_IT || P_variant).

    Log-probs are ``[N, V]``; ``counts`` splits the N positions into prompts (None: one prompt,
    a 0-d result).
    """
    if it_logprobs.shape != variant_logprobs.shape:
        raise ValueError(f"log-prob shapes differ: {tuple(it_logprobs.shape)} vs {tuple(variant_logprobs.shape)}")
    kl = position_kl(it_logprobs, variant_logprobs)
    if counts is None:
        return kl.mean()
    return torch.stack([part.mean() for part in kl.split(list(counts))])


def variant_kl(
    model: nn.Module,
    rows: Sequence[Row],
    batch_size: int,
    variants: Mapping[str, Variant],
    reference: nn.Module | Sequence[Tensor],
) -> dict[str, Tensor]:
    """Per-prompt answer KL(IT || variant) of ``model`` under each variant's edits, input order.

    ``reference`` is the IT model (run once per batch, shared by all variants) or the output of
    :func:`reference_logprobs` on the same rows. Only one batch of log-probs is held at a time.
    """
    if not isinstance(reference, nn.Module) and len(reference) != len(rows):
        raise ValueError(f"reference holds {len(reference)} rows, expected {len(rows)}")
    out = {name: torch.full((len(rows),), float("nan"), dtype=torch.float64) for name in variants}
    for batch in _batches(rows, batch_size, model, f"KL of {len(variants)} variants"):
        if isinstance(reference, nn.Module):
            it_lp = batch.logprobs(reference, {})
        else:
            it_lp = torch.cat([reference[i] for i in batch.idx]).to(batch.input_ids.device)
        for name, variant in variants.items():
            lp = batch.logprobs(model, edits_for(batch.idx, variant))
            out[name][batch.idx] = answer_kl(it_lp, lp, batch.counts).double().cpu()
    return out


class _Captured(Exception):
    """Raised after the last wanted block, so later blocks and the LM head never run."""


@torch.no_grad()  # not inference_mode: callers may fit surrogates on the outputs
def block_outputs(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, layers: Sequence[int]
) -> dict[int, Tensor]:
    """Outputs ``[b, T, d]`` of the given decoder blocks from one forward pass.

    Read by hooks on the blocks, not ``hidden_states``: the last entry of that has the final
    norm applied (SPEC §1). Inside :func:`intervene`, hooks registered earlier act first.
    """
    wanted = check_layers(model, layers)
    if not wanted:
        return {}
    blocks = decoder_layers(model)
    last = max(wanted)
    captured: dict[int, Tensor] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: object, output: object) -> None:
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == last:
                raise _Captured

        return hook

    handles = [blocks[layer].register_forward_hook(hook_for(layer)) for layer in set(wanted)]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer] for layer in wanted}
