"""Table 1 (main results) and Table 2 (paired bootstrap comparisons) as CSV, Markdown and LaTeX."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence

import polars as pl

from postdiff.stats import bootstrap, metrics
from postdiff.workflow.io import read_json, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

TABLE1_DIGITS = {"KL": 3, "Cap": 3, "CapRec": 3, "Len": 2, "BrevEx": 2, "VerbCarry": 3,
                 "QA_EM": 3, "QA_Lenient": 3, "Math_EM": 3, "Math_Lenient": 3, "Format_Pass": 3, "Refusal": 3, "OverRefusal": 3}
_LATEX_ESCAPES = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}",
                                                      "^": r"\textasciicircum{}",
                                                      "\\": r"\textbackslash{}"}


def table1_frame(arrays: metrics.PromptArrays, pt: str = "PT", it: str = "IT") -> pl.DataFrame:
    """One row per variant (in the order of ``arrays``), one column per metric."""
    rows = metrics.summary(arrays, pt, it)
    return pl.DataFrame([{"Variant": v, **{m: vals.get(m, math.nan) for m in metrics.METRICS}}
                         for v, vals in rows.items()])


def reading(metric: str, lo: float, hi: float) -> str:
    """A direction-aware one-line reading of a paired interval for ``a - b``."""
    if math.isnan(lo) or math.isnan(hi):
        return "undefined"
    if lo == hi == 0:
        return "no difference in any resample"
    if lo <= 0 <= hi:
        return "CI includes 0"
    higher = lo > 0
    better = higher != (metric in metrics.LOWER_IS_BETTER)
    return f"CI excludes 0: {'higher' if higher else 'lower'} ({'better' if better else 'worse'})"


def table2_frame(comparisons: pl.DataFrame) -> pl.DataFrame:
    """Add the reading to :func:`postdiff.stats.bootstrap.bootstrap_comparisons`' output."""
    readings = [reading(*r) for r in comparisons.select("metric", "lo", "hi").iter_rows()]
    return comparisons.with_columns(reading=pl.Series(readings, dtype=pl.String))


def table2_display(table2: pl.DataFrame) -> pl.DataFrame:
    """The paper's layout: Comparison, Metric, Delta, CI, Reading."""
    level = table2["level"][0] if table2.height else 0.95
    ci = [f"[{_fmt(lo, 3)}, {_fmt(hi, 3)}]" for lo, hi in zip(table2["lo"], table2["hi"])]
    return pl.DataFrame({"Comparison": table2["comparison"], "Metric": table2["metric"],
                         "Delta": table2["delta"], f"{round(level * 100)}% CI": ci,
                         "Reading": table2["reading"]})


def _fmt(x: object, digits: int | None) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.{3 if digits is None else digits}f}"
    return str(x)


def _cells(df: pl.DataFrame, digits: Mapping[str, int] | None) -> list[list[str]]:
    digits = digits or {}
    return [[_fmt(x, digits.get(c)) for c, x in zip(df.columns, row)] for row in df.iter_rows()]


def to_markdown(df: pl.DataFrame, digits: Mapping[str, int] | None = None) -> str:
    """GitHub pipe table; float columns right-aligned, ``digits`` per column (default 3)."""
    align = ["---:" if df[c].dtype.is_float() else ":---" for c in df.columns]
    lines = [df.columns, align, *_cells(df, digits)]
    return "\n".join("| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"
                     for cells in lines) + "\n"


def _tex(s: str) -> str:
    return "".join(_LATEX_ESCAPES.get(c, c) for c in s)


def to_latex(df: pl.DataFrame, digits: Mapping[str, int] | None = None) -> str:
    """A booktabs ``tabular``."""
    spec = "".join("r" if df[c].dtype.is_float() else "l" for c in df.columns)
    body = [" & ".join(_tex(c) for c in cells) + r" \\" for cells in _cells(df, digits)]
    return "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                      " & ".join(_tex(c) for c in df.columns) + r" \\", r"\midrule",
                      *body, r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_all(csv: pl.DataFrame, display: pl.DataFrame, digits: Mapping[str, int] | None,
               output: Mapping[str, str]) -> None:
    write_text(csv.write_csv(), output["csv"])
    write_text(to_markdown(display, digits), output["md"])
    write_text(to_latex(display, digits), output["tex"])


