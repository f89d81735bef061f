"""How far FullDelta moves with another CPU's float rounding and with the surrogate seed.

torch picks its CPU kernels by ``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``, ``avx512``), so one
machine can reproduce the rounding of another. For each capability this runs the default config
(the shipped pair) up to FullDelta's test evaluation for every seed, each in its own run
directory, and writes every (capability, seed)'s FullDelta metrics and gates:

    .venv/bin/python bench/capabilities.py --seeds 0 1 2 --out bench/results/capabilities.json

The first row of the printed table is the machine's own capability. Nothing here is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from postdiff.stats import metrics  # noqa: E402
from postdiff.workflow.io import read_json  # noqa: E402

CAPABILITIES = ("default", "avx2", "avx512")


def run(capability: str, seeds: list[int], workdir: Path, cores: int) -> Path:
    """Run the default config's FullDelta path under `capability`; returns the run directory."""
    name = f"capability-{capability}"
    overlay = workdir / f"{name}.yaml"
    overlay.write_text(json.dumps({"run": name, "surrogate": {"seeds": seeds}}))
    root = Path("results") / name
    targets = [str(root / "eval/test/PT.parquet"), str(root / "eval/test/IT.parquet")]
    for seed in seeds:
        targets += [str(root / f"seed{seed}/eval/test/FullDelta.parquet"), str(root / f"seed{seed}/gates/full.json")]
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    cmd = [sys.executable, "-m", "snakemake", *targets, "--cores", str(cores),
           "--configfile", "config/config.yaml", str(overlay)]
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    return REPO / root


def rows(capability: str, root: Path, seeds: list[int]) -> list[dict]:
    out = []
    for seed in seeds:
        frames = metrics.read_eval([root / "eval/test/PT.parquet", root / "eval/test/IT.parquet",
                                    root / f"seed{seed}/eval/test/FullDelta.parquet"])
        table = metrics.summary(metrics.align(frames))
        choice = root / f"seed{seed}/gates/full_choice.json"
        out.append({"capability": capability, "seed": seed,
                    **{k: table["FullDelta"][k] for k in ("CapRec", "Cap", "KL", "Len")},
                    "gates": read_json(root / f"seed{seed}/gates/full.json"),
                    "choice": read_json(choice) if choice.is_file() else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--capabilities", nargs="+", default=list(CAPABILITIES))
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "bench/results/capabilities.json"))
    args = parser.parse_args()
    native = torch.backends.cpu.get_cpu_capability().lower()
    work = REPO / "bench/work"
    work.mkdir(parents=True, exist_ok=True)
    result = []
    for capability in sorted(args.capabilities, key=lambda c: c != native):
        result += rows(capability, run(capability, args.seeds, work, args.cores), args.seeds)
        print(f"{capability}: done", file=sys.stderr)
    caprec = [r["CapRec"] for r in result]
    facts = {"native": native, "seeds": args.seeds, "rows": result,
             "caprec_min": min(caprec), "caprec_max": max(caprec),
             "command": " ".join([".venv/bin/python", *sys.argv])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(facts, indent=2) + "\n")
    print("| capability | seed | alpha | KL | Cap | CapRec | Len |\n|---|---|---|---|---|---|---|")
    for r in result:
        print(f"| {r['capability']} | {r['seed']} | {', '.join(f'{a:g}' for a in r['gates'].values())} "
              f"| {r['KL']:.3f} | {r['Cap']:.3f} | {r['CapRec']:.3f} | {r['Len']:.2f} |")


if __name__ == "__main__":
    main()
