"""Benchmark: the paper's Table 2 comparisons, 600 prompts (100 per slice), B = 10,000.

Compares the vectorised bootstrap (one index matrix, one matrix product) with a plain loop over
resamples that gathers per-prompt arrays and recomputes every metric; the loop runs on fewer
resamples and is scaled up. Writes bench/results/bootstrap.json.

    .venv/bin/python bench/bootstrap.py [--B 10000] [--loop-B 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from postdiff.stats import bootstrap, metrics
from postdiff.workflow.io import write_json

LEVELS = {"PT": 0.0, "IT": 1.0, "FullDelta": 0.25, "CapMask": 0.0, "FullDelta - VMask": 0.22,
          "MeanDiff": 0.01}


def loop_baseline(arrays: metrics.PromptArrays, B: int, seed: int) -> list[tuple[float, float]]:
    idx = bootstrap.stratified_indices(arrays.codes, B, np.random.default_rng(seed))
    comps = bootstrap.DEFAULT_COMPARISONS
    diffs: list[list[float]] = [[] for _ in comps]
    for b in range(B):
        ms = {v: metrics.variant_metrics({f: x[idx[b]] for f, x in p.items()}, arrays.codes)
              for v, p in arrays.prompts.items()}
        ms = {v: {**m, **metrics.relative_metrics(m, ms["PT"], ms["IT"])} for v, m in ms.items()}
        for out, c in zip(diffs, comps):
            out.append(float(ms[c.a][c.metric] - ms[c.b][c.metric]))
    return [bootstrap.percentile_interval(np.array(d), 0.95) for d in diffs]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=10_000)
    parser.add_argument("--loop-B", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "bootstrap.json"))
    args = parser.parse_args()

    frames = metrics.synthetic_records(LEVELS, n_per_slice=100, seed=0)
    runs = []
    for _ in range(args.repeats):  # end to end: align the records, draw, recompute, intervals
        start = time.perf_counter()
        table = bootstrap.bootstrap_comparisons(frames, B=args.B, seed=0)
        runs.append(time.perf_counter() - start)
    arrays = metrics.align(frames)
    start = time.perf_counter()
    loop_baseline(arrays, args.loop_B, seed=0)
    loop_s = time.perf_counter() - start
    loop_scaled = loop_s * args.B / args.loop_B
    total_s = statistics.median(runs)
    result = {
        "total_s": total_s,
        "vectorised_runs_s": runs,
        "vectorised_first_s": runs[0],
        "loop_s": loop_s,
        "loop_B": args.loop_B,
        "loop_scaled_s": loop_scaled,
        "ratio": loop_scaled / total_s,
        "B": args.B,
        "n_prompts": len(arrays.ids),
        "n_comparisons": table.height,
        "device": f"{_cpu()}, {len(os.sched_getaffinity(0))} cores usable",
        "numpy": np.__version__,
        "python": platform.python_version(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    write_json(result, args.out)
    print(f"vectorised: {total_s:.3f} s (median of {args.repeats}; first {runs[0]:.3f} s) | "
          f"loop: {loop_scaled:.1f} s scaled from {args.loop_B} | ratio {result['ratio']:.0f}x")


if __name__ == "__main__":
    main()
