"""The real pair's DAG asks for a GPU exactly where a job runs a model, and model jobs retry.

Built from config/gemma3-4b.yaml with nothing downloaded: a DAG never loads a model.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings
from workflow_utils import REPO, copy_workflow

from postdiff import plan
from postdiff.workflow.config import gpu_request, placeholder_problems
from postdiff.workflow.runtime import Job

GEMMA = "config/gemma3-4b.yaml"


@pytest.fixture(scope="module")
def gemma_jobs(tmp_path_factory: pytest.TempPathFactory) -> list:
    """Every job of a dry run of the Gemma 3 4B config."""
    workdir = copy_workflow(tmp_path_factory.mktemp("gemma_dag"))
    # The workflow sets HF_HOME / HF_HUB_OFFLINE from the config in its own process: this one.
    with mock.patch.dict(os.environ), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[workdir / GEMMA]),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        workflow.dag(DAGSettings()).execute_workflow(executor="dryrun")
        # The API hands out no job list; the workflow's DAG after the dry run holds it.
        return list(workflow._workflow.dag.jobs)


def test_a_job_requests_the_gpu_iff_its_params_carry_device(gemma_jobs: list) -> None:
    seen = set()
    for job in gemma_jobs:
        has_device = "device" in dict(job.params.items())
        resources = dict(job.resources.items())
        assert has_device == ("gpu" in resources), f"rule {job.rule.name}: device {has_device}, resources {resources}"
        seen.add((job.rule.name, has_device))
    # Both kinds occur, and the rule that once landed on a CPU node is a GPU job now.
    assert ("surrogate_metrics", True) in seen and ("pair_info", False) in seen and ("table1", False) in seen
    # A selection is one model job; IT's records are its copied teacher rows, no GPU.
    assert ("select_cap", True) in seen and ("evaluate_teacher", False) in seen and ("evaluate", True) in seen


def test_gemma_fits_60_model_jobs_per_seed_with_each_selection_in_one(gemma_jobs: list) -> None:
    """Issue 20's goal at the Gemma config's defaults: a run of one seed (the shared jobs and that
    seed's) has at most 60 GPU jobs and 60 model loads; every selection's steps share one job."""
    def seed_of(job) -> str | None:
        wc = job.wildcards_dict
        return wc.get("seed") or wc.get("seeddir", "").removeprefix("seed").rstrip("/") or None

    gpu, loads = {}, {}
    for job in gemma_jobs:
        seed = seed_of(job)
        gpu[seed] = gpu.get(seed, 0) + int("gpu" in dict(job.resources.items()))
        loads[seed] = loads.get(seed, 0) + int("device" in dict(job.params.items()))
    seeds = [s for s in gpu if s is not None]
    assert sorted(seeds) == ["0", "1"]
    for seed in seeds:
        assert gpu[None] + gpu[seed] <= 60 and loads[None] + loads[seed] <= 60, (gpu, loads)
    rules = [job.rule.name for job in gemma_jobs]
    assert not [r for r in rules if r.startswith("select_") and r.endswith(("_shard", "_step"))]
    # 3 sweep cutoffs + the strict exclusion, and VMask: five selections per seed, one job each.
    assert rules.count("select_cap") == 2 * 4 and rules.count("select_vmask") == 2


def test_model_jobs_retry_with_more_memory_and_time(gemma_jobs: list) -> None:
    model_jobs = [job for job in gemma_jobs if "device" in dict(job.params.items())]
    assert model_jobs
    for job in model_jobs:
        assert job.rule.restart_times == 2, job.rule.name
        resources = dict(job.resources.items())
        assert resources["attempt"] == 1 and resources["mem_mb"] == 64000
    teacher = next(job for job in model_jobs if job.rule.name == "teacher")
    first = dict(teacher.resources.items())["runtime"]
    grown = {a: teacher.rule.expand_resources(teacher.wildcards_dict, teacher.input, attempt=a) for a in (2, 3)}
    # Memory grows up to resources.max_mem_mb (128 GB), not to 3 x 64 GB; runtime keeps growing.
    assert (grown[2]["mem_mb"], grown[2]["runtime"], grown[2]["attempt"]) == (2 * 64000, 2 * first, 2)
    assert (grown[3]["mem_mb"], grown[3]["runtime"], grown[3]["attempt"]) == (128000, 3 * first, 3)


def test_each_model_job_asks_for_its_estimate_with_a_margin(gemma_jobs: list) -> None:
    """Not 120 minutes everywhere: the cost preview's high estimate of the job times
    resources.runtime_margin (2), in 5-minute steps and at least MIN_RUNTIME."""
    config = gemma_jobs[0].rule.workflow.config
    unrun = Path("/nonexistent")  # nothing has run: sizes from the config, lengths assumed, as at DAG time
    sizes, ln = plan.split_sizes(config, unrun), plan.lengths(config, unrun)
    asked = {}
    for job in gemma_jobs:
        if "device" not in dict(job.params.items()):
            continue
        facts = plan.JobFacts(job.rule.name, "", dict(job.wildcards_dict), gpu=True, loads=True)
        seconds = plan.job_seconds(facts, config, sizes, ln, plan.Estimates(), plan.HIGH)
        runtime = dict(job.resources.items())["runtime"]
        assert runtime == plan.runtime_request(seconds, 2.0) and runtime >= 2 * seconds / 60, job.rule.name
        asked[job.rule.name] = runtime
    # Training a surrogate (20k steps of 1,024 rows) asks for more than an evaluation's minimum.
    assert asked["train_surrogate"] > asked["evaluate"] == plan.MIN_RUNTIME and max(asked.values()) < 120


def test_gres_sites_get_gres_only_and_the_preview_still_counts_gpu_jobs(tmp_path: Path) -> None:
    """resources.gpu_flag: gres folds the GPU and its type into --gres; --gpus is never sent too."""
    workdir = copy_workflow(tmp_path)
    overlay = workdir / "config" / "gres.yaml"
    overlay.write_text("resources: {gpu_flag: gres}\n")
    _, jobs, _ = plan.dag_jobs(workdir, [workdir / GEMMA, overlay])
    assert sum(job.gpu for job in jobs) == 64 and sum(job.loads for job in jobs) == 64
    with mock.patch.dict(os.environ), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1),
                                config_settings=ConfigSettings(configfiles=[workdir / GEMMA, overlay]),
                                snakefile=workdir / "Snakefile", workdir=workdir)
        workflow.dag(DAGSettings()).execute_workflow(executor="dryrun")
        teacher = next(job for job in workflow._workflow.dag.jobs if job.rule.name == "teacher")
        resources = dict(teacher.resources.items())
    assert resources["gres"] == "gpu:SET_ME_gpu_type:1" and "gpu" not in resources and "gpu_model" not in resources


def _sbatch(group: plan.GroupFacts) -> str:
    """The sbatch call the SLURM plugin makes for a group job that asks for `group`'s resources,
    built with the plugin's own functions."""
    submit = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake.iocontainers import ResourceList
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    job = SimpleNamespace(resources=ResourceList(fromdict=dict(group.resources)), threads=group.resources["_cores"])
    params = {"run_uuid": "u", "slurm_logfile": "log", "comment_str": "c", "account": "", "partition": "", "workdir": "w"}
    return submit.get_submit_command(job, params) + set_gres_string(job)


@pytest.mark.parametrize("gpu_flag", ["gpus", "gres"])
def test_a_group_of_the_profile_asks_for_one_gpu_and_its_jobs_runtimes(gpu_flag: str, tmp_path: Path) -> None:
    """slurm/config.yaml groups model jobs, chains and independent ones; gpu_slot=1 stacks them in
    time, so each group's sbatch asks for one GPU, by one flag, for the sum of its jobs' runtimes."""
    workdir = copy_workflow(tmp_path)
    overlay = workdir / "config" / "flag.yaml"
    overlay.write_text(f"resources: {{gpu_flag: {gpu_flag}}}\n")
    grouping = plan.read_grouping(REPO / "slurm" / "config.yaml")
    assert grouping.limits == {"gpu_slot": 1} and plan.group_problems(grouping.groups, grouping.limits) == []
    _, jobs, groups = plan.dag_jobs(workdir, [workdir / GEMMA, overlay], grouping)
    assert len(groups) == 21 and max(g.jobs for g in groups) == 5
    one_gpu = "--gpus=SET_ME_gpu_type:1" if gpu_flag == "gpus" else "--gres=gpu:SET_ME_gpu_type:1"
    runtimes: dict[str, int] = {}
    for job in jobs:
        if job.group:
            runtimes[job.group] = runtimes.get(job.group, 0) + int(job.runtime)
    assert sorted(runtimes.values()) == sorted(int(g.resources["runtime"]) for g in groups)
    for group in groups:
        call = _sbatch(group)
        assert call.count("--gpus") + call.count("--gres") == 1 and one_gpu in call, call
        assert f" -t {group.resources['runtime']} " in call and "--mem 64000 " in call and "--cpus-per-task=8" in call, call

    # Without the cap Snakemake puts a seed's gates side by side: 5 GPUs, or one GPU for 10 minutes.
    _, _, uncapped = plan.dag_jobs(workdir, [workdir / GEMMA, overlay], plan.Grouping(grouping.groups, grouping.components))
    gates = _sbatch(next(g for g in uncapped if g.name == "seed0_gates"))
    assert ("--gpus=SET_ME_gpu_type:5" in gates) if gpu_flag == "gpus" else (" -t 10 " in gates), gates


def test_unsafe_groups_are_named() -> None:
    assert plan.group_problems({}, {}) == []
    no_cap, slash = plan.group_problems({"evaluate": "eval_{eval_split}"}, {}), plan.group_problems(
        {"evaluate": "{seeddir}eval", "teacher": "a/b"}, {"gpu_slot": 1})
    assert len(no_cap) == 1 and "add gpu_slot=1" in no_cap[0]
    assert [p.split(":")[0] for p in slash] == ["rule evaluate", "rule teacher"]


def test_gpu_request_keeps_gpus_or_folds_them_into_gres() -> None:
    res = {"gpu": 2, "gpu_model": "a100", "mem_mb": 1}
    assert gpu_request(res, "gpus") == res
    assert gpu_request(res, "gres") == {"gres": "gpu:a100:2", "mem_mb": 1}
    assert gpu_request({"gpu": 1}, "gres") == {"gres": "gpu:1"}


def test_the_pair_is_fingerprinted_once_per_run(gemma_jobs: list) -> None:
    info = [job for job in gemma_jobs if job.rule.name == "pair_info"]
    assert len(info) == 1
    pair_file = str(info[0].output[0])
    loaders = [job for job in gemma_jobs if "device" in dict(job.params.items())]
    assert all(pair_file in map(str, job.input) for job in loaders)


def test_a_retry_halves_the_batch_size_each_time() -> None:
    sizes = [Job(input={}, output={}, params={"batch_size": 64}, attempt=a).batch_size() for a in (1, 2, 3, 8)]
    assert sizes == [64, 32, 16, 1]
    assert Job(input={}, output={}, params={"max_batch": 10}, attempt=2).batch_size("max_batch") == 5
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        Job(input={}, output={}, params={"batch_size": 0}).batch_size()


def test_a_cluster_run_with_placeholder_site_settings_stops_naming_each() -> None:
    """The Snakefile's onstart prints these lines and exits under a non-local executor (SLURM)."""
    config = {"resources": {"gpu": {"gpu": 1, "slurm_partition": "SET_ME_gpu_partition", "gpu_model": "a100",
                                    "slurm_account": "SET_ME_account"}}}
    assert placeholder_problems(config) == [
        "resources.gpu.slurm_partition: 'SET_ME_gpu_partition' is a placeholder: set your site's value (slurm/README.md)",
        "resources.gpu.slurm_account: 'SET_ME_account' is a placeholder: set your site's value (slurm/README.md)"]
    assert placeholder_problems({"resources": {"gpu": {"gpu": 1, "mem_mb": 16000}}}) == []
