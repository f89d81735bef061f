"""Run the real workflow in a temporary copy of the repository (shared by the end-to-end tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = "config/tiny.yaml"


def copy_workflow(dest: Path) -> Path:
    """The workflow and its package: jobs import the copy's src/ (workflow/scripts/stage.py)."""
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("Snakefile", "workflow", "config", "envs", "src"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, configfile: str | list[str] = TINY, check: bool = True) -> subprocess.CompletedProcess:
    # Targets first: --configfile and --quiet take several values and would swallow them.
    configfiles = [configfile] if isinstance(configfile, str) else configfile
    cmd = [sys.executable, "-m", "snakemake", *args, "--cores", "2", "--configfile", *configfiles]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def planned_jobs(workdir: Path, *targets: str, configfile: str = TINY) -> dict[str, int]:
    """Rule -> job count of what a run would execute now (parsed from a dry run's job stats)."""
    proc = snakemake(workdir, *targets, "-n", "--quiet", "rules", configfile=configfile)
    text = proc.stdout + proc.stderr
    if "Nothing to be done" in text:
        return {}
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\S+)\s+(\d+)\s*$", text, re.M) if m[1] != "total"}


def planned_outputs(workdir: Path, *targets: str, configfile: str = TINY) -> list[tuple[str, list[str]]]:
    """(rule, outputs) of every job a run would execute now, from a dry run's job listing."""
    proc = snakemake(workdir, *targets, "-n", configfile=configfile)
    jobs = re.findall(r"^(?:local)?rule (\S+):\n(?:    (?!output:).*\n)*    output: (.*)$", proc.stdout, re.M)
    return [(rule, outputs.split(", ")) for rule, outputs in jobs]
