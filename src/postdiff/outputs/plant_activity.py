"""Where the planted neurons fire in IT's own answers (the positive control's answer key as IT
uses it): each planted neuron's output norm ``|a_i| * ||down_i||`` at the answer-phase positions of
a split's teacher completions, per slice, at the stop (the position that predicts the EOS) and at
every other answer position.

The plant trains each group on the fine-tuning corpus; the masks are judged on IT's generations,
so where a neuron fires there, and how hard, is what a mask that "sits on the capability neuron"
adds or removes. The job's log gives each neuron's share of the summed output over all answer
positions (:func:`mass_shares`), the quantity ActivationMassMask ranks features by.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from tqdm import tqdm

from postdiff.method.records import read_rows
from postdiff.models.forward import block_outputs, length_sorted_batches
from postdiff.models.loading import decoder_layers, load_model
from postdiff.models.template import teacher_forced_batch
from postdiff.models.toy.settings import PLANT_FILE
from postdiff.workflow.io import read_json, write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SCHEMA = {"slice": pl.String, "position": pl.String, "group": pl.String, "neuron": pl.Int64, "layer": pl.Int64,
          "n_positions": pl.Int64, "mean_output": pl.Float64}


def planted_columns(model: nn.Module, record: Mapping[str, Any]) -> dict[int, list[tuple[str, int, int]]]:
    """Block -> its planted neurons ``(group, index in group, MLP column)``, in column order.

    Each neuron's column is found by its recorded direction, the column of the block's
    ``down_proj`` it equals (to bf16 rounding): the record keeps no column order of its own."""
    layers = decoder_layers(model)
    found: dict[int, list[tuple[str, int, int]]] = {}
    for name, group in record["groups"].items():
        block = int(group["layer"])
        weight = layers[block].mlp.down_proj.weight.detach().float()
        for i, direction in enumerate(group["directions"]):
            v = torch.tensor(direction, dtype=torch.float32)
            error = (weight - v[:, None].to(weight.device)).abs().amax(dim=0)
            column = int(error.argmin())
            if error[column] > 1e-2 * v.abs().max():
                raise ValueError(f"{PLANT_FILE}: no MLP column of block {block} is the direction of {name} neuron {i}")
            found.setdefault(block, []).append((name, i, column))
    return {block: sorted(neurons, key=lambda t: t[2]) for block, neurons in sorted(found.items())}


@torch.inference_mode()
def neuron_outputs(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
                   columns: Mapping[int, Sequence[int]], batch_size: int) -> list[dict[int, Tensor]]:
    """Per row, per block, the output norms ``[n_answer, len(columns[block])]`` of the MLP
    neurons ``columns[block]`` at the row's answer-phase positions."""
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    acts: dict[int, Tensor] = {}
    index = {b: torch.tensor(list(cols), device=device) for b, cols in columns.items()}
    norms = {b: layers[b].mlp.down_proj.weight[:, index[b]].norm(dim=0).float() for b in columns}
    hooks = [layers[b].mlp.down_proj.register_forward_pre_hook(
        lambda _m, args, b=b: acts.__setitem__(b, args[0][..., index[b]].float())) for b in columns]
    out: list[dict[int, Tensor]] = [{} for _ in pairs]
    try:
        for idx in tqdm(length_sorted_batches([len(p) + len(a) for p, a in pairs], batch_size), desc="planted neurons"):
            ids, attn, ans = teacher_forced_batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], pad_id=0)
            block_outputs(model, ids.to(device), attn.to(device), [max(columns)])  # stops after the last planted block
            for b in columns:
                outputs = (acts[b].abs() * norms[b]).cpu()
                for row, i in enumerate(idx):
                    out[i][b] = outputs[row][ans[row]]
    finally:
        for h in hooks:
            h.remove()
    return out


def activity_table(outputs: Sequence[Mapping[int, Tensor]], slices: Sequence[str], stopped: Sequence[bool],
                   neurons: Mapping[int, Sequence[tuple[str, int, int]]]) -> pl.DataFrame:
    """Mean output per (slice, stop or answer position, neuron), from :func:`neuron_outputs`."""
    frames = []
    for block, names in neurons.items():
        lengths = [len(o[block]) for o in outputs]
        labels = pl.DataFrame({
            "slice": np.repeat(slices, lengths),
            # A stopped row's last answer position is the one that predicts its EOS.
            "position": np.concatenate([np.where((np.arange(n) == n - 1) & stop, "stop", "answer")
                                        for n, stop in zip(lengths, stopped, strict=True)]),
        })
        values = torch.cat([o[block] for o in outputs]).double().numpy()
        frames += [labels.with_columns(output=values[:, i], group=pl.lit(group), neuron=pl.lit(index), layer=pl.lit(block))
                   for i, (group, index, _column) in enumerate(names)]
    long = pl.concat(frames)
    table = (long.group_by("slice", "position", "group", "neuron", "layer")
             .agg(n_positions=pl.len(), mean_output=pl.col("output").mean()))
    return table.select(list(SCHEMA)).cast(SCHEMA).sort("layer", "group", "neuron", "slice", "position")


def mass_shares(table: pl.DataFrame) -> pl.DataFrame:
    """Each neuron's share of the planted neurons' summed output over every answer position."""
    total = (table.with_columns(summed=pl.col("mean_output") * pl.col("n_positions"))
             .group_by("layer", "group", "neuron").agg(pl.col("summed").sum()))
    return total.with_columns(mass=pl.col("summed") / pl.col("summed").sum()).drop("summed").sort("layer", "group", "neuron")


def plant_activity(job: Job) -> None:
    """Stage: input ``split``, ``teacher`` (IT's completions of one split) and the pair; params
    ``it``, ``dtype``, ``device``, ``batch_size``; output ``parquet``, ``csv``."""
    p = job.params
    record = read_json(f"{p['it']}/{PLANT_FILE}")
    model, _ = load_model(p["it"], p.get("dtype", "auto"), p.get("device", "auto"))
    neurons = planted_columns(model, record)
    rows = read_rows(job.input["split"], job.input["teacher"])
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    outputs = neuron_outputs(model, pairs, {b: [c for *_, c in v] for b, v in neurons.items()}, job.batch_size())
    table = activity_table(outputs, rows["slice"].to_list(), rows["teacher_eos"].to_list(), neurons)
    for row in mass_shares(table).iter_rows(named=True):
        log.info("%s neuron %d (block %d): %.1f%% of the planted output", row["group"], row["neuron"], row["layer"], 100 * row["mass"])
    write_parquet(table, job.output["parquet"])
    write_text(table.write_csv(), job.output["csv"])
