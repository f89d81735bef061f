"""Results across surrogate seeds: every seed's Table 1 side by side with the mean and range, a
figure of the spread, and how stable the selected masks are, matched by decoder direction.

The table and figure stages never import torch (seconds per job); the direction matching does,
on first use.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from itertools import permutations
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.figure import Figure

from postdiff import figures, tables
from postdiff.io import write_parquet, write_text
from postdiff.runtime import Job

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

SEED_FIGURE_METRICS = ("Cap", "CapRec", "VerbCarry", "KL", "Len")
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


def _paths(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _check_same_rows(tables_by_seed: Mapping[int, pl.DataFrame]) -> tuple[list[str], list[str]]:
    """The first table's variants and metrics, after checking every table has the same ones."""
    first_seed, first = next(iter(tables_by_seed.items()))
    variants, metric_names = first["Variant"].to_list(), [c for c in first.columns if c != "Variant"]
    for seed, table in tables_by_seed.items():
        names = table["Variant"].to_list()
        if len(set(names)) != len(names):
            raise ValueError(f"seed {seed}: duplicated variants in {names}")
        if set(names) != set(variants):
            raise ValueError(f"seed {seed}: variants differ from seed {first_seed}'s: missing "
                             f"{sorted(set(variants) - set(names))}, extra {sorted(set(names) - set(variants))}")
        if set(table.columns) - {"Variant"} != set(metric_names):
            raise ValueError(f"seed {seed}: metric columns {table.columns[1:]} differ from seed "
                             f"{first_seed}'s {metric_names}")
    return variants, metric_names


def across_seeds(tables_by_seed: Mapping[int, pl.DataFrame]) -> pl.DataFrame:
    """One row per variant and metric (variants in the first table's order, metrics in its
    column order): every seed's estimate as ``seed_<N>`` (seeds in the mapping's order), then
    ``n_finite``, ``mean``, ``min`` and ``max`` over the seeds whose estimate is not NaN (CapRec
    is NaN where the PT-to-IT gap is zero); all NaN gives NaN, with ``n_finite`` 0."""
    if not tables_by_seed:
        raise ValueError("across_seeds: no tables given")
    variants, metric_names = _check_same_rows(tables_by_seed)
    # [variant, metric, seed]; nulls (a column read back empty) are NaN too.
    values = np.stack([
        t.select(pl.col(m).cast(pl.Float64).fill_null(math.nan) for m in metric_names)
        .to_numpy()[[t["Variant"].to_list().index(v) for v in variants]]
        for t in tables_by_seed.values()], -1)
    known = ~np.isnan(values)
    n = known.sum(-1)
    with np.errstate(invalid="ignore"):
        mean = np.where(known, values, 0.0).sum(-1) / n
    lo = np.where(n > 0, np.where(known, values, np.inf).min(-1), np.nan)
    hi = np.where(n > 0, np.where(known, values, -np.inf).max(-1), np.nan)
    flat = values.reshape(-1, len(tables_by_seed))
    return pl.DataFrame({
        "Variant": np.repeat(variants, len(metric_names)).tolist(),
        "Metric": metric_names * len(variants),
        **{f"seed_{s}": flat[:, k] for k, s in enumerate(tables_by_seed)},
        "n_finite": n.reshape(-1).astype(np.int64),
        "mean": mean.reshape(-1), "min": lo.reshape(-1), "max": hi.reshape(-1),
    })


def seed_table(job: Job) -> None:
    """Stage. input.tables: every seed's table1.csv, in the order of params.seeds (ints);
    output.csv/md/tex (as Table 1's) and output.parquet (what :func:`seed_figure` reads)."""
    paths, seeds = _paths(job.input["tables"]), [int(s) for s in job.params["seeds"]]
    if len(paths) != len(seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"seed_table: need one table per distinct seed, got {len(paths)} tables for seeds {seeds}")
    table = across_seeds({seed: pl.read_csv(path) for seed, path in zip(seeds, paths)})
    tables.write_all(table, table, None, job.output)
    write_parquet(table, job.output["parquet"])
    log.info("across seeds %s: %d variants x metrics", seeds, table.height)


def _label(metric: str) -> str:
    return f"{metric} ({'lower' if metric in tables.LOWER_IS_BETTER else 'higher'} is better)"


def _seed_panel(ax, table: pl.DataFrame, metric: str, legend: bool) -> None:
    """Each seed's estimate as a dot, the min-max range as a line and the mean as a bar."""
    rows = table.filter(pl.col("Metric") == metric)
    variants = rows["Variant"].to_list()
    seed_columns = [c for c in rows.columns if c.startswith("seed_")]
    # An undefined estimate (CapRec with no gap) leaves its variant's slot empty.
    dots = rows.unpivot(index="Variant", on=seed_columns, variable_name="seed").filter(pl.col("value").is_not_nan())
    defined = (rows["n_finite"] > 0).to_numpy()
    x = np.arange(len(variants))[defined]
    ax.vlines(x, rows["min"].to_numpy()[defined], rows["max"].to_numpy()[defined], color="grey", linewidth=2, zorder=1)
    sns.stripplot(x=dots["Variant"].to_list(), y=dots["value"].to_numpy(), hue=dots["seed"].str.replace("seed_", "seed ").to_list(),
                  order=variants, jitter=0.15, size=5, legend=legend, ax=ax, zorder=2)
    ax.scatter(x, rows["mean"].to_numpy()[defined], marker="_", s=400, color="black", zorder=3, label="mean")
    ax.set_title(_label(metric))
    ax.set_xlabel("")
    for label in ax.get_xticklabels():
        label.set(rotation=60, ha="right", rotation_mode="anchor")


def draw_seeds(table: pl.DataFrame) -> Figure:
    """One panel per key Table 1 metric present in ``table`` (:func:`across_seeds`' layout)."""
    defined = table.filter(pl.col("n_finite") > 0)["Metric"].to_list()
    shown = [m for m in SEED_FIGURE_METRICS if m in defined]
    if not shown:
        raise ValueError(f"draw_seeds: none of {SEED_FIGURE_METRICS} has an estimate in the table")
    fig = figures.new_figure(3.2 * len(shown), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for k, (ax, metric) in enumerate(zip(axes, shown)):
        _seed_panel(ax, table, metric, legend=k == len(shown) - 1)
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def seed_figure(job: Job) -> None:
    """Stage. input.table: :func:`seed_table`'s Parquet; output.png/pdf."""
    figures.save(draw_seeds(pl.read_parquet(job.input["table"])), job.output)


def best_match(D_a: Tensor, D_b: Tensor) -> tuple[Tensor, Tensor]:
    """For each row of ``D_a`` ``[n_a, d]``, the index of the row of ``D_b`` ``[n_b, d]`` with the
    largest ``|cos|`` (ties: the lower index) and that ``|cos|``. A zero row has cos 0 with
    everything; with ``n_b == 0`` every index is -1 and every value NaN."""
    import torch
    import torch.nn.functional as F

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
    from postdiff.selection import mask_of, read_mask_file

    paths = _paths(job.input["masks"])
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
    from postdiff.surrogate import load

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
    modules = _paths(job.input["modules"])
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
