"""The cost preview against what a dry run plans and what the tiny run did."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

import polars as pl
import pytest
from workflow_utils import REPO, TINY, copy_workflow, planned_jobs

from postdiff.data.checkers import SLICES
from postdiff.plan import (
    HIGH,
    LOW,
    MIN_RUNTIME,
    Estimates,
    JobFacts,
    Lengths,
    dag_jobs,
    disk_bytes,
    job_seconds,
    job_work,
    plan,
    read_estimates,
    report,
    runtime_request,
    selection_share,
    site_problems,
    split_sizes,
    verified_share,
)

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
        # then the refinement's 12 passes x (2 layers + 1) line searches x 2 rounds, after IT's
        # reference once, over 6 calib prompts of 15 tokens.
        (_job("gates_full", seed="0"), (0, 6 * 15 * (16 + 72), 0)),
        (_job("gates_single", seed="0"), (0, 6 * 15 * (4 + 48), 0)),
        # 3 steps over 4 candidates, each step with its incumbent: (5 + 4 + 3) masks x 12 prompts
        # to a budget of 6; or a shard's half of the candidates and the incumbent.
        (_job("select_cap", seed="0"), (12 * 12 * 6, 12 * 12 * 10, 0)),
        (_job("select_cap", gpu=False, seed="0"), (0, 0, 0)),
        (_job("select_vmask_shard", seed="0", step="1", shard="0"), (3 * 12 * 6, 3 * 12 * 10, 0)),
    ],
)
def test_work_of_a_job_by_hand(job: JobFacts, expected: tuple) -> None:
    assert job_work(job, CONFIG, SIZES, LN) == expected


def test_verified_selection_work_by_hand() -> None:
    """With selection.verify, 3/4 of candidate rows settled: each step decodes the incumbent's 12
    rows, the unsettled quarter of its candidates' and, at most, one incumbent row again per
    unsettled row; every row is teacher-forced on prefix and budget (10 + 6 tokens)."""
    config = {**CONFIG, "selection": {**CONFIG["selection"], "verify": True}}
    unsettled = [0.25 * c * 12 for c in (4, 3, 2)]  # of (5 + 4 + 3) masks, the incumbent first
    decoded = sum(12 + 2 * u for u in unsettled)
    assert job_work(_job("select_cap", seed="0"), config, SIZES, LN, 0.75) == (decoded * 6,
                                                                                decoded * 10 + 12 * 12 * 16, 0)
    # Verification off: the share is not used.
    assert job_work(_job("select_cap", seed="0"), CONFIG, SIZES, LN, 0.75) == (12 * 12 * 6, 12 * 12 * 10, 0)
    # Nothing settled: every row decodes, and every prompt's incumbent once more.
    none = sum(12 + c * 12 + 12 for c in (4, 3, 2))
    assert job_work(_job("select_cap", seed="0"), config, SIZES, LN, 0.0)[0] == none * 6


def test_the_verified_share_is_the_benchmarks_at_the_configs_margin(tmp_path: Path) -> None:
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    step = {"candidate_rows": 100, "share_verified": 0.9}
    meta = {"run": "results/default", "seed": 0, "device": "cpu", "torch": "2.13.0+cpu"}
    (results / "selection_verify.json").write_text(json.dumps(
        {**meta, "verify_margin": 0.001, "verify_vs_plain": {"8": {"1": step, "2": {**step, "candidate_rows": 300,
                                                                                       "share_verified": 0.5}}}}))
    (results / "selection_verify_other.json").write_text(json.dumps(
        {**meta, "verify_margin": 0.05, "verify_vs_plain": {"8": {"1": {**step, "share_verified": 0.1}}}}))
    found = verified_share(tmp_path, 0.001)
    assert found.share == pytest.approx((90 + 150) / 400)
    assert found.source.startswith("measured: bench/results/selection_verify.json (results/default seed 0, cpu")
    assert verified_share(tmp_path, 0.05).share == pytest.approx(0.1) and verified_share(tmp_path, 0.2) is None
    on = {"selection": {"verify": True, "verify_margin": 0.05}}
    assert selection_share(on, tmp_path, None)[0] == pytest.approx(0.1)
    assert selection_share(on, tmp_path, 0.7) == (0.7, "selection.verify on: 70.0% of candidate rows verified, not "
                                                       "generated (given by --verified-share)")
    assert selection_share({"selection": {"verify": True, "verify_margin": 0.2}}, tmp_path, None)[0] == 0.0
    assert selection_share({"selection": {"verify": False}}, tmp_path, 0.7)[0] is None


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
    config, jobs, _ = dag_jobs(workdir, [workdir / configfile])
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.rule] = counts.get(job.rule, 0) + 1
    assert counts == expected
    stages, _, d = plan(config, jobs, workdir, Estimates())
    # The toy's hidden_size, or the twin's config read from the shipped Hugging Face cache.
    assert d == {TINY: 64, REHEARSAL: 128}[configfile]
    assert sum(s.jobs for s in stages.values()) == sum(expected.values())
    assert sum(s.gpu_jobs for s in stages.values()) == sum(j.gpu for j in jobs) > 0


# Of the budget that the preview counts, the share an evaluation decodes: all of it on the tiny
# run; on the rehearsal's PT and FullDelta 94.6% to 95.9% under the three ATEN_CPU_CAPABILITY
# settings with the test's grid-only gates (FullDelta stops early on 14 to 16 of the 120 prompts,
# PT on none), and 86.7% to 88.5% with refined gates (43 to 58).
FLOOR = 0.80


def assert_plan_matches_run(workdir: Path, configfile: str, test_variants: Collection[str] | None = None) -> None:
    """The preview of a finished run against what the run did: tokens, and bytes on disk. The run
    made every job of the preview, or, of the evaluations, only ``test_variants``' on test."""
    config, jobs, _ = dag_jobs(workdir, [workdir / configfile])
    run = workdir / "results" / config["run"]
    # Before anything is written, split sizes come from suite.sizes per slice: the files agree.
    sizes = split_sizes(config, run)
    assert split_sizes(config, workdir / "nowhere") == sizes == {
        s: config["suite"]["sizes"][s] * len(SLICES) for s in ("train", "calib", "selector", "test")}
    stages, ln, _ = plan(config, jobs, workdir, Estimates())
    assert ln.source.startswith("measured")

    teacher = pl.concat([pl.read_parquet(p) for p in (run / "teacher").glob("*.parquet")])
    answers = int(teacher["token_ids"].list.len().sum())
    sequences = answers + int(teacher["prefix_ids"].list.len().sum())
    assert stages["teacher"].generated == pytest.approx(answers, rel=1e-9)
    assert stages["caches"].forced == pytest.approx(2 * sequences, rel=1e-9)

    # The preview counts each evaluation's records at their budget: an upper bound, reached when
    # nothing stops early. Variants that recover IT's early stop decode less (FLOOR).
    evaluations = [j for j in jobs if j.rule == "evaluate" and (
        test_variants is None or (j.wildcards["eval_split"] == "test" and j.wildcards["variant"] in test_variants))]
    assert evaluations and (test_variants is None or {j.wildcards["variant"] for j in evaluations} == set(test_variants))
    records = pl.concat([pl.read_parquet(run / f"{j.wildcards['seeddir']}eval/{j.wildcards['eval_split']}/{j.wildcards['variant']}.parquet")
                         for j in evaluations])
    budget = sum(job_work(j, config, sizes, ln)[0] for j in evaluations)
    actual = int(records["n_tokens"].sum() + records["eos"].sum())
    assert FLOOR * budget <= actual <= budget

    # Tensor bytes; the files add their headers (ids and metadata), well under 10% here.
    cache_files = sum(p.stat().st_size for p in (run / "cache").glob("*/shard*.safetensors"))
    assert stages["caches"].disk_bytes["cache"] == pytest.approx(cache_files, rel=0.10)
    surrogates = sum(p.stat().st_size for p in run.glob("seed*/surrogate/L*.safetensors"))
    assert stages["surrogate"].disk_bytes["surrogate"] == pytest.approx(surrogates, rel=0.10)

    text = report(config, jobs, workdir, Estimates(), workdir / "slurm" / "config.yaml")
    assert "not measured" in text and THROUGHPUT_LINE in text