def _evals(job: Job) -> Sequence[str]:
    paths = job.input["evals"]
    return [paths] if isinstance(paths, str) else list(paths)


def table1(job: Job) -> None:
    """input.evals: eval Parquets in row order; params.pt/it (default PT/IT);
    output.csv/md/tex."""
    arrays = metrics.align(metrics.read_eval(_evals(job)))
    frame = table1_frame(arrays, job.params.get("pt", "PT"), job.params.get("it", "IT"))
    write_all(frame, frame, TABLE1_DIGITS, job.output)
    log.info("table 1: %d variants x %d prompts", frame.height, len(arrays.ids))


def table2(job: Job) -> None:
    """input.evals: eval Parquets; params.comparisons (list of {a, b, metric, label?}; default
    the paper's), B, seed, level, pt, it; output.csv/md/tex."""
    comparisons = [bootstrap.Comparison.parse(c) for c in
                   job.params.get("comparisons") or bootstrap.DEFAULT_COMPARISONS]
    arrays = metrics.align(metrics.read_eval(_evals(job)))
    frame = table2_frame(bootstrap.bootstrap_comparisons(
        arrays, comparisons, B=int(job.params.get("B", 10_000)),
        seed=int(job.params.get("seed", 0)), level=float(job.params.get("level", 0.95)),
        pt=job.params.get("pt", "PT"), it=job.params.get("it", "IT")))
    write_all(frame, table2_display(frame), None, job.output)
    log.info("table 2: %d comparisons", frame.height)


def r2_table(job: Job) -> None:
    """input.metrics: per-layer surrogate metrics (layer, split, n, r2, dead_fraction)."""
    frame = pl.concat([pl.read_parquet(p) for p in job.input["metrics"]]).sort(["layer", "split"])
    write_all(frame, frame, None, job.output)


# The gates' table lives here, not beside the calibration (postdiff.method.gates), so that its
# job reads JSON without importing torch.
GATE_TABLE_SCHEMA = {"gates": pl.String, "alpha": pl.String, "calib_kl": pl.Float64, "tested_on": pl.String,
                     "grid_winner": pl.String, "n_compared": pl.Int64, "n_not_measured": pl.Int64,
                     "closest": pl.String, "closest_kl": pl.Float64, "diff": pl.Float64, "lo": pl.Float64,
                     "hi": pl.Float64, "tie": pl.Boolean, "n_tied": pl.Int64, "tied": pl.String}


def gate_table(job: Job) -> None:
    """Stage: one row per gates file of a seed (input ``choices``, named by params ``names``): the
    chosen gates, calib KL, the grid's winner, the compared gates (winner and neighbours)
    closest in KL with its tie test, whether any compared gates tie, and every measured gate
    vector that ties. Output ``csv``."""
    rows = []
    for name, path in zip(job.params["names"], job.inputs("choices"), strict=True):
        c = read_json(path)
        closest = c["closest"] or {}
        rows.append({"gates": name, "alpha": json.dumps(c["gates"]), "calib_kl": c["kl"], "tested_on": c["tested_on"],
                     "grid_winner": json.dumps(c["grid_winner"]), "n_compared": len(c["compared"]),
                     "n_not_measured": len(c["not_measured"]),
                     "closest": json.dumps(closest["gates"]) if closest else None, "closest_kl": closest.get("kl"),
                     **{k: closest.get(k) for k in ("diff", "lo", "hi")}, "tie": c["tie"], "n_tied": c["n_tied"],
                     "tied": json.dumps([t["gates"] for t in c["tied"]])})
    write_text(pl.DataFrame(rows, schema=GATE_TABLE_SCHEMA).write_csv(), job.output["csv"])
