"""Provenance records: the run id's parts and the run manifest's coverage."""

from __future__ import annotations

from pathlib import Path

from postdiff.outputs.provenance import run_id, run_manifest


def test_run_id_changes_with_config_code_and_models() -> None:
    base = run_id({"a": 1}, {"pt": "x", "it": "y"}, "code1")
    assert base == run_id({"a": 1}, {"it": "y", "pt": "x"}, "code1")
    assert len({base, run_id({"a": 2}, {"pt": "x", "it": "y"}, "code1"),
                run_id({"a": 1}, {"pt": "z", "it": "y"}, "code1"), run_id({"a": 1}, {"pt": "x", "it": "y"}, "code2")}) == 4


def test_run_manifest_covers_the_run_but_provenance_and_logs(tmp_path: Path) -> None:
    run = tmp_path / "results" / "r"
    files = ["cache/train/shard0.safetensors", "selection/vmask/step1.json", "pair/pt/config.json",
             "benchmarks/teacher/train.tsv", "benchmarks/provenance.tsv", "logs/suite.log",
             "provenance/manifest.parquet", "pair/tokenizer/.snakemake_timestamp"]
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(name)
    table = run_manifest(run, skip=[run / "benchmarks/provenance.tsv"])
    assert dict(zip(table["path"], table["kind"])) == {
        str(run / "benchmarks/teacher/train.tsv"): "benchmark",
        str(run / "cache/train/shard0.safetensors"): "artifact",
        str(run / "pair/pt/config.json"): "artifact",
        str(run / "selection/vmask/step1.json"): "artifact",
    }
    assert table["sha256"].str.len_chars().to_list() == [64] * 4
