"""What can be checked of `--sdm conda` without conda: the env file's requirements, and a stage
that runs through workflow/scripts/stage.py with no postdiff package installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import polars as pl
import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version
from workflow_utils import REPO, copy_workflow

CONDA_NAMES = {"pytorch": "torch"}  # conda-forge's name -> the PyPI name in pyproject.toml


def _conda_specs() -> list[str]:
    """The conda match specs ("name version build"), python and pip left out."""
    env = yaml.safe_load((REPO / "envs/postdiff.yaml").read_text())
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    return [d for d in conda if re.split(r"[=<> ]", d)[0] not in ("python", "pip")]


def _env_requirements() -> list[str]:
    env = yaml.safe_load((REPO / "envs/postdiff.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return [" ".join(spec.split()[:2]) for spec in _conda_specs()] + pip  # a spec's build string is conda's alone


def test_env_file_takes_a_cuda_build_of_torch_in_the_projects_range() -> None:
    """On a login node without a GPU conda would solve the CPU build, which the GPU nodes then run."""
    (torch,) = [spec.split() for spec in _conda_specs() if spec.startswith("pytorch")]
    assert torch == ["pytorch", ">=2.6", "cuda*"]


def _by_name(requirements: list[str]) -> dict[str, str]:
    out = {}
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(CONDA_NAMES.get(req.name, req.name))
        assert name not in out, f"{name} listed twice"
        out[name] = str(req.specifier)
    return out


def test_env_file_lists_pyprojects_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _by_name(_env_requirements()) == _by_name(project["dependencies"])


def test_env_file_has_no_local_or_editable_paths() -> None:
    for text in _env_requirements():
        assert not re.search(r"^-|\.\.?/|^/|file:|://|@", text.strip()), f"{text!r} names a path or URL"


def test_a_stage_runs_through_stage_py_without_the_package(tmp_path: Path) -> None:
    """As in a fresh conda env: `postdiff` is not importable until stage.py adds the workflow's src/."""
    (tmp_path / "wf").mkdir()
    workdir = copy_workflow(tmp_path / "wf")
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import importlib.util, runpy, sys
        from pathlib import Path
        sys.path[:] = [p for p in sys.path if p and not (Path(p) / "postdiff").exists()]
        assert importlib.util.find_spec("postdiff") is None, "postdiff is importable without stage.py"

        class Named(dict):
            __getattr__ = dict.get

        class Log(list):
            pass

        smk = Named(
            input=Named(), output=Named(suite="out/suite.parquet"), wildcards=Named(), threads=1,
            resources=Named(attempt=1), log=Log(["out/suite.log"]), scriptdir={str(workdir / "workflow/scripts")!r},
            params=Named(entry="postdiff.data.suite:build_suite", code="x", source="builtin", builtin="world", seed=0,
                         sizes={{"train": 2, "calib": 1, "selector": 1, "test": 1}},
                         world={{"seed": 0, "n_countries": 40}}),
        )
        runpy.run_path({str(workdir / "workflow/scripts/stage.py")!r}, init_globals={{"snakemake": smk}})
        print(sys.modules["postdiff"].__file__)
    """))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert Path(proc.stdout.strip()) == workdir / "src/postdiff/__init__.py"
    assert pl.read_parquet(tmp_path / "out/suite.parquet").height == 6 * 5
    assert "stage postdiff.data.suite:build_suite" in (tmp_path / "out/suite.log").read_text()



# The lowest versions the code runs on, and why: a floor below them admits an install that breaks.
NEEDED = {
    # transformers 5.24 (import_utils) turns PyTorch off below 2.6: every model job would fail.
    "torch": "2.6",
    # from_pretrained(dtype=...) is the dtype argument from 4.56 on; before, models load in fp32
    # with no error. 5.0 is the major version the code is read against.
    "transformers": "5.0",
}
CAPPED = {"transformers": "6"}  # a new major version may rename what the code calls


def _floor(specifier: str) -> Version:
    bounds = [Version(s.version) for s in SpecifierSet(specifier) if s.operator in (">=", "==", "~=")]
    assert bounds, f"{specifier!r} has no lower bound"
    return max(bounds)


@pytest.mark.parametrize("where", ["pyproject.toml", "envs/postdiff.yaml"])
def test_floors_admit_no_version_that_breaks(where: str) -> None:
    requirements = (tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                    if where == "pyproject.toml" else _env_requirements())
    specs = _by_name(requirements)
    for name, needed in NEEDED.items():
        assert _floor(specs[name]) >= Version(needed), f"{where}: {name}{specs[name]} admits versions below {needed}"
        assert Version(needed) in SpecifierSet(specs[name]), f"{where}: {name}{specs[name]} refuses {needed} itself"
    for name, major in CAPPED.items():
        assert Version(major) not in SpecifierSet(specs[name]), f"{where}: {name}{specs[name]} admits {major}.x"


def test_the_installed_versions_meet_the_floors() -> None:
    specs = _by_name(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])
    for name in NEEDED:
        installed = Version(metadata.version(name))
        assert installed in SpecifierSet(specs[name], prereleases=True), f"installed {name} {installed} vs {specs[name]}"
