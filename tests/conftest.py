"""Suite-wide settings and the one end-to-end run of the tiny config that several tests read.

The suite runs on every core (pytest-xdist, `-n auto --dist loadscope` in pyproject.toml): each
module's tests stay on one worker, so a module-scoped run is built once, and the tiny run is
built once for all workers (a file lock lets the first worker that asks build it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from filelock import FileLock
from workflow_utils import copy_workflow, snakemake

# Tiny test models are dominated by per-op overhead, where a second thread only costs time.
torch.set_num_threads(1)

# Modules whose tests take minutes, longest first (the tiny run's first user before the SLURM
# test, which reads it last): xdist hands out modules in collection order, so these start at
# once on separate workers and the short modules fill in around them.
LONGEST_FIRST = ("test_default_run.py", "test_workflow.py", "test_slurm.py", "test_rehearsal_run.py")


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: a worker per core, and one more, since the SLURM test spends most of its
    minutes waiting on the scheduler's status checks, not computing."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the workflow after a full local run of config/tiny.yaml."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if "PYTEST_XDIST_WORKER" in os.environ else base  # the workers' common parent
    workdir, done = root / "tiny_run", root / "tiny_run.done"
    with FileLock(root / "tiny_run.lock"):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a failed build's leftovers
            workdir.mkdir()
            snakemake(copy_workflow(workdir))
            done.touch()
    return workdir
