"""The tiny workflow gives byte-identical tables through `--profile slurm` and locally.

Through SLURM it runs the model chain up to one seed's R^2 table (pair training, teacher,
caches, surrogates: GPU-resource jobs and local jobs): every job pays the executor's
submission and status checks, so the whole tiny run would take 12 minutes of CI. The profile's
job groups are on: each split's teacher and cache, and the seed's two surrogate-metrics jobs, go
as one group job each.

Needs a running SLURM with an idle node: `bash .ci/slurm-up.sh` (see slurm/README.md).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from workflow_utils import REPO, copy_workflow, snakemake


def _idle_node_mem_mb() -> tuple[int | None, str]:
    """RealMemory of the smallest idle node, or None and why there is none."""
    if shutil.which("sinfo") is None:
        return None, "sinfo is not on PATH (start a local SLURM with `bash .ci/slurm-up.sh`)"
    proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t %m"], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"sinfo failed: {proc.stderr.strip()}"
    # Exactly "idle": drained ("drain") and unreachable ("idle*") nodes are listed differently.
    idle = [int(mem) for state, mem in (line.split() for line in proc.stdout.splitlines()) if state == "idle"]
    if not idle:
        return None, f"no idle SLURM node (sinfo: {' '.join(proc.stdout.split()) or 'no nodes'})"
    return min(idle), ""


# Decided at collection, so a missing cluster skips before any work.
NODE_MEM_MB, UNAVAILABLE = _idle_node_mem_mb()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(NODE_MEM_MB is None, reason=UNAVAILABLE)]


TARGETS = ("results/tiny/seed0/tables/r2.csv",)


def fill_in_site(profile: Path) -> None:
    """The profile's placeholders filled in as a user does: the local cluster's default partition,
    and no account (it keeps none: without one the plugin submits without -A, as before)."""
    default = next(p.rstrip("*") for p in subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True,
                                                         text=True, check=True).stdout.split() if p.endswith("*"))
    lines = profile.read_text().replace("SET_ME_partition", default).splitlines()
    profile.write_text("\n".join(line for line in lines if "SET_ME_account" not in line) + "\n")


def _tables(workdir: Path) -> dict[str, bytes]:
    return {name: (workdir / name).read_bytes() for name in TARGETS}


def test_slurm_tables_match_local(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    cluster = copy_workflow(tmp_path)
    shutil.copytree(REPO / "slurm", cluster / "slurm")
    fill_in_site(cluster / "slurm" / "config.yaml")
    proc = snakemake(
        cluster,
        *TARGETS,
        "--profile", "slurm",
        # The plugin's first status check waits 40 s by default; these jobs take seconds.
        "--slurm-init-seconds-before-status-checks", "1",
        # Caps each job's mem_mb at what the test node has, or sbatch rejects the job. This list
        # replaces the profile's: gpu_slot=1 keeps its groups to one GPU (onstart insists).
        "--resources", f"mem_mb={NODE_MEM_MB}", "gpu_slot=1",
        "--verbose",  # the plugin logs each sbatch call
    )
    log = proc.stdout + proc.stderr
    assert "submitted with SLURM jobid" in log, "no job went through SLURM"
    # Group jobs: a split's teacher and cache (a chain), the seed's two metrics jobs (side by
    # side unless capped); each one submission with one GPU for its two 10-minute runtimes.
    calls = re.findall(r"sbatch call: (.*)", log)
    for name in ("group_inputs_train_cache_shard_teacher", "group_seed0_gates_surrogate_metrics"):
        group = [c for c in calls if f"/{name}/" in c]
        assert len(group) == 1, (name, group)
        assert re.findall(r"--(?:gpus|gres)\S*", group[0]) == ["--gpus=1"] and " -t 20 " in group[0], group[0]

    # The local run is asked for only now: the SLURM run, mostly waiting on the scheduler's
    # status checks, overlaps whatever another worker is doing, building the local run included.
    tiny_run = request.getfixturevalue("tiny_run")
    expected, got = _tables(tiny_run), _tables(cluster)
    assert expected, f"the local run wrote no results/*/**/tables/*.csv under {tiny_run}"
    assert sorted(got) == sorted(expected)
    differing = [name for name in expected if got[name] != expected[name]]
    assert not differing, f"tables differ between the local and the SLURM run: {differing}"
    shutil.rmtree(tmp_path)
