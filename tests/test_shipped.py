"""The shipped embedded pair: checksums, the settings it was trained with, installing it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from postdiff.models.toy.settings import CONFIG_FILE, PLANT_FILE
from postdiff.models.toy.shipped import SUMS, install, ship, toy_mismatch, verify
from postdiff.workflow.io import read_json
from postdiff.workflow.runtime import Job

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "workflow/resources/embedded_pair"


def toy_params(overlay: str | None = None) -> tuple[dict, dict | None, Path]:
    """The params the shipped_pair rule passes (config.yaml's toy settings and world, under
    ``overlay``'s), the planted neurons' settings and the shipped pair's directory."""
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    if overlay is not None:
        for key, value in yaml.safe_load((REPO / overlay).read_text()).items():
            config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    toy = {k: v for k, v in config["toy"].items() if k not in ("threads", "train", "shipped", "plant")}
    params = {**toy, "world_seed": config["world"]["seed"], "n_countries": config["world"]["n_countries"]}
    return params, config["toy"].get("plant"), REPO / config["toy"].get("shipped", "workflow/resources/embedded_pair")


@pytest.mark.parametrize("overlay", [None, "config/control.yaml"])
def test_each_shipped_pair_matches_its_sums_and_its_config(overlay: str | None):
    params, plant, root = toy_params(overlay)
    verify(root)
    planted = root / "it" / PLANT_FILE
    assert planted.is_file() == (plant is not None)
    assert toy_mismatch(params, read_json(root / "pt" / CONFIG_FILE), plant,
                        read_json(planted) if plant is not None else None) == []
    assert read_json(root / "pt" / CONFIG_FILE) == read_json(root / "it" / CONFIG_FILE)


@pytest.fixture()
def copy(tmp_path: Path) -> Path:
    root = tmp_path / "shipped"
    shutil.copytree(SHIPPED, root)
    return root


def _install(root: Path, out: Path, **params) -> None:
    install(Job(input={"shipped": str(root)}, output={"pt": str(out / "pt"), "it": str(out / "it")},
                params={**toy_params()[0], **params}))


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
