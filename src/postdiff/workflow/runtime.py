"""The one bridge between Snakemake and the package: a rule's files, params and log.

Stage functions take a :class:`Job` and never import Snakemake, so they run from tests too.
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("postdiff")


@dataclass
class Job:
    """What a stage reads, writes and is told. Paths are strings or lists of strings."""

    input: dict[str, Any]
    output: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    wildcards: dict[str, str] = field(default_factory=dict)
    threads: int = 1
    attempt: int = 1  # Snakemake's attempt: > 1 when a failed job is retried

    def inputs(self, key: str) -> list[str]:
        """``input[key]`` as a list: Snakemake passes a one-file input as a plain string."""
        value = self.input.get(key)
        return [] if value is None else [value] if isinstance(value, str) else list(value)

    def batch_size(self, key: str = "batch_size") -> int:
        """``params[key]`` halved on every retry, so a job killed for memory reruns smaller
        (results do not depend on the batch size beyond float rounding)."""
        size = int(self.params[key])
        if size < 1:
            raise ValueError(f"{key} must be >= 1, got {self.params[key]!r}")
        shrunk = max(1, size >> (self.attempt - 1))
        if shrunk != size:
            log.warning("attempt %d: %s %d instead of %d", self.attempt, key, shrunk, size)
        return shrunk


def seed_everything(seed: int, threads: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    # Stages without a model never import torch (seconds per job); seed it only where it is used.
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)
        # Same seed and same thread count give bitwise-identical CPU results; pin the count.
        torch.set_num_threads(max(1, threads))


@contextmanager
def logging_to(path: str | None) -> Iterator[None]:
    """Send logging, stderr (tqdm bars, warnings) and stdout of a stage to its rule's log."""
    if path is None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", buffering=1) as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        old_out, old_err = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = fh
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old_out, old_err
            root.removeHandler(handler)


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for the block, then as it was. A job's imports and its
    first model load build hundreds of thousands of objects that live as long as the job, and
    collecting while they are built costs 0.4 s of a model job's 4.7 s start (bench/startup.py)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def resolve(entry: str) -> Callable[[Job], None]:
    """The stage function ``module:name``, its module imported with the collector paused."""
    module, _, name = entry.partition(":")
    with gc_paused():
        return getattr(importlib.import_module(module), name)


def _named(namedlist: Any) -> dict[str, Any]:
    return {k: v for k, v in namedlist.items()}


def run_stage(smk: Any) -> None:
    """Entry point of ``workflow/scripts/stage.py``: call ``params.entry`` with a :class:`Job`."""
    params = dict(_named(smk.params))
    entry = params.pop("entry")
    params.pop("code", None)  # the hash of the stage's code: for Snakemake's rerun trigger only
    job = Job(
        input=_named(smk.input),
        output=_named(smk.output),
        params=params,
        wildcards=dict(_named(smk.wildcards)),
        threads=smk.threads,
        attempt=int(getattr(smk.resources, "attempt", 1)),
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log_path = smk.log[0] if len(smk.log) else None
    try:
        with logging_to(log_path):
            try:
                stage = resolve(entry)
                seed_everything(int(params.get("seed", 0)), job.threads)
                log.info("stage %s, threads %d", entry, job.threads)
                stage(job)
            except Exception:
                log.exception("stage %s failed", entry)
                raise
    except Exception as err:
        if log_path is None:
            raise
        # The traceback is in the log; the terminal gets the message and where to read more.
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"postdiff: {entry} failed: {message} (traceback in {log_path})", file=sys.stderr)
        sys.exit(1)
