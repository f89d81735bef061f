"""Variants as data (SPEC §6): the JSON spec that one evaluation path runs.

A new variant is a new spec file, never new code: ``mode`` says how each layer's delta is
formed, ``gates`` gives ``alpha_l``, ``mask`` the (layer, feature) pairs, ``surrogates`` the
module files and ``standardiser`` the file holding the train-mean delta for MeanDiff. This module
needs no torch, so the cheap rules that write specs start fast; :mod:`postdiff.method.variants` turns a
spec into hook edits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from postdiff.workflow.io import read_json, write_json
from postdiff.workflow.runtime import Job

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


def build_spec(job: Job) -> None:
    """Stage: write one variant's spec from its config entry and the files it names.

    params: ``name``, ``mode``, ``mask_key`` (which mask of the mask JSON: ``mask`` or
    ``passed_mask``); input (each optional, by mode): ``gates`` (JSON ``{layer: alpha}``),
    ``surrogates`` (module files of the layers ``params.surrogate_layers``, in that order), ``mask`` (a mask JSON),
    ``standardiser``; output: ``spec``."""
    name, mode = job.params["name"], job.params["mode"]
    gates = {int(k): float(v) for k, v in read_json(job.input["gates"]).items()} if "gates" in job.input else {}
    layers = sorted(gates)
    surrogates: dict[int, str] = {}
    if mode in WITH_SURROGATE:
        by_layer = dict(zip(job.params["surrogate_layers"], job.input["surrogates"], strict=True))
        missing = sorted(set(layers) - set(by_layer))
        if missing:
            raise ValueError(f"variant {name!r}: no surrogate for gated layers {missing} among {sorted(by_layer)}")
        surrogates = {layer: str(by_layer[layer]) for layer in layers}
    key = job.params.get("mask_key", "mask")
    mask = {int(k): list(v) for k, v in read_json(job.input["mask"])[key].items()} if "mask" in job.input else {}
    variant = Variant(
        name=name,
        mode=mode,
        gates=gates,
        surrogates=surrogates,
        mask=mask,
        standardiser=str(job.input["standardiser"]) if mode == "mean" else None,
    )
    write_json(variant.to_json(), job.output["spec"])
