"""The shipped embedded pair: checksums, the settings it was trained with, installing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from postdiff.models.toy.shipped import SUMS, install, ship, toy_mismatch, verify
from postdiff.models.toy.train import CONFIG_FILE
from postdiff.workflow.io import read_json
from postdiff.workflow.runtime import Job

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "workflow/resources/embedded_pair"


def default_toy_params() -> dict:
    """The params the shipped_pair rule passes: config.yaml's toy settings and world."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    toy = {k: v for k, v in config["toy"].items() if k not in ("threads", "train")}
    return {**toy, "world_seed": config["world"]["seed"], "n_countries": config["world"]["n_countries"]}


def test_the_shipped_pair_matches_its_sums_and_the_default_settings():
    verify(SHIPPED)
    assert toy_mismatch(default_toy_params(), read_json(SHIPPED / "pt" / CONFIG_FILE)) == []
    assert read_json(SHIPPED / "pt" / CONFIG_FILE) == read_json(SHIPPED / "it" / CONFIG_FILE)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    root = tmp_path / "shipped"
    shutil.copytree(SHIPPED, root)
    return root


def _install(root: Path, out: Path, **params) -> None:
    install(Job(input={"shipped": str(root)}, output={"pt": str(out / "pt"), "it": str(out / "it")},
                params={**default_toy_params(), **params}))


def test_install_copies_both_models(copy: Path, tmp_path: Path):
    _install(copy, tmp_path / "pair")
    for role in ("pt", "it"):
        assert sorted(p.name for p in (tmp_path / "pair" / role).iterdir()) == sorted(p.name for p in (SHIPPED / role).iterdir())


def test_a_changed_byte_or_a_stray_file_is_refused(copy: Path, tmp_path: Path):
    weights = copy / "it" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"it/model\.safetensors: sha256 differs"):
        _install(copy, tmp_path / "pair")
    assert not (tmp_path / "pair").exists()
    shutil.copy2(SHIPPED / "it" / "model.safetensors", weights)
    (copy / "pt" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=r"files not in SHA256SUMS: \['pt/notes.txt'\]"):
        verify(copy)


def test_other_toy_settings_ask_for_training(copy: Path, tmp_path: Path):
    with pytest.raises(ValueError, match=r"toy.train: true.*toy.hidden_size: 64 \(shipped pair: 128\)"):
        _install(copy, tmp_path / "pair", hidden_size=64)
    with pytest.raises(ValueError, match=r"world.seed: 3 \(shipped pair: 0\)"):
        _install(copy, tmp_path / "pair", world_seed=3)


def test_ship_writes_sums_that_verify(copy: Path, tmp_path: Path):
    root = tmp_path / "again"
    ship(copy, root)
    verify(root)
    assert (root / SUMS).read_text() == (SHIPPED / SUMS).read_text()
