"""A blank figure on an Agg canvas, without pyplot (no global backend or state is touched).

Apart from :mod:`postdiff.stats.figures` so that a stage that draws one plot of its own (the
surrogate's training curve, the scores' plot) imports matplotlib only: not seaborn, and not
the tables and statistics the paper's figures read, whose edits would otherwise rerun every
job that imports the surrogate.
"""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig
