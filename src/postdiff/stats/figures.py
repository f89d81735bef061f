"""Figure 1 (main variants), Figure 2 (one-layer ablation, threshold sweep) and the spread across
surrogate seeds, drawn with seaborn. Figures live apart from the tables and stages they plot, so
that only figure jobs import seaborn (a second and a half per job).

Figures are built on an Agg canvas without pyplot (:mod:`postdiff.stats.canvas`), so no global
backend or state is touched.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from postdiff.stats import bootstrap, metrics
from postdiff.stats.canvas import new_figure
from postdiff.workflow.io import atomic_path
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

FIGURE1_METRICS = ("Cap", "KL", "Len")
FIGURE2_METRICS = ("KL", "Cap")
SEED_FIGURE_METRICS = ("Cap", "CapRec", "VerbCarry", "KL", "Len")
SWEEP_COLUMNS = {"cutoff": pl.Float64, "exclusion": pl.Float64, "strict": pl.Boolean, "objective": pl.Float64,
                 "mask": pl.String, "same_as_locked": pl.Boolean, "forced": pl.Boolean, "pools_differ": pl.Boolean}
FORCED_LABEL = "forced: every step a tie, the pool's top by score"
_LABELS = {"Cap": "Cap (higher is better)", "KL": "KL to IT (lower is better)",
           "Len": "Len, tokens (lower is better)"}


def _bars(ax: Axes, estimates: pl.DataFrame, metric: str) -> None:
    """Point estimates as bars, percentile intervals as error bars, variants in row order."""
    rows = estimates.filter(pl.col("metric") == metric)
    est, lo, hi = (rows[c].to_numpy() for c in ("estimate", "lo", "hi"))
    sns.barplot(x=rows["variant"].to_list(), y=est, ax=ax, color=sns.color_palette()[0])
    # Drawn about the interval's midpoint: a percentile interval need not contain the estimate
    # (a skewed statistic such as KL, or float noise at a boundary), so est-relative yerr can be < 0.
    ax.errorbar(np.arange(len(est)), (lo + hi) / 2, yerr=(hi - lo) / 2, fmt="none",
                ecolor="black", capsize=3, linewidth=1)
    ax.set_title(_LABELS.get(metric, metric))
    ax.set_xlabel("")
    ax.tick_params(axis="x", labelrotation=60)


def draw_figure1(estimates: pl.DataFrame) -> Figure:
    """Cap, KL and Len of the main variants with bootstrap intervals."""
    fig = new_figure(12, 4)
    for ax, metric in zip(fig.subplots(1, len(FIGURE1_METRICS)), FIGURE1_METRICS):
        _bars(ax, estimates, metric)
    return fig


def draw_figure2(estimates: pl.DataFrame, sweep: pl.DataFrame) -> Figure:
    """Left: KL and Cap of the full surrogate and its one-layer ablations. Right: selector
    objective per cutoff under the locked exclusion (a line), the strict exclusion as a series of
    its own, each point marked by whether it reproduces the locked mask and ringed when its mask
    was forced; the title says so when the locked exclusion's cutoffs all had one candidate pool
    or were all forced, since then reproducing the locked mask is by construction."""
    fig = new_figure(13, 4)
    axes = fig.subplots(1, 3, width_ratios=[1, 1, 1.4])
    for ax, metric in zip(axes, FIGURE2_METRICS):
        _bars(ax, estimates, metric)
    ax = axes[2]
    sweep = sweep.sort("strict", "cutoff")
    locked_exclusion = sweep.filter(~pl.col("strict"))
    sns.lineplot(x=locked_exclusion["cutoff"].to_numpy(), y=locked_exclusion["objective"].to_numpy(), ax=ax,
                 color="grey", linewidth=1)
    hue_order = ["reproduces locked mask", "other mask"]
    hue = np.where(sweep["same_as_locked"].to_numpy(), *hue_order)
    series = [f"verb. exclusion {e:g}{' (strict)' if strict else ''}"
              for e, strict in sweep.select("exclusion", "strict").iter_rows()]
    style_order = list(dict.fromkeys(series))
    sns.scatterplot(x=sweep["cutoff"].to_numpy(), y=sweep["objective"].to_numpy(), hue=hue, hue_order=hue_order,
                    style=series, style_order=style_order, markers=["o", "X", "s", "D"][: len(style_order)], s=70, ax=ax)
    forced = sweep.filter("forced")
    if forced.height:
        ax.scatter(forced["cutoff"].to_numpy(), forced["objective"].to_numpy(), s=240, facecolors="none",
                   edgecolors="black", linewidths=1.2, label=FORCED_LABEL)
        ax.legend(*ax.get_legend_handles_labels(), fontsize=8)
    ax.set_xlabel("capability cutoff")
    ax.set_ylabel("selector objective")
    notes = []
    if not sweep["pools_differ"].any():
        notes.append("every cutoff had the same candidate pool: the sweep cannot tell them apart")
    if locked_exclusion["forced"].all():
        notes.append("every cutoff's mask forced: its pool's top by score, not selected")
    ax.set_title("\n".join(["Threshold sweep", *(f"({n})" for n in notes)]), fontsize=9 if notes else None)
    return fig


def read_sweep(path: str | os.PathLike) -> pl.DataFrame:
    if not Path(path).is_file():
        raise FileNotFoundError(f"threshold sweep summary not found: {path}")
    df = pl.read_parquet(path)
    missing = [c for c in SWEEP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; need {list(SWEEP_COLUMNS)}")
    if df.height == 0:
        raise ValueError(f"{path}: threshold sweep summary has no rows")
    return df.select(pl.col(c).cast(t) for c, t in SWEEP_COLUMNS.items())


def save(fig: Figure, output: Mapping[str, str]) -> None:
    for fmt in ("png", "pdf"):
        with atomic_path(output[fmt]) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)


def _estimates(job: Job, metric_names: Sequence[str]) -> pl.DataFrame:
    paths = job.input["evals"]
    arrays = metrics.align(metrics.read_eval([paths] if isinstance(paths, str) else paths))
    variants = job.params.get("variants") or arrays.variants
    return bootstrap.bootstrap_estimates(
        arrays, variants, metric_names, B=int(job.params.get("B", 10_000)),
        seed=int(job.params.get("seed", 0)), level=float(job.params.get("level", 0.95)),
        pt=job.params.get("pt", "PT"), it=job.params.get("it", "IT"))


def figure1(job: Job) -> None:
    """input.evals: eval Parquets; params.variants (default: all, input order), B, seed, level;
    output.png/pdf."""
    save(draw_figure1(_estimates(job, FIGURE1_METRICS)), job.output)


def figure2(job: Job) -> None:
    """input.evals: eval Parquets of the full surrogate and its one-layer ablations (plus any
    references to show); input.sweep: sweep summary Parquet; params as figure1; output.png/pdf."""
    sweep = read_sweep(job.input["sweep"])
    save(draw_figure2(_estimates(job, FIGURE2_METRICS), sweep), job.output)


def _label(metric: str) -> str:
    return f"{metric} ({'lower' if metric in metrics.LOWER_IS_BETTER else 'higher'} is better)"


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
    """One panel per key Table 1 metric present in ``table`` (:func:`postdiff.stats.seeds.across_seeds`' layout)."""
    defined = table.filter(pl.col("n_finite") > 0)["Metric"].to_list()
    shown = [m for m in SEED_FIGURE_METRICS if m in defined]
    if not shown:
        raise ValueError(f"draw_seeds: none of {SEED_FIGURE_METRICS} has an estimate in the table")
    fig = new_figure(3.2 * len(shown), 4.5)
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for k, (ax, metric) in enumerate(zip(axes, shown)):
        _seed_panel(ax, table, metric, legend=k == len(shown) - 1)
    axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    return fig


def seed_figure(job: Job) -> None:
    """Stage. input.table: :func:`postdiff.stats.seeds.seed_table`'s Parquet; output.png/pdf."""
    save(draw_seeds(pl.read_parquet(job.input["table"])), job.output)
