"""The mask file that every selection writes and later stages read: ``{"mask": {layer: [features]}, ...}``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from postdiff.method.selection.search import Pair
from postdiff.workflow.io import read_json


def layer_mask(mask: Sequence[Pair]) -> dict[int, list[int]]:
    """A mask's (layer, feature) pairs as the file's ``{layer: sorted features}``."""
    out: dict[int, list[int]] = {}
    for layer, feature in mask:
        out.setdefault(int(layer), []).append(int(feature))
    return {layer: sorted(features) for layer, features in sorted(out.items())}


def read_mask_file(path: str) -> dict:
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("mask"), dict):
        raise ValueError(f"{path}: not a mask file (needs an object with a 'mask' object)")
    return obj


def mask_of(obj: Mapping) -> dict[int, list[int]]:
    """``{layer: sorted features}`` of a mask file's object, empty layers dropped."""
    return {int(layer): sorted(int(j) for j in f) for layer, f in sorted(obj["mask"].items(), key=lambda kv: int(kv[0])) if f}


def forced(obj: Mapping) -> bool:
    """Whether a selection's mask was forced rather than selected: no step was taken for a gain
    on the prompts that chose it (``choose_gain``), so every step was a tie broken in score
    order, and the mask is the first ``n`` of its pool, as taking the top ``n`` by score would
    give. Agreement between such masks, or with the locked mask, is by construction. A step taken
    at a tie can still pass on the judge half (a gain there is not what took it), and an empty
    mask is not forced."""
    pairs = {(layer, f) for layer, fs in mask_of(obj).items() for f in fs}
    gains = obj["step_gains"]
    if len(gains) != len(pairs):
        raise ValueError(f"mask file: {len(gains)} step gains for {len(pairs)} features")
    top = {(int(layer), int(f)) for layer, f in obj["pool"][: len(pairs)]}
    return bool(pairs) and not any(g["choose_gain"] > 0 for g in gains) and pairs == top
