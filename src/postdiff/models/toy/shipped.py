"""The embedded pair as shipped: weights that this workflow's own training rules produced, with
their sha256 sums, so the default run uses the same pair on every machine.

Training twice on one machine gives byte-identical weights, but float rounding differs across
CPUs and 20 epochs amplify it: the same commit gave FullDelta CapRec .584 on one machine and
.313 on another. ``toy.train: false`` (the default) installs the shipped pair; ``toy.train:
true`` trains it from scratch with the ``toy`` settings.

    python -m postdiff.models.toy.shipped --source results/default/pair   # refresh the shipped copy
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from postdiff.models.toy.settings import CONFIG_FILE, PLANT_FILE, PlantConfig, ToyConfig
from postdiff.workflow.io import atomic_path, read_json, sha256_file, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

ROLES = ("pt", "it")
SUMS = "SHA256SUMS"
DEFAULT_ROOT = Path("workflow/resources/embedded_pair")
# Snakemake's marker inside directory outputs; not part of the model.
_SKIP = {".snakemake_timestamp"}


def _files(root: Path) -> list[str]:
    return sorted(
        str(f.relative_to(root)) for role in ROLES for f in (root / role).iterdir() if f.is_file() and f.name not in _SKIP
    )


def sums_text(root: Path) -> str:
    """``sha256sum``-style lines (``sha256  role/file``) for every file of both models."""
    return "".join(f"{sha256_file(root / name)}  {name}\n" for name in _files(root))


def verify(root: Path) -> None:
    """Refuse a shipped pair whose files differ from ``SHA256SUMS`` (missing, extra or changed)."""
    sums_path = root / SUMS
    if not sums_path.is_file():
        raise FileNotFoundError(f"{sums_path} is missing")
    want = dict(reversed(line.split("  ", 1)) for line in sums_path.read_text().splitlines() if line)
    have = set(_files(root))
    if missing := sorted(set(want) - have):
        raise ValueError(f"{root}: shipped files missing: {missing}")
    if extra := sorted(have - set(want)):
        raise ValueError(f"{root}: files not in {SUMS}: {extra}")
    for name, digest in want.items():
        if sha256_file(root / name) != digest:
            raise ValueError(f"{root / name}: sha256 differs from {sums_path}; restore it or rerun with toy.train: true")


def toy_mismatch(params: Mapping[str, Any], shipped: Mapping[str, Any], plant: Mapping[str, Any] | None = None,
                 shipped_plant: Mapping[str, Any] | None = None) -> list[str]:
    """Config keys whose value differs from the settings the shipped pair was made with: the
    toy settings, and the planted neurons' (``toy.plant``) when either side has them."""
    wanted = dataclasses.asdict(ToyConfig.from_params(params))
    # A setting added after the pair was shipped has the default that reproduces it.
    had = {**dataclasses.asdict(ToyConfig()), **shipped}
    keys = {"world_seed": "world.seed", "n_countries": "world.n_countries"}
    out = [f"{keys.get(k, f'toy.{k}')}: {wanted[k]!r} (shipped pair: {had.get(k)!r})"
           for k in sorted(wanted) if wanted[k] != had.get(k)]
    if (plant is None) != (shipped_plant is None):
        return [*out, f"toy.plant: {'set' if plant is not None else 'null'} (shipped pair: "
                      f"{'planted' if shipped_plant is not None else 'fine-tuned'})"]
    if plant is not None:
        want = dataclasses.asdict(PlantConfig.from_params(plant))
        out += [f"toy.plant.{k}: {want[k]!r} (shipped pair: {shipped_plant.get(k)!r})"
                for k in sorted(want) if want[k] != shipped_plant.get(k)]
    return out


def install(job: Job) -> None:
    """Stage: check the shipped pair (input ``shipped``) against its sums and the config's ``toy``
    settings (params; ``plant`` the planted neurons' or None), then copy it to outputs ``pt`` and ``it``."""
    root = Path(job.input["shipped"])
    verify(root)
    planted = root / "it" / PLANT_FILE
    toy = {k: v for k, v in job.params.items() if k != "plant"}
    differ = toy_mismatch(toy, read_json(root / "pt" / CONFIG_FILE), job.params.get("plant"),
                          read_json(planted) if planted.is_file() else None)
    if differ:
        raise ValueError("the shipped embedded pair was trained with other settings; set toy.train: true to train "
                         "one with these, or restore them: " + "; ".join(differ))
    for role in ROLES:
        with atomic_path(job.output[role]) as tmp:
            shutil.copytree(root / role, tmp, ignore=shutil.ignore_patterns(*_SKIP))
    log.info("installed the shipped pair from %s (%d files checked)", root, len(_files(root)))


def ship(source: Path, root: Path = DEFAULT_ROOT) -> None:
    """Copy a trained pair (``source/pt``, ``source/it``) into ``root`` and write its sums."""
    for role in ROLES:
        with atomic_path(root / role) as tmp:
            if (root / role).exists():
                shutil.rmtree(root / role)
            shutil.copytree(source / role, tmp, ignore=shutil.ignore_patterns(*_SKIP))
    write_text(sums_text(root), root / SUMS)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("results/default/pair"))
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    args = parser.parse_args(argv)
    ship(args.source, args.root)


if __name__ == "__main__":
    main()
