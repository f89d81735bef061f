"""How stable the selected masks are across surrogate seeds, matched by decoder direction: each
mask feature of one seed against the other seed's mask and its whole dictionary, within a layer
(each layer has its own residual space)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from itertools import permutations

import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from postdiff.method.selection.maskfile import mask_of, read_mask_file
from postdiff.method.surrogate import load
from postdiff.workflow.io import write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

MATCH_THRESHOLD = 0.9
STABILITY_SCHEMA = {
    "mask": pl.String,
    "seed": pl.Int64,
    "other_seed": pl.Int64,
    "layer": pl.Int64,
    "feature": pl.Int64,
    "best_in_mask_feature": pl.Int64,
    "best_in_mask_cos": pl.Float64,
    "best_in_dictionary_feature": pl.Int64,
    "best_in_dictionary_cos": pl.Float64,
}
SUMMARY_SCHEMA = {
    "mask": pl.String,
    "seed": pl.Int64,
    "other_seed": pl.Int64,
    "mask_size": pl.Int64,
    "other_mask_size": pl.Int64,
    "mean_in_mask_cos": pl.Float64,
    "mean_in_dictionary_cos": pl.Float64,
    "threshold": pl.Float64,
    "in_mask_matched": pl.Int64,
    "in_dictionary_matched": pl.Int64,
}


def best_match(D_a: Tensor, D_b: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``D_a`` ``[n_a, d]``, the index of the row of ``D_b`` ``[n_b, d]`` with the
    largest ``|cos|`` (ties: the lower index) and that ``|cos|``. A zero row has cos 0 with
    everything; with ``n_b == 0`` every index is -1 and every value NaN."""
    if D_a.dim() != 2 or D_b.dim() != 2 or D_a.shape[1] != D_b.shape[1]:
        raise ValueError(f"best_match: need [n_a, d] and [n_b, d], got {tuple(D_a.shape)} and {tuple(D_b.shape)}")
    dtype = torch.promote_types(D_a.dtype, D_b.dtype)
    if D_b.shape[0] == 0:
        return (torch.full((D_a.shape[0],), -1, dtype=torch.long, device=D_a.device),
                torch.full((D_a.shape[0],), math.nan, dtype=dtype, device=D_a.device))
    # normalize clamps the norm away from 0, so a zero row stays zero instead of 0/0.
    cos = (F.normalize(D_a.to(dtype), dim=1) @ F.normalize(D_b.to(dtype), dim=1).T).abs()
    index = cos.argmax(1)
    return index, cos.gather(1, index[:, None])[:, 0]


def _layer_rows(mask_name: str, seed: int, other: int, layer: int, features: Sequence[int],
                theirs: Sequence[int], D_a: Tensor, D_b: Tensor) -> list[dict]:
    mine = D_a[list(features)]
    in_mask, in_mask_cos = best_match(mine, D_b[list(theirs)])
    in_dict, in_dict_cos = best_match(mine, D_b)
    return [{"mask": mask_name, "seed": seed, "other_seed": other, "layer": layer, "feature": j,
             "best_in_mask_feature": theirs[i] if i >= 0 else -1, "best_in_mask_cos": c,
             "best_in_dictionary_feature": i_d, "best_in_dictionary_cos": c_d}
            for j, i, c, i_d, c_d in zip(features, in_mask.tolist(), in_mask_cos.tolist(),
                                         in_dict.tolist(), in_dict_cos.tolist())]


def _decoder(decoders: Mapping[int, Mapping[int, Tensor]], seed: int, layer: int, picked: Sequence[int],
             mask_name: str) -> Tensor:
    """``seed``'s ``W_dec`` at ``layer``, checked to hold the ``picked`` features."""
    W = decoders.get(seed, {}).get(layer)
    if W is None:
        raise ValueError(f"{mask_name}: no decoder for layer {layer} of seed {seed}")
    if picked and not 0 <= min(picked) <= max(picked) < W.shape[0]:
        raise ValueError(f"{mask_name}: seed {seed} layer {layer}: features {list(picked)} outside "
                         f"its {W.shape[0]}-feature dictionary")
    return W


def mask_stability(masks: Mapping[int, Mapping[int, Sequence[int]]],
                   decoders: Mapping[int, Mapping[int, Tensor]], mask_name: str) -> pl.DataFrame:
    """For every ordered pair of distinct seeds ``(seed, other_seed)`` and every feature
    ``(layer, feature)`` of ``seed``'s mask (``masks[seed][layer]``): its best ``|cos|`` match
    among ``other_seed``'s mask features at that layer (-1 and NaN when there are none) and in
    ``other_seed``'s whole dictionary at that layer (``decoders[seed][layer]``: ``W_dec`` ``[F,
    d]``). Layers never match across: each has its own residual space."""
    rows = []
    for seed, other in permutations(masks, 2):
        for layer, features in sorted(masks[seed].items()):
            if not features:
                continue
            theirs = list(masks[other].get(layer, ()))
            D_a = _decoder(decoders, seed, layer, features, mask_name)
            D_b = _decoder(decoders, other, layer, theirs, mask_name)
            rows += _layer_rows(mask_name, seed, other, layer, list(features), theirs, D_a, D_b)
    return pl.DataFrame(rows, schema=STABILITY_SCHEMA)


