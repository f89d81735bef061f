"""The cost preview against what a dry run plans and what the tiny run did."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from workflow_utils import TINY, copy_workflow, planned_jobs

from postdiff.data.checkers import SLICES
from postdiff.plan import JobFacts, Lengths, dag_jobs, disk_bytes, job_work, plan, report, split_sizes

REHEARSAL = "config/rehearsal.yaml"
CONFIG = {
    "layers": [3, 5],
    "pair": {"device": "cpu"},
    "cache": {"n_shards": 2, "dtype": "bfloat16"},
    "evaluate": {"n_shards": 2, "max_new_tokens": 7},
    "selection": {"size_cap": 3, "max_candidates": 4, "n_shards": 2, "max_new_tokens": 6},
    "gates": {"grid": [0.0, 0.5, 1.0], "max_rounds": 2, "refine": True},
    "surrogate": {"steps": 10, "batch_size": 8, "expansion": 4, "seeds": [0, 1]},
}
SIZES = {"train": 20, "calib": 6, "selector": 12, "test": 12}
LN = Lengths(prefix=10, answer=5, source="hand-made")


def _job(rule: str, gpu: bool = True, **wildcards: str) -> JobFacts:
    return JobFacts(rule=rule, stage="s", wildcards=wildcards, gpu=gpu, loads=gpu)


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        # 20 prompts decode 5 tokens each after a 10-token prefill.
        (_job("teacher", split="train"), (100, 200, 0)),
        # Half of 20 prompts, 15 tokens each, through PT and IT.
        (_job("cache_shard", split="train", shard="0"), (0, 2 * 10 * 15, 0)),
        (_job("train_surrogate", seed="0", layer="3"), (0, 0, 80)),
        # 6 of 12 prompts: generation (prefill, decoding to the budget of 7), then KL through the
        # variant and IT on the teacher's 15 tokens.
        (_job("evaluate", eval_split="test", variant="PT", seeddir="", shard="1"), (6 * 7, 60 + 2 * 6 * 15, 0)),
        (_job("evaluate_teacher", gpu=False, eval_split="test", variant="IT", seeddir=""), (0, 0, 0)),
        # Both layers: the shared sweep (3 points) and 2 rounds x 2 layers x 3 points = 15 passes,
        # then the refinement's 12 passes x 2 layers x 2 rounds, after IT's reference once, over
        # 6 calib prompts of 15 tokens.
        (_job("gates_full", seed="0"), (0, 6 * 15 * (16 + 48), 0)),
        (_job("gates_single", seed="0"), (0, 6 * 15 * (4 + 24), 0)),
        # 3 steps over 4 candidates, each step with its incumbent: (5 + 4 + 3) masks x 12 prompts
        # to a budget of 6; or a shard's half of the candidates and the incumbent.
        (_job("select_cap", seed="0"), (12 * 12 * 6, 12 * 12 * 10, 0)),
        (_job("select_cap", gpu=False, seed="0"), (0, 0, 0)),
        (_job("select_vmask_shard", seed="0", step="1", shard="0"), (3 * 12 * 6, 3 * 12 * 10, 0)),
    ],
)
def test_work_of_a_job_by_hand(job: JobFacts, expected: tuple) -> None:
    assert job_work(job, CONFIG, SIZES, LN) == expected


def test_bytes_by_hand() -> None:
    d = 16
    written = disk_bytes(CONFIG, SIZES, LN, d)
    # 50 prompts x 5 answer positions x (2 layers x h_pt and delta x 16 x 2 bytes + row and position).
    assert written["caches"]["cache"] == 50 * 5 * (2 * 2 * 16 * 2 + 8)
    # Per layer and seed, fp32: mu, sigma, b_dec (16 each), b_enc (64), W_enc and D (64 x 16 each).
    assert written["surrogate"]["surrogate"] == 4 * 4 * (3 * 16 + 64 + 2 * 64 * 16)
    assert disk_bytes(CONFIG, SIZES, LN, None) == {}


@pytest.mark.parametrize("configfile", [TINY, REHEARSAL])
def test_job_counts_are_the_dry_runs(configfile: str, tmp_path: Path) -> None:
    workdir = copy_workflow(tmp_path)
    expected = planned_jobs(workdir, configfile=configfile)  # snakemake -n's own job stats
    config, jobs = dag_jobs(workdir, [workdir / configfile])
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    assert counts == expected
    stages, _, d = plan(config, jobs, workdir)
    # The toy's hidden_size, or the twin's config read from the shipped Hugging Face cache.
    assert d == {TINY: 64, REHEARSAL: 128}[configfile]
    assert sum(s.jobs for s in stages.values()) == sum(expected.values())
    assert sum(s.gpu_jobs for s in stages.values()) == sum(j.gpu for j in jobs) > 0


def assert_plan_matches_run(workdir: Path, configfile: str) -> None:
    """The preview of a finished run against what the run did: tokens, and bytes on disk."""
    config, jobs = dag_jobs(workdir, [workdir / configfile])
    run = workdir / "results" / config["run"]
    # Before anything is written, split sizes come from suite.sizes per slice: the files agree.
    assert split_sizes(config, workdir / "nowhere") == split_sizes(config, run) == {
        s: config["suite"]["sizes"][s] * len(SLICES) for s in ("train", "calib", "selector", "test")}
    stages, ln, _ = plan(config, jobs, workdir)
    assert ln.source.startswith("measured")

    teacher = pl.concat([pl.read_parquet(p) for p in (run / "teacher").glob("*.parquet")])
    answers = int(teacher["token_ids"].list.len().sum())
    sequences = answers + int(teacher["prefix_ids"].list.len().sum())
    assert stages["teacher"].generated == pytest.approx(answers, rel=1e-9)
    assert stages["caches"].forced == pytest.approx(2 * sequences, rel=1e-9)

    # The preview counts every variant's records at their budget: an upper bound, reached when
    # nothing stops early (the tiny run). Variants that recover IT's early stop decode less, and
    # how much less moves with the CPU's rounding: 90.3% to 92.4% of the budget on the rehearsal
    # run under three ATEN_CPU_CAPABILITY settings, so the floor is 85%.
    records = pl.concat([pl.read_parquet(p) for p in run.glob("**/eval/*/*.parquet")])
    generated = records.filter(pl.col("variant") != "IT")
    actual = int(generated["n_tokens"].sum() + generated["eos"].sum())
    assert 0.85 * stages["evaluate"].generated <= actual <= stages["evaluate"].generated

    # Tensor bytes; the files add their headers (ids and metadata), well under 10% here.
    cache_files = sum(p.stat().st_size for p in (run / "cache").glob("*/shard*.safetensors"))
    assert stages["caches"].disk_bytes["cache"] == pytest.approx(cache_files, rel=0.10)
    surrogates = sum(p.stat().st_size for p in run.glob("seed*/surrogate/L*.safetensors"))
    assert stages["surrogate"].disk_bytes["surrogate"] == pytest.approx(surrogates, rel=0.10)

    text = report(config, jobs, workdir)
    assert "not measured" in text and THROUGHPUT_LINE in text


def test_tokens_and_bytes_match_the_tiny_run(tiny_run: Path) -> None:
    assert_plan_matches_run(tiny_run, TINY)


THROUGHPUT_LINE = "generated 2,500/s, forced 60,000/s, surrogate_rows 34,000/s, 30 s per model load"


def test_the_command_prints_the_table_and_its_assumptions(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from postdiff.plan import main

    workdir = copy_workflow(tmp_path)
    main(["--configfile", str(workdir / "config/gemma3-4b.yaml"), "--directory", str(workdir)])
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:4] == ["128", "64", "64"]
    assert "seed 0 26 / 26; seed 1 26 / 26" in out and THROUGHPUT_LINE in out and "width: 2560" in out
    assert not (workdir / "results").exists()
