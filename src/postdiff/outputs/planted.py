"""Where the masks sit on a planted pair: each masked feature's decoder direction against the
directions the positive control planted (:mod:`postdiff.models.toy.plant`).

For feature ``j`` with decoder column ``D_j`` and a group's planted directions (the rows of
``[n, d]``), ``max_cos`` is the largest ``|cos(D_j, direction)|`` and ``in_span`` the share of
``D_j``'s norm inside the span of the group's directions, ``||P D_j|| / ||D_j||``: neurons of one
group fire together, so a feature may be a mix of them and sit on the edit with no single
direction near it. A feature on a block with no planted group gets nulls.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import polars as pl
import torch
from torch import Tensor

from postdiff.method import surrogate
from postdiff.method.selection.maskfile import mask_of, read_mask_file
from postdiff.models.toy.settings import PLANT_FILE
from postdiff.workflow.io import read_json, write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SCHEMA = {"mask": pl.String, "layer": pl.Int64, "feature": pl.Int64, "group": pl.String, "max_cos": pl.Float64,
          "in_span": pl.Float64}


def planted_directions(record: Mapping[str, Any]) -> dict[str, tuple[int, Tensor]]:
    """Group -> (block, planted directions ``[n, d_model]``) from a :data:`PLANT_FILE` record."""
    return {name: (int(g["layer"]), torch.tensor(g["directions"])) for name, g in record["groups"].items()}


def alignment(D: Tensor, directions: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of ``D [d, F]``: the largest ``|cos|`` with a row of ``directions [n, d]`` and
    the share of its norm in their span."""
    D, directions = D.double(), directions.double()
    unit = directions / directions.norm(dim=1, keepdim=True)
    norms = D.norm(dim=0).clamp_min(1e-30)
    max_cos = (unit @ D).abs().max(dim=0).values / norms
    basis = torch.linalg.qr(directions.T).Q  # [d, n], orthonormal columns spanning the directions
    in_span = (basis.T @ D).norm(dim=0) / norms
    return max_cos, in_span


def mask_alignment(masks: Mapping[str, Mapping[int, Sequence[int]]], decoders: Mapping[int, Tensor],
                   planted: Mapping[str, tuple[int, Tensor]]) -> pl.DataFrame:
    """One row per (mask, feature, planted group at the feature's block)."""
    rows = []
    for name, mask in masks.items():
        for layer, features in sorted(mask.items()):
            groups = [(g, dirs) for g, (at, dirs) in planted.items() if at == layer]
            for feature in features:
                if not groups:
                    rows.append({"mask": name, "layer": layer, "feature": feature, "group": None, "max_cos": None,
                                 "in_span": None})
                for group, dirs in groups:
                    max_cos, in_span = alignment(decoders[layer][:, [feature]], dirs)
                    rows.append({"mask": name, "layer": layer, "feature": feature, "group": group,
                                 "max_cos": float(max_cos[0]), "in_span": float(in_span[0])})
    return pl.DataFrame(rows, schema=SCHEMA)


def planted_table(job: Job) -> None:
    """Stage: input ``it`` (the planted IT's directory), ``surrogates`` (one per layer of
    ``params.layers``) and one mask JSON per name of ``params.masks`` (a selection's file gives its
    filled mask and its passed steps); output ``parquet``, ``csv``."""
    planted = planted_directions(read_json(f"{job.input['it']}/{PLANT_FILE}"))
    decoders = {int(layer): surrogate.load(path)[0].D.detach()
                for layer, path in zip(job.params["layers"], job.inputs("surrogates"), strict=True)}
    masks = {}
    for name, path in zip(job.params["masks"], job.inputs("masks"), strict=True):
        obj = read_mask_file(path)
        masks[name] = mask_of(obj)
        if "passed_mask" in obj:
            masks[f"{name} (passed steps)"] = mask_of({"mask": obj["passed_mask"]})
    table = mask_alignment(masks, decoders, planted)
    for row in table.group_by("mask", "group", maintain_order=True).agg(pl.col("in_span").mean()).iter_rows():
        log.info("%s: mean share of decoder norm in the %s group's span %s", *row)
    write_parquet(table, job.output["parquet"])
    write_text(table.write_csv(), job.output["csv"])
