"""Feature scores against behavioural endpoints on the selector split (SPEC §7).

Each feature is summarised per prompt by its mean ``z_j`` over the answer-phase positions of
the FullDelta teacher-forced pass, read inside the edit (the running, already-edited hidden
state the intervention sees). Each endpoint of FullDelta's generation is ridge-regressed on
the standardised summaries; the standardised coefficients, z-scored across features, are the
scores.

The verbosity score is the brevity-excess coefficient *negated*: high for a feature that
carries IT's brevity (predicts less excess). SPEC §7 leaves the sign open; both of its uses
need this one. VMask's selection removes the features whose subtraction raises length
(VerbCarry drops), and CapMask's exclusion keeps IT's brevity out of a capability mask (its
objective charges VerbCarry). With the coefficient's own sign both pools held the opposite
features: on the positive control the planted brevity features scored negative and VMask never
saw them (README, "The positive control").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from postdiff.method import variants as V
from postdiff.method.evaluate import load_pt
from postdiff.method.selection.inputs import aligned_records, selector_inputs
from postdiff.method.selection.scores import SCORE_SCHEMA, endpoint_values, feature_scores
from postdiff.method.spec import Variant
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.forward import block_outputs, length_sorted_batches
from postdiff.models.hook import intervene
from postdiff.models.template import teacher_forced_batch
from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job

DEFAULT_RIDGE_ALPHA = 1.0


@torch.inference_mode()
def feature_summaries(
    model: nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    variant: Variant,
    modules: Mapping[int, TopKSurrogate],
    batch_size: int,
) -> tuple[dict[int, Tensor], Tensor]:
    """Per prompt, mean ``z`` over answer positions of the ``variant`` pass: ``{layer: [N, F]}``,
    and the answer-position counts ``[N]``. The pass stops after the last edited block."""
    layers = variant.layers
    device = next(model.parameters()).device
    out = {layer: torch.zeros(len(pairs), modules[layer].n_features) for layer in layers}
    counts = torch.tensor([len(a) for _, a in pairs], dtype=torch.float64)
    edits = V.edits(variant, modules)
    for idx in tqdm(length_sorted_batches([len(p) + len(a) for p, a in pairs], batch_size), desc="feature summaries"):
        ids, attn, ans = teacher_forced_batch([pairs[i][0] for i in idx], [pairs[i][1] for i in idx], pad_id=0)
        ans = ans.to(device)
        sink: dict[int, Tensor] = {}
        recorded = {layer: V.watched(edits[layer], modules[layer], lambda z, layer=layer, sink=sink: sink.update({layer: z}))
                    for layer in layers}
        with intervene(model, recorded, ans):
            block_outputs(model, ids.to(device), attn.to(device), [max(layers)])
        weight = ans.float() / ans.sum(1, keepdim=True)
        for layer in layers:
            out[layer][idx] = torch.einsum("bt,btf->bf", weight.to(sink[layer].dtype), sink[layer]).float().cpu()
    return out, counts


def score_table(
    summaries: Mapping[int, Tensor],
    counts: Tensor,
    modules: Mapping[int, TopKSurrogate],
    records: pl.DataFrame,
    ridge_alpha: float,
) -> pl.DataFrame:
    """One row per (layer, feature); ``records`` in the same prompt order as ``summaries``."""
    layers = sorted(summaries)
    X = torch.cat([summaries[layer] for layer in layers], dim=1).double().numpy()
    scores = feature_scores(X, endpoint_values(records), ridge_alpha)
    w = (counts / counts.sum()).numpy()
    # z >= 0 after the ReLU, so mean |z_j| is the token-weighted mean of z_j.
    mean_z = w @ X
    norms = torch.cat([modules[layer].D.detach().norm(dim=0).double().cpu() for layer in layers]).numpy()
    return pl.DataFrame(
        {
            "layer": np.concatenate([np.full(summaries[layer].shape[1], layer) for layer in layers]),
            "feature": np.concatenate([np.arange(summaries[layer].shape[1]) for layer in layers]),
            **scores,
            "mean_z": mean_z,
            "activation_mass": mean_z * norms,
        },
        schema=SCORE_SCHEMA,
    )


def score_features(job: Job) -> None:
    """Stage: feature scores on the selector split.

    input: ``variant`` (FullDelta spec JSON), ``split``, ``teacher`` (selector), ``records``
    (FullDelta's selector records); params: ``ridge_alpha``, ``pt``, ``dtype``, ``device``,
    ``batch_size``; output: ``scores`` (Parquet). The plot is :func:`postdiff.method.selection.scoreplot.plot_scores`'s own job, so
    a plot-only param never reruns the scoring.
    """
    variant, rows = selector_inputs(job, "scoring")
    records = aligned_records(pl.read_parquet(job.input["records"]), rows["id"].to_list(), job.input["records"])
    ridge_alpha = float(job.params.get("ridge_alpha", DEFAULT_RIDGE_ALPHA))
    if ridge_alpha <= 0:
        raise ValueError(f"ridge_alpha must be > 0, got {ridge_alpha}")
    model, _ = load_pt(job.params)
    modules, _ = V.materialise(variant, next(model.parameters()).device)
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), strict=True))
    summaries, counts = feature_summaries(model, pairs, variant, modules, job.batch_size())
    table = score_table(summaries, counts, modules, records, ridge_alpha)
    write_parquet(table, job.output["scores"])
