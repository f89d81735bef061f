"""The top features by each score, as a figure: its own job (``scores_plot``), apart from the
scores' model pass so that it imports no torch, and a plot-only param never reruns the scoring."""

from __future__ import annotations

import polars as pl
import seaborn as sns
from matplotlib.figure import Figure

from postdiff.method.selection.scores import SCORES
from postdiff.stats.canvas import new_figure
from postdiff.workflow.io import atomic_path
from postdiff.workflow.runtime import Job

DEFAULT_TOP_N = 10


def draw_scores(table: pl.DataFrame, top_n: int = DEFAULT_TOP_N) -> Figure:
    """Top features by each score."""
    fig = new_figure(4.5 * len(SCORES), 0.35 * top_n + 1.5)
    for ax, (column, label) in zip(fig.subplots(1, len(SCORES)), SCORES.items()):
        top = table.sort(column, descending=True).head(top_n)
        names = [f"L{layer}:{feature}" for layer, feature in zip(top["layer"], top["feature"])]
        sns.barplot(x=top[column].to_numpy(), y=names, ax=ax, color=sns.color_palette()[0], orient="h")
        ax.set_title(f"top {top_n} by {label} score")
        ax.set_xlabel(f"{column} (z across features)")
    return fig


def plot_scores(job: Job) -> None:
    """Stage: the top ``params.top_n`` features by each score (input ``scores``, from
    :func:`postdiff.method.selection.scoring.score_features`) as a PNG (``plot``)."""
    fig = draw_scores(pl.read_parquet(job.input["scores"]), int(job.params.get("top_n", DEFAULT_TOP_N)))
    with atomic_path(job.output["plot"]) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
