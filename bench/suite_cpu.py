"""Where the test suite's CPU goes: each test's CPU seconds, its own process's and its children's
(every Snakemake run and job it waited for), summed per module.

The suite is CPU-bound on 2 cores, so its time follows its CPU, not the length of any one test.
Used as a pytest plugin, it appends one line per test to ``$SUITE_CPU_DIR/cpu-<worker>.jsonl``;
run as a script, it sums those lines per module into bench/results/suite_cpu.json. Jobs that
SLURM runs (tests/test_slurm.py) are its daemons' children and are not counted here.

This machine's speed drifts by up to a factor of two between hours, so two runs compare only next to a gauge:
``in_process_s``, the CPU of the modules that start no process (unit tests whose work never
changes between the runs compared), grows with the machine's slowness and with nothing else.

    rm -rf /tmp/suite_cpu && SUITE_CPU_DIR=/tmp/suite_cpu PYTHONPATH=bench .venv/bin/pytest -q -rs -p suite_cpu
    .venv/bin/python bench/suite_cpu.py /tmp/suite_cpu "what was run"
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

OUT = Path(__file__).resolve().parent / "results" / "suite_cpu.json"


def _cpu() -> tuple[float, float]:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    (own0, children0), start = _cpu(), time.time()
    yield  # setup, call and teardown: a module's fixture counts with its first test
    own1, children1 = _cpu()
    folder = Path(os.environ.get("SUITE_CPU_DIR", "suite_cpu"))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"cpu-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.jsonl", "a") as fh:
        fh.write(json.dumps({"test": item.nodeid, "own": own1 - own0, "children": children1 - children0,
                             "start": start, "wall": time.time() - start}) + "\n")


def summarise(folder: Path, label: str) -> dict:
    rows = [json.loads(line) for path in sorted(folder.glob("cpu-*.jsonl")) for line in path.read_text().splitlines()]
    modules: dict[str, dict[str, float]] = defaultdict(lambda: {"tests": 0, "own": 0.0, "children": 0.0})
    for row in rows:
        module = modules[row["test"].partition("::")[0]]
        module["tests"] += 1
        module["own"] += row["own"]
        module["children"] += row["children"]
    per_module = sorted(({"module": name, **m, "cpu": m["own"] + m["children"]} for name, m in modules.items()),
                        key=lambda m: -m["cpu"])
    slowest = sorted(rows, key=lambda r: -(r["own"] + r["children"]))[:15]
    in_process = sum(m["cpu"] for m in per_module if m["children"] == 0)
    return {"run": label, "command": " ".join(sys.argv), "n_tests": len(rows), "cpu_s": sum(m["cpu"] for m in per_module),
            "in_process_s": in_process, "modules": per_module, "slowest_tests": slowest}


if __name__ == "__main__":
    figures = summarise(Path(sys.argv[1]), " ".join(sys.argv[2:]))
    OUT.write_text(json.dumps(figures, indent=1) + "\n")
    print(f"{figures['n_tests']} tests, {figures['cpu_s']:.0f} CPU s, of which in-process modules {figures['in_process_s']:.0f} s")
    for m in figures["modules"][:12]:
        print(f"{m['cpu']:8.1f}  {m['module']} ({m['tests']} tests; own {m['own']:.1f}, children {m['children']:.1f})")