def stability_summary(matches: pl.DataFrame, sizes: Mapping[str, Mapping[int, int]],
                      threshold: float = MATCH_THRESHOLD) -> pl.DataFrame:
    """Per mask and ordered seed pair (every pair of ``sizes[mask]``'s seeds, empty masks
    included): both mask sizes, the mean best ``|cos|`` of ``seed``'s features in
    ``other_seed``'s mask (a feature with no mask feature at its layer there counts 0: it has no
    counterpart) and in its dictionary, and how many features match above ``threshold``."""
    per_pair = matches.group_by("mask", "seed", "other_seed").agg(
        mean_in_mask_cos=pl.col("best_in_mask_cos").fill_nan(0.0).mean(),
        mean_in_dictionary_cos=pl.col("best_in_dictionary_cos").mean(),
        in_mask_matched=(pl.col("best_in_mask_cos").fill_nan(0.0) > threshold).sum().cast(pl.Int64),
        in_dictionary_matched=(pl.col("best_in_dictionary_cos") > threshold).sum().cast(pl.Int64),
    )
    pair_schema = {k: SUMMARY_SCHEMA[k] for k in ("mask", "seed", "other_seed", "mask_size", "other_mask_size")}
    pairs = pl.DataFrame([(name, a, b, n[a], n[b]) for name, n in sizes.items() for a, b in permutations(n, 2)],
                         schema=pair_schema, orient="row").with_columns(threshold=pl.lit(threshold))
    return (pairs.join(per_pair, on=["mask", "seed", "other_seed"], how="left", maintain_order="left")
            .with_columns(pl.col("in_mask_matched", "in_dictionary_matched").fill_null(0),
                          pl.col("mean_in_mask_cos", "mean_in_dictionary_cos").fill_null(math.nan))
            .select(list(SUMMARY_SCHEMA)).cast(SUMMARY_SCHEMA))


def _read_masks(job: Job, seeds: Sequence[int], names: Sequence[str],
                layers: Sequence[int]) -> dict[str, dict[int, dict[int, list[int]]]]:
    """``{mask name: {seed: {layer: features}}}`` from input.masks, seed-major then mask name."""
    paths = job.inputs("masks")
    if len(paths) != len(seeds) * len(names):
        raise ValueError(f"stability: {len(paths)} mask files for {len(seeds)} seeds x masks {list(names)}")
    out: dict[str, dict[int, dict[int, list[int]]]] = {name: {} for name in names}
    for k, path in enumerate(paths):
        seed, name = seeds[k // len(names)], names[k % len(names)]
        out[name][seed] = mask_of(read_mask_file(path))
        if unknown := sorted(set(out[name][seed]) - set(layers)):
            raise ValueError(f"{path}: layers {unknown} are not among params.layers {list(layers)}")
    return out


def _decoders(paths: Sequence[str], seeds: Sequence[int], layer: int) -> dict[int, dict[int, Tensor]]:
    """One layer's ``W_dec`` of every seed, refused when a file's own meta says otherwise."""
    out = {}
    for seed, path in zip(seeds, paths):
        module, meta = load(path)
        if (meta.get("layer", layer), meta.get("seed", seed)) != (layer, seed):
            raise ValueError(f"{path}: surrogate of layer {meta.get('layer')} seed {meta.get('seed')}, "
                             f"expected layer {layer} seed {seed} (input.modules is seed-major, then layer)")
        out[seed] = {layer: module.W_dec.detach()}
    return out


def stability(job: Job) -> None:
    """Stage. input.modules: surrogate files, seed-major then layer (params.seeds x params.layers);
    input.masks: mask JSONs, seed-major then params.mask_names (e.g. CapMask, VMask); output.parquet:
    :func:`mask_stability` of every mask; output.csv: :func:`stability_summary`. One layer's
    dictionaries are in memory at a time."""
    p = job.params
    seeds, layers, names = [int(s) for s in p["seeds"]], [int(v) for v in p["layers"]], list(p["mask_names"])
    modules = job.inputs("modules")
    if len(modules) != len(seeds) * len(layers):
        raise ValueError(f"stability: {len(modules)} surrogate files for seeds {seeds} x layers {layers}")
    masks = _read_masks(job, seeds, names, layers)
    frames = {name: [] for name in names}
    for i, layer in enumerate(layers):
        if not any(m[seed].get(layer) for m in masks.values() for seed in seeds):
            continue  # no mask picks a feature here: nothing to match
        decoders = _decoders(modules[i::len(layers)], seeds, layer)
        for name in names:
            at_layer = {seed: {layer: masks[name][seed].get(layer, [])} for seed in seeds}
            frames[name].append(mask_stability(at_layer, decoders, name))
    # Per mask: seed pair, then layer, features in mask order.
    by_mask = [pl.concat(f).sort("seed", "other_seed", "layer", maintain_order=True) for f in frames.values() if f]
    matches = pl.concat([pl.DataFrame(schema=STABILITY_SCHEMA), *by_mask])
    sizes = {name: {seed: sum(map(len, masks[name][seed].values())) for seed in seeds} for name in names}
    summary = stability_summary(matches, sizes)
    write_parquet(matches, job.output["parquet"])
    write_text(summary.write_csv(), job.output["csv"])
    log.info("mask stability: %d feature matches over seeds %s", matches.height, seeds)
