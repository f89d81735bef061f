"""End-to-end: the default config, as shipped, reproduces the committed Table 1.

The shipped pair makes the PT and IT rows the same on every machine up to greedy ties; the
surrogate rows move with float rounding in training. The tolerances are the README's.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from workflow_utils import copy_workflow, snakemake

pytestmark = pytest.mark.slow
EXPECTED = Path(__file__).parent / "data" / "default_table1.csv"
# README, "The default run": which numbers may move and by how much.
PAIR_CAP, PAIR_LEN, CAP_REC = 0.01, 0.5, 0.05


def test_default_run_reproduces_table1(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = copy_workflow(tmp_path_factory.mktemp("default_run"))
    snakemake(workdir, configfile="config/config.yaml")
    got = pl.read_csv(workdir / "results/default/seed0/tables/table1.csv")
    want = pl.read_csv(EXPECTED)
    assert got["Variant"].to_list() == want["Variant"].to_list()
    for g, w in zip(got.iter_rows(named=True), want.iter_rows(named=True)):
        if w["Variant"] in ("PT", "IT"):
            assert abs(g["Cap"] - w["Cap"]) <= PAIR_CAP and abs(g["Len"] - w["Len"]) <= PAIR_LEN, (g, w)
        else:
            assert abs(g["CapRec"] - w["CapRec"]) <= CAP_REC, (g["Variant"], g["CapRec"], w["CapRec"])
