import math
from pathlib import Path

import polars as pl
import pytest

from postdiff.stats import figures, seeds
from postdiff.workflow.runtime import Job

NAN = math.nan
SEED3 = pl.DataFrame({"Variant": ["PT", "IT", "CapMask"], "KL": [1.0, 0.0, 0.8],
                      "Cap": [0.2, 0.6, 0.3], "CapRec": [NAN, 1.0, 0.25]})
# Seed 5: rows in another order, CapMask's CapRec undefined.
SEED5 = pl.DataFrame({"Variant": ["CapMask", "PT", "IT"], "KL": [0.6, 1.0, 0.0],
                      "Cap": [0.4, 0.2, 0.6], "CapRec": [NAN, NAN, NAN]})


def test_across_seeds_known_answer():
    table = seeds.across_seeds({3: SEED3, 5: SEED5})
    assert table.columns == ["Variant", "Metric", "seed_3", "seed_5", "n_finite", "mean", "min", "max"]
    assert table["Variant"].to_list() == ["PT"] * 3 + ["IT"] * 3 + ["CapMask"] * 3
    assert table["Metric"].to_list() == ["KL", "Cap", "CapRec"] * 3
    kl = table.filter((pl.col("Variant") == "CapMask") & (pl.col("Metric") == "KL")).row(0)
    assert kl[2:] == pytest.approx((0.8, 0.6, 2, 0.7, 0.6, 0.8))  # float64 mean (0.8 + 0.6) / 2: one rounding
    rec = table.filter((pl.col("Variant") == "CapMask") & (pl.col("Metric") == "CapRec")).row(0)
    assert rec[2] == 0.25 and math.isnan(rec[3]) and rec[4:] == (1, 0.25, 0.25, 0.25)
    none = table.filter((pl.col("Variant") == "PT") & (pl.col("Metric") == "CapRec")).row(0)
    assert none[4] == 0 and all(math.isnan(x) for x in none[5:])


def test_across_seeds_refuses_different_variants():
    other = SEED5.with_columns(pl.col("Variant").replace("CapMask", "VMask"))
    with pytest.raises(ValueError, match=r"seed 5: variants differ from seed 3's: missing \['CapMask'\], extra \['VMask'\]"):
        seeds.across_seeds({3: SEED3, 5: other})
    with pytest.raises(ValueError, match=r"seed 5: metric columns"):
        seeds.across_seeds({3: SEED3, 5: SEED5.drop("CapRec")})


def test_seed_table_and_figure_stages(tmp_path):
    paths = []
    for seed, frame in ((3, SEED3), (5, SEED5)):
        paths.append(str(tmp_path / f"seed{seed}" / "table1.csv"))
        Path(paths[-1]).parent.mkdir()
        frame.write_csv(paths[-1])
    out = {k: str(tmp_path / f"seeds.{k}") for k in ("csv", "md", "tex", "parquet")}
    seeds.seed_table(Job(input={"tables": paths}, output=out, params={"seeds": [3, 5]}))
    table = pl.read_parquet(out["parquet"])
    assert table.equals(seeds.across_seeds({3: SEED3, 5: SEED5}))
    assert pl.read_csv(out["csv"]).columns == table.columns
    md = Path(out["md"]).read_text().splitlines()
    assert md[0] == "| Variant | Metric | seed_3 | seed_5 | n_finite | mean | min | max |"
    assert md[-1] == "| CapMask | CapRec | 0.250 | n/a | 1 | 0.250 | 0.250 | 0.250 |"
    assert r"seed\_3 & seed\_5" in Path(out["tex"]).read_text()
    with pytest.raises(ValueError, match="one table per distinct seed, got 2 tables for seeds \\[3\\]"):
        seeds.seed_table(Job(input={"tables": paths}, output=out, params={"seeds": [3]}))

    figs = {k: str(tmp_path / f"seeds.{k}") for k in ("png", "pdf")}
    figures.seed_figure(Job(input={"table": out["parquet"]}, output=figs))
    assert Path(figs["png"]).read_bytes()[:4] == b"\x89PNG"
    assert Path(figs["pdf"]).read_bytes()[:4] == b"%PDF"
    fig = figures.draw_seeds(table)
    assert [ax.get_title() for ax in fig.axes] == [
        "Cap (higher is better)", "CapRec (higher is better)", "KL (lower is better)"]
    # A metric no seed defines (CapRec of a pair with no gap) gets no panel; a partly defined one
    # draws its defined variants only.
    undefined = table.with_columns(
        pl.when(pl.col("Metric") == "CapRec").then(float("nan")).otherwise(pl.col(c)).alias(c)
        for c in ("seed_3", "seed_5", "mean", "min", "max")
    ).with_columns(n_finite=pl.when(pl.col("Metric") == "CapRec").then(0).otherwise(pl.col("n_finite")))
    assert [ax.get_title() for ax in figures.draw_seeds(undefined).axes] == ["Cap (higher is better)", "KL (lower is better)"]