def test_tokens_and_bytes_match_the_tiny_run(tiny_run: Path) -> None:
    assert_plan_matches_run(tiny_run, TINY)


THROUGHPUT_LINE = ("generated tokens/s by batch size {8: 300-450, 16: 600-900, 32: 1,000-1,600, 64: 1,800-2,500, "
                   "128: 3,000-4,500}, forced 40,000-60,000/s, surrogate rows 25,000-34,000/s, 60-120 s per model load")


def test_the_command_prints_the_table_and_its_assumptions(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    from postdiff.plan import main

    workdir = copy_workflow(tmp_path)
    shutil.copytree(REPO / "slurm", workdir / "slurm")  # the profile whose site settings it checks
    main(["--configfile", str(workdir / "config/gemma3-4b.yaml"), "--directory", str(workdir)])
    out = capsys.readouterr().out
    total = next(line for line in out.splitlines() if line.startswith("total"))
    assert total.split()[1:4] == ["130", "64", "64"]
    low, high = map(float, total.split()[-1].split("-"))
    assert 2 < low < high < 6  # GPU-hours: a band, not one figure
    assert "seed 0 26 / 26; seed 1 26 / 26" in out and THROUGHPUT_LINE in out and "width: 2560" in out
    # The profile's groups: a split's teacher and caches, a seed's gates and surrogate metrics, a
    # variant's evaluations on a split; one GPU each, for their jobs' runtimes added up.
    assert "job groups, 77 without (64 GPU jobs and 13 CPU jobs; the other 53 jobs are localrules" in out
    assert "SLURM submissions: 53 with " in out and "group jobs (21;" in out and "unsafe" not in out
    assert "  seed0_gates: 5 jobs, gpu 1, 50 min" in out and "  eval_test_CapMask: 2 jobs, gpu 1, 20 min" in out
    assert "  inputs_train: 2 jobs, gpu 1, 20 min" in out and "  eval_test_PT: 1 jobs, gpu 1, 10 min" in out
    # Each GPU rule's runtime request, and the site settings still to fill in, by name.
    assert "  train_surrogate: 4 jobs, 35 min" in out and "  evaluate: 27 jobs, 10 min" in out
    for name in ("default-resources: slurm_partition: 'SET_ME_partition'", "default-resources: slurm_account: 'SET_ME_account'",
                 "resources.gpu.slurm_partition: 'SET_ME_gpu_partition'", "resources.gpu.gpu_model (or constraint): 'SET_ME_gpu_type'"):
        assert name in out
    assert not (workdir / "results").exists()


def test_the_preview_imports_neither_torch_nor_transformers(tmp_path: Path) -> None:
    """It runs on a login node, where importing torch takes seconds and may find no CUDA."""
    workdir = copy_workflow(tmp_path)
    script = ("import sys; from postdiff.plan import main; "
              f"main(['--configfile', {str(workdir / 'config/gemma3-4b.yaml')!r}, '--directory', {str(workdir)!r}]); "
              "print(sorted(m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.splitlines()[-1] == "[]", proc.stdout[-500:]


def test_a_jobs_time_is_a_band_from_the_estimates() -> None:
    est = Estimates(generated={32: (1_000.0, 2_000.0), 64: (2_000.0, 4_000.0)}, forced=(100.0, 200.0),
                    surrogate_rows=(10.0, 20.0), load_s=(60.0, 120.0))
    # Between batch sizes the rate is interpolated; beyond them it is held.
    assert est.rate(48, LOW) == 1_500.0 and est.rate(8, HIGH) == 2_000.0 and est.rate(256, LOW) == 2_000.0
    config = {**CONFIG, "teacher": {"batch_size": 48}}
    job = _job("teacher", split="train")  # 100 generated, 200 forced (test_work_of_a_job_by_hand)
    assert job_seconds(job, config, SIZES, LN, est, LOW) == pytest.approx(100 / 3_000 + 200 / 200 + 60)
    assert job_seconds(job, config, SIZES, LN, est, HIGH) == pytest.approx(100 / 1_500 + 200 / 100 + 120)
    assert runtime_request(61, 2.0) == MIN_RUNTIME and runtime_request(20 * 60, 2.0) == 40 and runtime_request(901, 2.0) == 35


def test_estimates_from_a_file_replace_the_defaults_they_name(tmp_path: Path) -> None:
    path = tmp_path / "h200.yaml"
    path.write_text("load_s: [30, 60]\ngenerated: {64: [3000, 4000]}\n")
    est = read_estimates(path)
    assert est.load_s == (30.0, 60.0) and est.generated == {64: (3000.0, 4000.0)} and est.forced == Estimates().forced
    path.write_text("load: [1, 2]\n")
    with pytest.raises(ValueError, match=r"unknown estimates \['load'\]"):
        read_estimates(path)


def test_site_problems_name_each_unset_or_placeholder_setting(tmp_path: Path) -> None:
    profile = tmp_path / "config.yaml"
    profile.write_text("default-resources: {slurm_partition: cpu, slurm_account: SET_ME_account}\n")
    config = {"resources": {"gpu": {"gpu": 1, "slurm_partition": "gpu", "constraint": "a100"}}}
    assert site_problems(config, profile) == [f"{profile} default-resources: slurm_account: 'SET_ME_account'",
                                              "resources.gpu.slurm_account: 'SET_ME_account'"]
    config["resources"]["gpu"]["slurm_account"] = "lab"
    assert site_problems(config, profile) == [f"{profile} default-resources: slurm_account: 'SET_ME_account'"]
    assert len(site_problems({"resources": {"gpu": {}}}, tmp_path / "none.yaml")) == 5
