"""What the ratio benchmarks share: alternating timed rounds against a baseline, and the result file."""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def compare(ours: Callable[[], None], base: Callable[[], None], rounds: int,
            sync: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Time `ours` and `base` in alternating rounds after one warm-up each (page cache, allocator,
    kernels); `sync` waits for queued device work. The ratio is of the fastest rounds."""
    def timed(fn: Callable[[], None]) -> float:
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    timed(ours), timed(base)
    t_ours, t_base = [], []
    for _ in range(rounds):
        t_base.append(timed(base))
        t_ours.append(timed(ours))
        print(f"base {t_base[-1]:.3f}s  ours {t_ours[-1]:.3f}s", file=sys.stderr)
    return {"ratio": min(t_ours) / min(t_base), "ratio_median": statistics.median(t_ours) / statistics.median(t_base),
            "seconds_ours": t_ours, "seconds_baseline": t_base}


def write(name: str, timings: dict[str, Any], goal: float, out: str | Path, **facts: Any) -> None:
    """Write the figures to `out` as JSON (with the command that made them) and print the ratio."""
    result = {"name": name, **timings, "goal": f"ratio <= {goal}", "met": timings["ratio"] <= goal, **facts,
              "command": " ".join([".venv/bin/python", *sys.argv])}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio", "ratio_median", "met")}))
