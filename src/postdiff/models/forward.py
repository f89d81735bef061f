"""Teacher-forced passes over ``(prefix_ids, token_ids)`` rows: answer log-probs, KL, block outputs.

Rows run in length-sorted batches; a row's answer-phase positions are ``m-1 .. m+n-2`` (SPEC §3)
and every result is in the order of those positions, rows in input order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

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


class _Replay(nn.Module):
    """Stands in for a decoder block and returns a kept output, whatever it is given."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *_args: Any, **_kwargs: Any) -> Any:
        return self.output


class BlockCache:
    """Each batch's output of decoder block ``block`` in ``model``'s unedited pass, kept from the
    batch's first pass (up to ``max_bytes``), so that later passes over the same rows whose edits
    all sit at ``block`` or after start there: a gate search measures a hundred gate vectors on
    one split, and the blocks before its first edited layer compute the same floats every time.

    Blocks ``0..block`` are swapped for stand-ins that return the kept output, so the forward
    pass, its masks and its position embeddings are the model's own from ``block + 1`` on, and
    an edit hook on ``block`` (registered inside :meth:`starting`) acts on the stand-in."""

    def __init__(self, model: nn.Module, block: int, max_bytes: int) -> None:
        check_layers(model, [block])
        self.model, self.block, self.max_bytes = model, block, max_bytes
        self.outputs: dict[tuple[int, ...], Any] = {}
        self.bytes = 0

    def check(self, edits: Edits) -> None:
        if early := sorted(layer for layer in edits if layer < self.block):
            raise ValueError(f"edits at layers {early} come before the cached block {self.block}")

    @contextmanager
    def starting(self, key: tuple[int, ...]) -> Iterator[None]:
        """A pass over the batch ``key`` (its rows' indices): from the kept output when there is
        one, else computed in full, keeping the output of ``block`` before any edit of it."""
        layers = decoder_layers(self.model)
        if key in self.outputs:
            originals = [layers[i] for i in range(self.block + 1)]
            for i in range(self.block + 1):
                layers[i] = _Replay(self.outputs[key])
            try:
                yield
            finally:
                for i, block in enumerate(originals):
                    layers[i] = block
            return
        seen: list[Any] = []
        # Registered before the edit hooks, so it sees the block's own output (hooks run in order).
        handle = layers[self.block].register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            yield
        finally:
            handle.remove()
        hidden = seen[0][0] if isinstance(seen[0], tuple) else seen[0]
        size = hidden.numel() * hidden.element_size()
        if self.bytes + size <= self.max_bytes:
            self.outputs[key], self.bytes = seen[0], self.bytes + size


def variant_kl(
    model: nn.Module,
    rows: Sequence[Row],
    batch_size: int,
    variants: Mapping[str, Variant],
    reference: nn.Module | Sequence[Tensor],
    cache: BlockCache | None = None,
) -> dict[str, Tensor]:
    """Per-prompt answer KL(IT || variant) of ``model`` under each variant's edits, input order.

    ``reference`` is the IT model (run once per batch, shared by all variants) or the output of
    :func:`reference_logprobs` on the same rows. Only one batch of log-probs is held at a time.
    With ``cache`` (of ``model``, built for these rows and ``batch_size``), passes start at its
    block: the same floats, without recomputing the blocks before it.
    """
    if not isinstance(reference, nn.Module) and len(reference) != len(rows):
        raise ValueError(f"reference holds {len(reference)} rows, expected {len(rows)}")
    if cache is not None and cache.model is not model:
        raise ValueError("the block cache was built for another model")
    out = {name: torch.full((len(rows),), float("nan"), dtype=torch.float64) for name in variants}
    for batch in _batches(rows, batch_size, model, f"KL of {len(variants)} variants"):
        if isinstance(reference, nn.Module):
            it_lp = batch.logprobs(reference, {})
        else:
            it_lp = torch.cat([reference[i] for i in batch.idx]).to(batch.input_ids.device)
        for name, variant in variants.items():
            edits = edits_for(batch.idx, variant)
            if cache is None:
                lp = batch.logprobs(model, edits)
            else:
                cache.check(edits)
                with cache.starting(tuple(batch.idx)):
                    lp = batch.logprobs(model, edits)
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
