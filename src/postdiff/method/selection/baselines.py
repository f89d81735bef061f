"""Size-matched baselines of CapMask: uniformly random features, the largest activation mass, and
the top of CapMask's own candidate pool by score (what CapMask is without forward selection)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from postdiff.method.selection.maskfile import mask_of, read_mask_file
from postdiff.workflow.io import write_json
from postdiff.workflow.runtime import Job


def random_mask(sizes: Mapping[int, int], n_features: Mapping[int, int], seed: int) -> dict[int, list[int]]:
    """Uniformly random features, ``sizes[l]`` of them at layer ``l``, without replacement."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in sorted(sizes):
        if sizes[layer] > n_features[layer]:
            raise ValueError(f"layer {layer}: cannot draw {sizes[layer]} of {n_features[layer]} features")
        out[layer] = sorted(int(j) for j in rng.choice(n_features[layer], size=sizes[layer], replace=False))
    return out


def mass_mask(sizes: Mapping[int, int], scores: pl.DataFrame) -> dict[int, list[int]]:
    """The ``sizes[l]`` features of layer ``l`` with the largest activation mass (ties: lower id)."""
    out = {}
    for layer in sorted(sizes):
        top = scores.filter(pl.col("layer") == layer).sort(["activation_mass", "feature"], descending=[True, False])
        out[layer] = sorted(int(j) for j in top["feature"].head(sizes[layer]))
    return out


def score_mask(pool: Sequence[Sequence[int]], size: int) -> dict[int, list[int]]:
    """The first ``size`` features of a candidate pool (best score first), by layer."""
    out: dict[int, list[int]] = {}
    for layer, feature in pool[:size]:
        out.setdefault(int(layer), []).append(int(feature))
    return {layer: sorted(features) for layer, features in sorted(out.items())}


def baseline_masks(job: Job) -> None:
    """Stage: size-matched baselines of CapMask. input: ``cap_mask`` (JSON), ``scores``;
    params: ``seed``; output: ``random``, ``mass`` and ``score`` (mask JSONs). ``score`` has
    CapMask's size in all (its per-layer sizes are the pool's)."""
    cap_file = read_mask_file(job.input["cap_mask"])
    cap = mask_of(cap_file)
    scores = pl.read_parquet(job.input["scores"])
    n_features = {int(k): int(v) for k, v in scores.group_by("layer").agg(pl.len()).iter_rows()}
    unknown = sorted(set(cap) - set(n_features))
    if unknown:
        raise ValueError(f"{job.input['cap_mask']}: layers {unknown} are not in {job.input['scores']}")
    sizes = {layer: len(features) for layer, features in cap.items()}
    seed = int(job.params.get("seed", 0))
    write_json({"rule": "random", "mask": random_mask(sizes, n_features, seed), "seed": seed}, job.output["random"])
    write_json({"rule": "activation_mass", "mask": mass_mask(sizes, scores)}, job.output["mass"])
    size = sum(sizes.values())
    write_json({"rule": "score", "mask": score_mask(cap_file["pool"], size), "size": size}, job.output["score"])
