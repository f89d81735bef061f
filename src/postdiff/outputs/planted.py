"""Where the masks sit on a planted pair: each masked feature's decoder direction against the
directions the positive control planted (:mod:`postdiff.models.toy.plant`).

For feature ``j`` with decoder column ``D_j`` and a group's planted directions (the rows of
``[n, d]``), ``max_cos`` is the largest ``|cos(D_j, direction)|`` and ``in_span`` the share of
``D_j``'s norm inside the span of the group's directions, ``||P D_j|| / ||D_j||``: neurons of one
group fire together, so a feature may be a mix of them and sit on the edit with no single
direction near it. A feature on a block with no planted group gets nulls.

Sitting on a direction is not firing where its neurons fire. On the test split's cache,
``on_group`` is the share of the feature's activation mass (``|z_j| * ||D_j||`` per answer
position) at positions where the group fires (its output at least :data:`FIRES_AT` of its
largest there), and ``covers`` the share of the group's output at positions where the feature
fires. A latent that sits on the brevity neuron (``max_cos`` 0.99) but has half its mass where
that neuron is silent adds brevity's stop where IT has none.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import torch
from torch import Tensor

from postdiff.method import surrogate
from postdiff.method.cache import load_split
from postdiff.method.selection.maskfile import mask_of, read_mask_file
from postdiff.models.toy.settings import PLANT_FILE
from postdiff.workflow.io import read_json, write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SCHEMA = {"mask": pl.String, "layer": pl.Int64, "feature": pl.Int64, "group": pl.String, "max_cos": pl.Float64,
          "in_span": pl.Float64, "on_group": pl.Float64, "covers": pl.Float64}
# A group fires where its output is at least this share of its largest: above the planted neurons'
# leak elsewhere (the capability neuron's 1.4-1.8 at most answer positions against 20 at stops).
FIRES_AT = 0.1


def planted_directions(record: Mapping[str, Any]) -> dict[str, tuple[int, Tensor]]:
    """Group -> (block, planted directions ``[n, d_model]``) from a :data:`PLANT_FILE` record."""
    return {name: (int(g["layer"]), torch.tensor(g["directions"])) for name, g in record["groups"].items()}


def norm_in_span(vectors: Tensor, directions: Tensor) -> Tensor:
    """``[N]``: the norm of each row of ``vectors [N, d]`` inside the span of ``directions [n, d]``.
    Of ``delta`` on a planted block, that is a group's output at each position: the groups write in
    spans apart from each other and nothing else changes."""
    basis = torch.linalg.qr(directions.double().T).Q  # [d, n], orthonormal columns spanning the directions
    return (vectors.double() @ basis).norm(dim=1)


def alignment(D: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``D [d, F]``: the largest ``|cos|`` with a row of ``directions [n, d]`` and
    the share of its norm in their span."""
    D, directions = D.double(), directions.double()
    unit = directions / directions.norm(dim=1, keepdim=True)
    norms = D.norm(dim=0).clamp_min(1e-30)
    max_cos = (unit @ D).abs().max(dim=0).values / norms
    return max_cos, norm_in_span(D.T, directions) / norms


def feature_mass(module: surrogate.TopKSurrogate, h: Tensor, batch_size: int = 4096) -> Tensor:
    """``[N, F]``: each feature's ``z_j * ||D_j||`` at each row of ``h``."""
    norms = module.D.detach().double().norm(dim=0)
    with torch.no_grad():
        return torch.cat([module.encode(rows).double() * norms for rows in h.split(batch_size)])


def firing_overlap(mass: Tensor, output: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``mass [N, F]`` against one group's ``output [N]``: ``on_group``, the share
    of the feature's mass where the group fires (NaN for a feature that never fires), and
    ``covers``, the share of the group's output where the feature fires (0 for a feature that never
    fires, NaN for a group whose output is 0 everywhere)."""
    fires = output >= FIRES_AT * output.max()
    on_group = mass[fires].sum(0) / mass.sum(0)
    covers = (output[:, None] * (mass > 0)).sum(0) / output.sum()
    return on_group, covers


def _value(x: Tensor) -> float | None:
    return None if x.isnan() else float(x)


def mask_alignment(masks: Mapping[str, Mapping[int, Sequence[int]]], decoders: Mapping[int, Tensor],
                   planted: Mapping[str, tuple[int, Tensor]], mass: Mapping[int, Tensor],
                   outputs: Mapping[str, Tensor]) -> pl.DataFrame:
    """One row per (mask, feature, planted group at the feature's block); ``mass`` per block as
    :func:`feature_mass` gives it and ``outputs`` per group as :func:`norm_in_span` of ``delta``
    gives it, on the same positions."""
    rows = []
    for name, mask in masks.items():
        for layer, features in sorted(mask.items()):
            groups = [(g, dirs) for g, (at, dirs) in planted.items() if at == layer]
            for feature in features:
                if not groups:
                    rows.append({"mask": name, "layer": layer, "feature": feature, "group": None, "max_cos": None,
                                 "in_span": None, "on_group": None, "covers": None})
                for group, dirs in groups:
                    max_cos, in_span = alignment(decoders[layer][:, [feature]], dirs)
                    on_group, covers = firing_overlap(mass[layer][:, [feature]], outputs[group])
                    rows.append({"mask": name, "layer": layer, "feature": feature, "group": group,
                                 "max_cos": float(max_cos[0]), "in_span": float(in_span[0]),
                                 "on_group": _value(on_group[0]), "covers": _value(covers[0])})
    return pl.DataFrame(rows, schema=SCHEMA)


def planted_table(job: Job) -> None:
    """Stage: input ``it`` (the planted IT's directory), ``surrogates`` (one per layer of
    ``params.layers``), ``shards`` (the test split's cache) and one mask JSON per name of
    ``params.masks`` (a selection's file gives its filled mask and its passed steps); output
    ``parquet``, ``csv``."""
    planted = planted_directions(read_json(f"{job.input['it']}/{PLANT_FILE}"))
    modules = {int(layer): surrogate.load(path)[0]
               for layer, path in zip(job.params["layers"], job.inputs("surrogates"), strict=True)}
    mass, outputs = {}, {}
    for layer, module in modules.items():
        h_pt, delta, _ = load_split(job.inputs("shards"), layer)
        mass[layer] = feature_mass(module, h_pt)
        outputs |= {group: norm_in_span(delta, dirs) for group, (at, dirs) in planted.items() if at == layer}
    masks = {}
    for name, path in zip(job.params["masks"], job.inputs("masks"), strict=True):
        obj = read_mask_file(path)
        masks[name] = mask_of(obj)
        if "passed_mask" in obj:
            masks[f"{name} (passed steps)"] = mask_of({"mask": obj["passed_mask"]})
    table = mask_alignment(masks, {layer: m.D.detach() for layer, m in modules.items()}, planted, mass, outputs)
    means = table.group_by("mask", "group", maintain_order=True).agg(pl.col("in_span", "on_group").mean())
    for row in means.iter_rows():
        log.info("%s, %s group: mean share of decoder norm in its span %s, of activation mass where it fires %s", *row)
    write_parquet(table, job.output["parquet"])
    write_text(table.write_csv(), job.output["csv"])
