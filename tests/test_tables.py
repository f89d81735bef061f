import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.collections import PathCollection

from postdiff.stats import bootstrap, figures, metrics, tables
from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job

LEVELS = {"PT": 0.0, "IT": 1.0, "FullDelta": 0.3, "CapMask": 0.0, "FullDelta - VMask": 0.25,
          "MeanDiff": 0.02, "FullDelta (late only)": 0.28}


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    paths = []
    for variant, df in metrics.synthetic_records(LEVELS, n_per_slice=15, seed=7).items():
        paths.append(str(root / f"{variant}.parquet"))
        write_parquet(df.sample(fraction=1.0, shuffle=True, seed=len(paths)), paths[-1])
    return paths


def _outputs(tmp_path, stem, kinds=("csv", "md", "tex")):
    return {k: str(tmp_path / f"{stem}.{k}") for k in kinds}


def test_table1_files_follow_input_order_and_metrics(evals, tmp_path):
    order = evals[::-1]
    out = _outputs(tmp_path, "table1")
    tables.table1(Job(input={"evals": order}, output=out))
    csv = pl.read_csv(out["csv"])
    assert csv.columns == ["Variant", *metrics.METRICS]
    assert csv["Variant"].to_list() == list(LEVELS)[::-1]
    expected = metrics.summary(metrics.align(metrics.read_eval(evals)))
    for row in csv.iter_rows(named=True):
        for m in metrics.METRICS:
            assert row[m] == pytest.approx(expected[row["Variant"]][m], abs=1e-12)
    md = Path(out["md"]).read_text().splitlines()
    assert len(md) == 2 + len(LEVELS) and md[0].startswith("| Variant | KL | Cap | CapRec |")
    assert "| PT | " in md[-1] and "| 0.000 |" in md[-1]
    tex = Path(out["tex"]).read_text()
    assert tex.startswith(r"\begin{tabular}{l" + "r" * len(metrics.METRICS) + "}") and r"QA\_EM" in tex
    # The lenient endpoints stand right after their exact-match columns.
    assert "QA\\_EM & QA\\_Lenient & Math\\_EM & Math\\_Lenient" in tex
    assert tex.count(r" \\") == 1 + len(LEVELS)


def test_markdown_and_latex_formatting_known_answer():
    df = pl.DataFrame({"Variant": ["A|B", "x_1 & 50%"], "KL": [1.23456, math.nan],
                       "Len": [12.0, 3.14159]})
    assert tables.to_markdown(df, {"Len": 1}) == (
        "| Variant | KL | Len |\n| :--- | ---: | ---: |\n"
        "| A\\|B | 1.235 | 12.0 |\n| x_1 & 50% | n/a | 3.1 |\n")
    assert tables.to_latex(df, {"Len": 1}) == (
        "\\begin{tabular}{lrr}\n\\toprule\nVariant & KL & Len \\\\\n\\midrule\n"
        "A|B & 1.235 & 12.0 \\\\\nx\\_1 \\& 50\\% & n/a & 3.1 \\\\\n"
        "\\bottomrule\n\\end{tabular}\n")


@pytest.mark.parametrize("metric, lo, hi, expected", [
    ("Cap", 0.043, 0.098, "CI excludes 0: higher (better)"),
    ("Len", -32.4, -29.0, "CI excludes 0: lower (better)"),
    ("Len", 0.515, 1.971, "CI excludes 0: higher (worse)"),
    ("VerbCarry", -0.067, -0.013, "CI excludes 0: lower (better)"),
    ("Cap", -0.099, -0.044, "CI excludes 0: lower (worse)"),
    ("Cap", 0.0, 0.0, "no difference in any resample"),
    ("KL", -0.01, 0.02, "CI includes 0"),
    ("CapRec", math.nan, math.nan, "undefined"),
])
def test_reading_is_direction_aware(metric, lo, hi, expected):
    assert tables.reading(metric, lo, hi) == expected


def test_table2_defaults_and_custom_comparisons(evals, tmp_path):
    out = _outputs(tmp_path, "table2")
    tables.table2(Job(input={"evals": evals}, output=out, params={"B": 300, "seed": 2}))
    csv = pl.read_csv(out["csv"])
    assert csv["comparison"].to_list() == [c.label for c in bootstrap.DEFAULT_COMPARISONS]
    assert csv.filter(pl.col("variant_a") == "CapMask")["reading"].item() in (
        "no difference in any resample", "CI includes 0")
    assert Path(out["md"]).read_text().startswith(
        "| Comparison | Metric | Delta | 95% CI | Reading |\n")
    custom = [{"a": "FullDelta (late only)", "b": "FullDelta", "metric": "KL", "label": "ablation"}]
    tables.table2(Job(input={"evals": evals}, output=out,
                      params={"B": 300, "seed": 2, "level": 0.9, "comparisons": custom}))
    row = pl.read_csv(out["csv"]).row(0, named=True)
    assert (row["comparison"], row["metric"], row["level"]) == ("ablation", "KL", 0.9)
    assert r"90\% CI" in Path(out["tex"]).read_text()


