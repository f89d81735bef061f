"""Variants as data (SPEC §6): a JSON spec that one evaluation path turns into hook edits.

A new variant is a new spec file, never new code: ``mode`` says how each layer's delta is
formed, ``gates`` gives ``alpha_l``, ``mask`` the (layer, feature) pairs, ``surrogates`` the
module files and ``standardiser`` the file holding the train-mean delta for MeanDiff.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from postdiff import surrogate
from postdiff.hook import LayerEdit
from postdiff.io import read_json, write_json
from postdiff.runtime import Job
from postdiff.standardise import load_standardiser
from postdiff.surrogate import TopKSurrogate

Mode = Literal["pt", "it", "full", "add_mask", "minus_mask", "mean", "bdec"]
MODES: tuple[str, ...] = ("pt", "it", "full", "add_mask", "minus_mask", "mean", "bdec")
MASKED: tuple[str, ...] = ("add_mask", "minus_mask")
WITH_SURROGATE: tuple[str, ...] = ("full", "add_mask", "minus_mask", "bdec")


@dataclass(frozen=True)
class Variant:
    name: str
    mode: Mode
    gates: dict[int, float] = field(default_factory=dict)
    surrogates: dict[int, str] = field(default_factory=dict)
    mask: dict[int, list[int]] = field(default_factory=dict)
    standardiser: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"variant {self.name!r}: unknown mode {self.mode!r} (one of {MODES})")
        if self.mode not in ("pt", "it") and not self.gates:
            raise ValueError(f"variant {self.name!r}: mode {self.mode!r} needs gates")
        if self.mode in WITH_SURROGATE and set(self.surrogates) != set(self.gates):
            raise ValueError(
                f"variant {self.name!r}: gated layers {sorted(self.gates)} but surrogates for {sorted(self.surrogates)}"
            )
        if self.mode == "mean" and not self.standardiser:
            raise ValueError(f"variant {self.name!r}: mode 'mean' needs a standardiser file")
        stray = sorted(set(self.mask) - set(self.gates))
        if stray:
            raise ValueError(f"variant {self.name!r}: mask names layers {stray} that have no gate")

    @property
    def layers(self) -> list[int]:
        return sorted(self.gates)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping) -> Variant:
        as_int = lambda d: {int(k): v for k, v in (d or {}).items()}  # noqa: E731 (JSON keys are strings)
        return cls(
            name=obj["name"],
            mode=obj["mode"],
            gates={k: float(v) for k, v in as_int(obj.get("gates")).items()},
            surrogates=as_int(obj.get("surrogates")),
            mask={k: [int(j) for j in v] for k, v in as_int(obj.get("mask")).items()},
            standardiser=obj.get("standardiser"),
        )

    @classmethod
    def read(cls, path: str | Path) -> Variant:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a valid variant spec ({err})") from err


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


def build_spec(job: Job) -> None:
    """Stage: write one variant's spec from its config entry and the files it names.

    params: ``name``, ``mode``; input (each optional, by mode): ``gates`` (JSON ``{layer: alpha}``),
    ``surrogates`` (module files, one per gated layer, in layer order), ``mask`` (a mask JSON),
    ``standardiser``; output: ``spec``."""
    name, mode = job.params["name"], job.params["mode"]
    gates = {int(k): float(v) for k, v in read_json(job.input["gates"]).items()} if "gates" in job.input else {}
    layers = sorted(gates)
    surrogates: dict[int, str] = {}
    if mode in WITH_SURROGATE:
        paths = list(job.input["surrogates"])
        by_layer = {int(surrogate.load(p)[1]["layer"]): str(p) for p in paths}
        missing = sorted(set(layers) - set(by_layer))
        if missing:
            raise ValueError(f"variant {name!r}: no surrogate for gated layers {missing} among {paths}")
        surrogates = {layer: by_layer[layer] for layer in layers}
    mask = {int(k): list(v) for k, v in read_json(job.input["mask"])["mask"].items()} if "mask" in job.input else {}
    variant = Variant(
        name=name,
        mode=mode,
        gates=gates,
        surrogates=surrogates,
        mask=mask,
        standardiser=str(job.input["standardiser"]) if mode == "mean" else None,
    )
    write_json(variant.to_json(), job.output["spec"])
