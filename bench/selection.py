"""How one forward-selection step's cost grows with the candidate pool.

On a finished run's selector artifacts (its resolved config, FullDelta spec, scores and
references), one step's objective is timed for pools of ``P`` candidate masks, all evaluated
in one batched generation (``P`` x the selector prompts), against ``P = 1`` through the same
code and a plain PT generation of the same prompts (no hook). ``per_candidate_ratio`` is the
step time per candidate over the ``P = 1`` time: below 1 means batching candidates pays. The
run's own selection wall times (its benchmark files) are reported alongside.

    .venv/bin/python bench/selection.py [--run results/default] [--pools 1,2,4,8,16]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import polars as pl
import torch

from postdiff.method.evaluate import evaluate
from postdiff.method.selection.jobs import Selection
from postdiff.method.selection.search import RULES, candidates
from postdiff.method.spec import Variant
from postdiff.workflow.io import read_json, write_json
from postdiff.workflow.runtime import Job


def selection_job(run: Path, cfg: dict) -> Job:
    sel = cfg["selection"]
    pair = {role: str(run / "pair" / role) if cfg["pair"][role] == "builtin" else cfg["pair"][role] for role in ("pt", "it")}
    return Job(
        input={"variant": str(run / "variants" / "FullDelta.json"), "split": str(run / "suite" / "selector.parquet"),
               "teacher": str(run / "teacher" / "selector.parquet"), "scores": str(run / "selection" / "scores.parquet"),
               "pt_records": str(run / "eval" / "selector" / "PT.parquet"),
               "it_records": str(run / "eval" / "selector" / "IT.parquet")},
        output={},
        params={**pair, "dtype": cfg["pair"]["dtype"], "device": cfg["pair"]["device"], "selection": "cap",
                **{k: sel[k] for k in ("cap_cutoff", "verb_exclusion", "lambda", "size_cap", "max_candidates",
                                       "max_new_tokens", "batch_size")}},
    )


def best_of(reps: int, fn) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_seconds(run: Path) -> dict[str, float]:
    """Wall seconds of the run's selection jobs, from Snakemake's benchmark files."""
    files = sorted((run / "benchmarks" / "sweep").rglob("*.tsv")) + sorted((run / "benchmarks" / "selection").glob("*.tsv"))
    return {str(f.relative_to(run / "benchmarks")): float(pl.read_csv(f, separator="\t")["s"][0]) for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="results/default")
    ap.add_argument("--pools", default="1,2,4,8,16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/selection.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = read_json(run / "provenance" / "config.json")
    sel = Selection.read(selection_job(run, cfg), RULES["cap"])
    pools = [int(p) for p in args.pools.split(",")]
    scores = pl.read_parquet(run / "selection" / "scores.parquet")
    # Timing needs pools of every size, whatever the cutoffs admit: the top features by score.
    pool = candidates(scores, RULES["cap"], float("-inf"), None, max(pools))
    objective = sel.objective()
    objective([(pool[0],)])  # warm-up: first-call allocations and lazy inits

    model, tokenizer = sel.pt
    plain = best_of(args.reps, lambda: evaluate(model, tokenizer, sel.rows, Variant(name="PT", mode="pt"), {},
                                                int(sel.job.params["max_new_tokens"]),
                                                int(sel.job.params["batch_size"]), None))
    seconds = {p: best_of(args.reps, lambda p=p: objective([(c,) for c in pool[:p]])) for p in pools if p <= len(pool)}
    one = seconds.get(1) or best_of(args.reps, lambda: objective([(pool[0],)]))
    result = {
        "name": "selection",
        "run": str(run),
        "n_prompts": sel.rows.height,
        "max_new_tokens": int(sel.job.params["max_new_tokens"]),
        "batch_size": int(sel.job.params["batch_size"]),
        "plain_pt_generation_s": plain,
        "step_seconds": {str(p): s for p, s in seconds.items()},
        "per_candidate_ratio": {str(p): s / p / one for p, s in seconds.items()},
        "one_candidate_vs_plain": one / plain,
        "run_selection_seconds": run_seconds(run),
        "threads": args.threads,
        "device": f"{next(model.parameters()).device} ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
    }
    write_json(result, args.out)
    print({k: result[k] for k in ("plain_pt_generation_s", "step_seconds", "per_candidate_ratio")}, file=sys.stderr)


if __name__ == "__main__":
    main()