def test_figures_are_written(evals, tmp_path):
    sweep = tmp_path / "sweep.parquet"
    write_parquet(pl.DataFrame({"cutoff": [0.5, 1.0, 1.5, 2.0, 1.5],
                                "exclusion": [1.0, 1.0, 1.0, 1.0, 0.0],
                                "strict": [False, False, False, False, True],
                                "objective": [0.1, 0.12, 0.12, 0.08, 0.05],
                                "mask": ["a", "b", "b", "c", "d"],
                                "same_as_locked": [False, True, True, False, False],
                                "forced": [False, True, True, False, False], "pools_differ": [True] * 5}), sweep)
    out1, out2 = (_outputs(tmp_path, s, ("png", "pdf")) for s in ("fig1", "fig2"))
    params = {"B": 200, "seed": 0}
    figures.figure1(Job(input={"evals": evals}, output=out1,
                        params={**params, "variants": ["PT", "IT", "FullDelta", "CapMask"]}))
    figures.figure2(Job(input={"evals": [evals[2], evals[6]], "sweep": str(sweep)}, output=out2,
                        params=params))
    for out in (out1, out2):
        assert Path(out["png"]).read_bytes()[:4] == b"\x89PNG"
        assert Path(out["pdf"]).read_bytes()[:4] == b"%PDF"


def test_figure2_draws_the_strict_exclusion_apart_and_says_when_pools_never_differ(evals):
    """The strict exclusion is a series of its own (not on the locked exclusion's line, not
    averaged with the locked cutoff), and a sweep whose pools never differ says so."""
    sweep = pl.DataFrame({"cutoff": [1.0, 1.5, 1.5], "exclusion": [1.0, 1.0, 0.0], "strict": [False, False, True],
                          "objective": [0.2, 0.3, 0.1], "mask": ["a", "a", "b"],
                          "same_as_locked": [True, True, False], "forced": [False] * 3, "pools_differ": [False] * 3})
    ax = figures.draw_figure2(figure2_estimates(evals), sweep).axes[2]
    line = ax.lines[0].get_xydata()
    assert line.tolist() == [[1.0, 0.2], [1.5, 0.3]]  # the locked exclusion alone
    points = np.concatenate([c.get_offsets() for c in ax.collections if isinstance(c, PathCollection)])
    assert sorted(map(tuple, points.tolist())) == [(1.0, 0.2), (1.5, 0.1), (1.5, 0.3)]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "verb. exclusion 0 (strict)" in labels and "verb. exclusion 1" in labels
    assert figures.FORCED_LABEL not in labels
    assert "cannot tell them apart" in ax.get_title() and "forced" not in ax.get_title()
    differ = figures.draw_figure2(figure2_estimates(evals), sweep.with_columns(pl.lit(True).alias("pools_differ"))).axes[2]
    assert "cannot tell" not in differ.get_title()


def figure2_estimates(evals):
    return figures._estimates(Job(input={"evals": [evals[2], evals[6]]}, output={}, params={"B": 50}), figures.FIGURE2_METRICS)


def test_figure2_rings_forced_points_and_says_when_every_cutoff_is_forced(evals):
    """Forced points get a ring of their own (a legend entry says what it means); the title
    says so only when every cutoff under the locked exclusion was forced."""
    sweep = pl.DataFrame({"cutoff": [4.0, 5.0, 6.0, 5.0], "exclusion": [1.0, 1.0, 1.0, 0.0],
                          "strict": [False, False, False, True], "objective": [0.0, 0.0, 0.0, 0.1],
                          "mask": ["a", "a", "a", "b"], "same_as_locked": [True, True, True, False],
                          "forced": [True, True, True, False], "pools_differ": [True] * 4})
    ax = figures.draw_figure2(figure2_estimates(evals), sweep).axes[2]
    rings = [c for c in ax.collections if c.get_label() == figures.FORCED_LABEL]
    assert len(rings) == 1 and sorted(rings[0].get_offsets()[:, 0].tolist()) == [4.0, 5.0, 6.0]
    assert figures.FORCED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "verb. exclusion 0 (strict)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "every cutoff's mask forced" in ax.get_title() and "cannot tell" not in ax.get_title()
    one = figures.draw_figure2(figure2_estimates(evals), sweep.with_columns(
        forced=pl.Series([False, True, False, False]))).axes[2]
    rings = [c for c in one.collections if c.get_label() == figures.FORCED_LABEL]
    assert rings[0].get_offsets().tolist() == [[5.0, 0.0]] and "forced" not in one.get_title()


def test_sweep_summary_is_checked(tmp_path):
    path = tmp_path / "sweep.parquet"
    write_parquet(pl.DataFrame({"cutoff": [1.0], "objective": [0.1], "exclusion": [1.0], "strict": [False],
                                "pools_differ": [True]}), path)
    missing = r"sweep.parquet: missing columns \['mask', 'same_as_locked', 'forced'\]"
    with pytest.raises(ValueError, match=missing):
        figures.read_sweep(path)
    with pytest.raises(FileNotFoundError, match="absent.parquet"):
        figures.read_sweep(tmp_path / "absent.parquet")
