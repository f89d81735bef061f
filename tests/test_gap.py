"""The pair's gap and the teacher's truncation share (postdiff.stats.gap)."""

from __future__ import annotations

import json
import logging

import polars as pl
import pytest

from postdiff.stats import metrics
from postdiff.stats.gap import gap, pair_gap, truncated_share
from postdiff.workflow.runtime import Job


def teacher(eos: list[bool]) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"p{i}" for i in range(len(eos))], "eos": eos})


def test_truncated_share_counts_completions_without_a_stop():
    assert truncated_share(teacher([True, False, True, True])) == 0.25
    assert truncated_share(teacher([])) == 0.0


def test_gap_known_answer():
    out = gap({"Cap": 0.1, "Len": 40.0}, {"Cap": 0.7, "Len": 8.0})
    # float64 0.7 - 0.1 is 0.6 up to one rounding; approx's default 1e-6 relative.
    assert out == pytest.approx({"cap_pt": 0.1, "cap_it": 0.7, "cap_gap": 0.6, "len_pt": 40.0, "len_it": 8.0, "len_ratio": 5.0})


def test_pair_gap_reports_truncation_per_split_and_warns_above_five_percent(tmp_path, caplog):
    frames = metrics.synthetic_records({"PT": 0.0, "IT": 1.0}, n_per_slice=20)
    inputs = {}
    for name, frame in frames.items():
        inputs[name.lower()] = str(tmp_path / f"{name}.parquet")
        frame.write_parquet(inputs[name.lower()])
    shares = {"train": [True] * 99 + [False], "test": [True] * 9 + [False]}  # 1% and 10%
    for split, eos in shares.items():
        inputs[f"{split}_teacher"] = str(tmp_path / f"teacher_{split}.parquet")
        teacher(eos).write_parquet(inputs[f"{split}_teacher"])
    out = tmp_path / "gap.json"
    with caplog.at_level(logging.WARNING, logger="postdiff.stats.gap"):
        pair_gap(Job(input=inputs, output={"gap": str(out)}, params={"splits": ["train", "test"]}))
    result = json.loads(out.read_text())
    assert result["teacher_truncated"] == {"train": 0.01, "test": 0.1}
    warned = [r.getMessage() for r in caplog.records if "hit max_new_tokens" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("teacher test: 10.0% of IT completions")
