"""A model job's start: importing its stage module and loading one model (``load_model``), in a
fresh process as Snakemake starts every job, with the collector paused as the workflow does
(``runtime.gc_paused``) against the same start with it running. On the tiny configs most of a
model job is this start, and a CI run starts a few hundred of them.

The model is the shipped embedded PT (workflow/resources/embedded_pair/pt). Times are the CPU
seconds (user + system) of each child process; rounds alternate the two. Writes
bench/results/startup.json. Goal: ratio <= 0.95.

    .venv/bin/python bench/startup.py [--rounds 7] [--entry postdiff.method.evaluate:evaluate_variant]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
from pathlib import Path

from ratio import write  # bench/ratio.py

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "workflow/resources/embedded_pair/pt"
GOAL = 0.95

# Both run the workflow's own code; in the baseline, pausing the collector does nothing.
START = """
import gc, sys
if sys.argv[1] == "base":
    gc.disable = lambda: None
import postdiff.workflow.runtime as runtime
runtime.resolve(sys.argv[2])
from postdiff.models.loading import load_model
load_model(sys.argv[3])
"""


def child_cpu(mode: str, entry: str) -> float:
    """CPU seconds of one child process that starts a job in ``mode`` (``ours`` or ``base``)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", START, mode, entry, str(MODEL)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--entry", default="postdiff.method.evaluate:evaluate_variant")
    ap.add_argument("--out", default=str(REPO / "bench/results/startup.json"))
    args = ap.parse_args()
    child_cpu("ours", args.entry), child_cpu("base", args.entry)  # warm-up: page cache, .pyc files
    ours, base = [], []
    for _ in range(args.rounds):
        base.append(child_cpu("base", args.entry))
        ours.append(child_cpu("ours", args.entry))
        print(f"base {base[-1]:.2f}s  ours {ours[-1]:.2f}s (CPU)", file=sys.stderr)
    timings = {"ratio": min(ours) / min(base), "ratio_median": statistics.median(ours) / statistics.median(base),
               "seconds_ours": ours, "seconds_baseline": base}
    write("startup", timings, GOAL, args.out, entry=args.entry, model=str(MODEL.relative_to(REPO)),
          unit="CPU seconds of the child process")


if __name__ == "__main__":
    main()
