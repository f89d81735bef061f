"""A variant spec (:mod:`postdiff.method.spec`) turned into hook edits: one delta function per layer."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from postdiff.method import surrogate
from postdiff.method.spec import MASKED, WITH_SURROGATE, Variant
from postdiff.method.standardise import load_standardiser
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.hook import LayerEdit


def feature_mask(features: Sequence[int], n_features: int, device: torch.device | str = "cpu") -> Tensor:
    """Boolean ``[F]`` mask with the given features set."""
    mask = torch.zeros(n_features, dtype=torch.bool, device=device)
    if len(features):
        mask[torch.as_tensor(list(features), dtype=torch.long, device=device)] = True
    return mask


def layer_delta(mode: str, sae: TopKSurrogate | None, mask: Tensor | None, mean: Tensor | None) -> Callable[[Tensor], Tensor]:
    """The function ``h -> delta`` that the hook scales by ``alpha_l`` at one layer.

    ``mask`` is ``[F]`` or per batch row ``[b, F]``; the surrogate runs in its own dtype so a
    bf16 model can carry an fp32 module.
    """

    def cast(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        return lambda h: fn(h.to(sae.b_dec.dtype)).to(h.dtype)

    if mode == "full":
        return cast(sae)
    if mode == "add_mask":
        return cast(lambda h: sae.masked_decode(sae.encode(h), mask))
    if mode == "minus_mask":

        def minus(h: Tensor) -> Tensor:
            z = sae.encode(h)
            return sae.decode(z) - sae.masked_decode(z, mask)

        return cast(minus)
    if mode == "bdec":
        return lambda h: sae.b_dec.to(h.dtype).expand_as(h)
    if mode == "mean":
        return lambda h: mean.to(h.device, h.dtype).expand_as(h)
    raise ValueError(f"mode {mode!r} adds no delta")


def materialise(variant: Variant, device: torch.device | str = "cpu") -> tuple[dict[int, TopKSurrogate], dict[int, Tensor]]:
    """The surrogate modules and MeanDiff means that ``variant``'s edits need, on ``device``."""
    modules: dict[int, TopKSurrogate] = {}
    means: dict[int, Tensor] = {}
    if variant.mode in WITH_SURROGATE:
        for layer in variant.layers:
            module, _ = surrogate.load(variant.surrogates[layer], device)
            modules[layer] = module.eval().requires_grad_(False)
            bad = [j for j in variant.mask.get(layer, []) if not 0 <= j < module.n_features]
            if bad:
                raise ValueError(
                    f"variant {variant.name!r}: mask features {bad[:5]} at layer {layer} are outside 0..{module.n_features - 1}"
                )
    if variant.mode == "mean":
        for layer in variant.layers:
            means[layer] = load_standardiser(variant.standardiser, layer).delta_mean.to(device)
    return modules, means


def edits(
    variant: Variant,
    modules: Mapping[int, TopKSurrogate],
    means: Mapping[int, Tensor] | None = None,
    masks: Mapping[int, Tensor] | None = None,
) -> dict[int, LayerEdit]:
    """Hook edits for ``variant``. ``masks`` overrides the spec's mask per layer (``[F]`` or
    ``[b, F]``), which is how a batch evaluates many candidate masks at once."""
    if variant.mode in ("pt", "it"):
        return {}
    out: dict[int, LayerEdit] = {}
    for layer in variant.layers:
        sae = modules.get(layer)
        mask = None
        if variant.mode in MASKED:
            mask = masks[layer] if masks is not None and layer in masks else feature_mask(
                variant.mask.get(layer, []), sae.n_features, sae.b_dec.device
            )
        mean = means[layer] if means is not None and variant.mode == "mean" else None
        out[layer] = LayerEdit(alpha=variant.gates[layer], fn=layer_delta(variant.mode, sae, mask, mean))
    return out


def watched(edit: LayerEdit, sae: TopKSurrogate, see: Callable[[Tensor], None]) -> LayerEdit:
    """The same edit, also handing ``see`` the code ``z`` of each input it edits (the same input,
    so the same ``z`` the edit uses)."""

    def fn(h: Tensor) -> Tensor:
        see(sae.encode(h.to(sae.b_dec.dtype)))
        return edit.fn(h)

    return LayerEdit(edit.alpha, fn)
