"""Suite-wide settings and the one end-to-end run of the tiny config that several tests read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from workflow_utils import copy_workflow, snakemake

# Tiny test models are dominated by per-op overhead, where a second thread only costs time.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the workflow after a full local run of config/tiny.yaml."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_run"))
    snakemake(workdir)
    return workdir
