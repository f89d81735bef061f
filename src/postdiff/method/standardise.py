"""Per-layer standardiser from the train cache (SPEC §5): ``mu``, floored ``sigma``, train-mean delta.

File: safetensors with ``mu.{l}``, ``sigma.{l}``, ``delta_mean.{l}`` (float32 ``[d]``) per layer
and metadata ``layers``, ``n_tokens``, ``sigma_floor_rel``, ``sigma_floor_abs``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from safetensors.torch import save_file
from torch import Tensor
from tqdm import tqdm

from postdiff.method.cache import check_shard, read_tensor
from postdiff.workflow.io import atomic_path, read_safetensors
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

FORMAT = "postdiff-standardiser/1"
# A dimension whose spread is under 1e-3 of the typical one is effectively constant on the
# answer phase; dividing by its tiny sigma would turn noise into the largest input of x.
SIGMA_FLOOR_REL = 1e-3
SIGMA_FLOOR_ABS = 1e-6


class Standardiser(NamedTuple):
    mu: Tensor
    sigma: Tensor
    delta_mean: Tensor


class _Moments:
    """Mean and summed squared deviations in float64, merged chunk by chunk (Chan et al.).

    Merging centred moments avoids the cancellation of ``E[h^2] - E[h]^2`` when a dimension's
    mean dwarfs its spread (the massive activations of some models).
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, chunk: Tensor) -> None:
        x = chunk.double()
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(0)
        m2_b = (x - mean_b).pow(2).sum(0)
        if self.mean is None:
            self.n, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.n + n_b
        diff = mean_b - self.mean
        self.mean = self.mean + diff * (n_b / n)
        self.m2 = self.m2 + m2_b + diff.pow(2) * (self.n * n_b / n)
        self.n = n


def floor_sigma(sigma: Tensor, rel: float = SIGMA_FLOOR_REL, abs_floor: float = SIGMA_FLOOR_ABS) -> Tensor:
    floor = max(rel * float(sigma.median()), abs_floor)
    n_floored = int((sigma < floor).sum())
    if n_floored:
        log.info("standardiser: %d of %d dims have sigma below the floor %.3g", n_floored, sigma.numel(), floor)
    return sigma.clamp_min(floor)


def standardiser_from(chunks: Iterable[tuple[Tensor, Tensor]]) -> Standardiser:
    """Streaming ``mu``, floored ``sigma`` (population) of h_pt and mean delta over ``(h_pt, delta)`` chunks."""
    h, delta = _Moments(), _Moments()
    for h_chunk, delta_chunk in chunks:
        h.add(h_chunk)
        delta.add(delta_chunk)
    if h.n == 0:
        raise ValueError("standardiser: the train cache holds no answer-phase positions")
    sigma = (h.m2 / h.n).sqrt()
    return Standardiser(h.mean.float(), floor_sigma(sigma).float(), delta.mean.float())


def load_standardiser(path: str | Path, layer: int) -> Standardiser:
    with read_safetensors(path, FORMAT, "standardiser file") as (f, meta):
        if layer not in json.loads(meta["layers"]):
            raise ValueError(f"{path}: no standardiser for layer {layer} (has {meta['layers']})")
        return Standardiser(*(f.get_tensor(f"{name}.{layer}") for name in Standardiser._fields))


def standardiser(job: Job) -> None:
    """Stage. input.shards: train cache files; params.layers. One shard-layer in memory at a time."""
    shards = list(job.input["shards"])
    layers = [int(layer) for layer in job.params["layers"]]
    n_tokens = sum(check_shard(path, layers)["n_tokens"] for path in shards)
    tensors: dict[str, Tensor] = {}
    for layer in tqdm(layers, desc="standardiser"):
        chunks = ((read_tensor(p, f"h_pt.{layer}"), read_tensor(p, f"delta.{layer}")) for p in shards)
        std = standardiser_from(chunks)
        for name, value in std._asdict().items():
            tensors[f"{name}.{layer}"] = value.contiguous()
    metadata = {
        "format": FORMAT,
        "layers": json.dumps(layers),
        "n_tokens": str(n_tokens),
        "sigma_floor_rel": str(SIGMA_FLOOR_REL),
        "sigma_floor_abs": str(SIGMA_FLOOR_ABS),
    }
    with atomic_path(job.output["standardiser"]) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
