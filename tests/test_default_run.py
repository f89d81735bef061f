"""End-to-end: the default config, as shipped, reproduces the committed Table 1 of each seed.

The shipped pair makes the PT and IT rows the same on every machine up to greedy ties; the
surrogate rows move with float rounding in training. The tolerances are the README's.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from workflow_utils import copy_workflow, snakemake

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"
# README, "The default run": which numbers may move and by how much.
PAIR_CAP, PAIR_LEN, CAP_REC = 0.01, 0.5, 0.05


def test_default_run_reproduces_table1(tmp_path_factory: pytest.TempPathFactory) -> None:
    workdir = copy_workflow(tmp_path_factory.mktemp("default_run"))
    snakemake(workdir, configfile="config/config.yaml")
    for seed in (0, 1):  # the default's surrogate.seeds
        got = pl.read_csv(workdir / f"results/default/seed{seed}/tables/table1.csv")
        want = pl.read_csv(DATA / f"default_table1_seed{seed}.csv")
        assert got["Variant"].to_list() == want["Variant"].to_list()
        for g, w in zip(got.iter_rows(named=True), want.iter_rows(named=True)):
            if w["Variant"] in ("PT", "IT"):
                assert abs(g["Cap"] - w["Cap"]) <= PAIR_CAP and abs(g["Len"] - w["Len"]) <= PAIR_LEN, (seed, g, w)
            else:
                assert abs(g["CapRec"] - w["CapRec"]) <= CAP_REC, (seed, g["Variant"], g["CapRec"], w["CapRec"])
