"""The one intervention mechanism: ``h' = h + alpha * fn(h)`` at answer-phase positions (SPEC §3, §5).

The same forward hooks serve teacher-forced passes (an explicit ``answer_mask``) and ``generate``
with the KV cache (left padding puts every row's position ``m-1`` in the prompt's last column).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from postdiff.models.loading import check_layers, decoder_layers


@dataclass(frozen=True)
class LayerEdit:
    """``alpha`` is a float or a per-row tensor ``[b]``; ``fn`` maps ``h [b, t, d]`` to a delta."""

    alpha: float | Tensor
    fn: Callable[[Tensor], Tensor]


def _edited(layer: int, edit: LayerEdit, h: Tensor) -> Tensor:
    delta = edit.fn(h)
    if delta.shape != h.shape:
        raise ValueError(f"edit at layer {layer}: fn returned shape {tuple(delta.shape)}, expected {tuple(h.shape)}")
    alpha = edit.alpha
    if isinstance(alpha, Tensor):
        if alpha.shape != (h.shape[0],):
            raise ValueError(f"edit at layer {layer}: alpha has shape {tuple(alpha.shape)}, expected ({h.shape[0]},)")
        alpha = alpha.to(device=h.device, dtype=delta.dtype).view(-1, 1, 1)
    # The same two roundings for scalar and per-row alpha: a batch of candidates reproduces
    # each candidate run alone bit for bit.
    return h + (alpha * delta).to(h.dtype)


class _Positions:
    """Which columns of a block's output are answer-phase positions, for one intervene context."""

    def __init__(self, answer_mask: Tensor | None) -> None:
        self.answer_mask = answer_mask
        self.prompt_len: int | None = None  # generation: width of the left-padded prompt

    def apply(self, layer: int, edit: LayerEdit, h: Tensor) -> Tensor:
        if self.answer_mask is not None:
            if self.answer_mask.shape != h.shape[:2]:
                raise ValueError(
                    f"answer_mask has shape {tuple(self.answer_mask.shape)} but layer {layer} "
                    f"sees hidden states of shape {tuple(h.shape[:2])}"
                )
            mask = self.answer_mask.to(h.device).unsqueeze(-1)
            return torch.where(mask, _edited(layer, edit, h), h)
        t = h.shape[1]
        if self.prompt_len is None:
            self.prompt_len = t
        # A call at least as wide as the prompt sees the whole sequence (prefill, or a step
        # without the KV cache): edit from position m-1 on. A narrower one is a cached
        # decode step whose columns are all generated positions.
        start = self.prompt_len - 1 if t >= self.prompt_len else 0
        if start == 0:
            return _edited(layer, edit, h)
        return torch.cat([h[:, :start], _edited(layer, edit, h[:, start:])], dim=1)


@contextmanager
def intervene(
    model: nn.Module, edits: Mapping[int, LayerEdit], answer_mask: Tensor | None = None
) -> Iterator[None]:
    """Add ``alpha * fn(h)`` to the output of each edited block at answer-phase positions.

    Teacher-forced: where ``answer_mask [b, T]`` is true. Generation (``answer_mask`` None):
    the prompt's last column and every generated position; one context per ``generate`` call,
    since the first call fixes the prompt width.
    """
    layers = decoder_layers(model)
    positions = _Positions(answer_mask)

    def hook_for(layer: int, edit: LayerEdit) -> Callable[..., Any]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
            # Blocks return a bare tensor in transformers 5, a tuple in older or other archs.
            if isinstance(output, tuple):
                return (positions.apply(layer, edit, output[0]), *output[1:])
            return positions.apply(layer, edit, output)

        return hook

    handles = [
        layers[layer].register_forward_hook(hook_for(layer, edits[layer]))
        for layer in check_layers(model, edits)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
