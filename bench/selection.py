"""What one forward-selection step costs: verify-then-generate against plain generation, and
how plain generation grows with the candidate pool.

On a finished run's selector artifacts (its resolved config, one seed's FullDelta spec, scores
and locked CapMask, the PT and IT selector records), each step the locked selection took is
evaluated again, at each batch size of ``--batches``: every mask of the step (its incumbent
first) by one plain batched generation (``selection.verify: false``), then by
verify-then-generate (the incumbent generated watching the features the other masks add; a
mask whose added features stay silent on a prompt takes its tokens there with no pass, every
other mask is teacher-forced on them, the rest generated). Per step it records both times,
masks per second, the speed-up, the share of candidate rows settled (``share_verified``) and
of those with no pass (``share_identical``), diverged and within the margin, and whether the
two gave equal records. ``--pools`` also times plain steps of ``P`` single-feature masks against ``P = 1``
(``per_candidate_ratio`` below 1: batching candidates pays). The run's own selection wall
times (its benchmark files) are reported alongside.

    .venv/bin/python bench/selection.py [--run results/default] [--seed 0] [--batches 256,8]
        [--steps 1,5] [--margin 0.001] [--out bench/results/selection_verify.json]
    .venv/bin/python bench/selection.py --batches "" --pools 1,2,4,8,16 --reps 2 --out bench/results/selection.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

os.environ.setdefault("TQDM_DISABLE", "1")

import polars as pl
import torch

from postdiff.method import variants as V
from postdiff.method.evaluate import evaluate, evaluate_masks, verify_masks
from postdiff.method.selection.jobs import DEFAULTS, Selection
from postdiff.method.selection.maskfile import layer_mask
from postdiff.method.selection.search import RULES, Mask, Pair, candidates
from postdiff.method.spec import Variant
from postdiff.workflow.config import threshold
from postdiff.workflow.io import read_json, write_json
from postdiff.workflow.runtime import Job

T = TypeVar("T")


def selection_job(run: Path, cfg: dict, seed: int) -> Job:
    sel = cfg["selection"]
    pair = {role: str(run / "pair" / role) if cfg["pair"][role] == "builtin" else cfg["pair"][role] for role in ("pt", "it")}
    seeded = run / f"seed{seed}"
    return Job(
        input={"variant": str(seeded / "variants" / "FullDelta.json"), "split": str(run / "suite" / "selector.parquet"),
               "teacher": str(run / "teacher" / "selector.parquet"), "scores": str(seeded / "selection" / "scores.parquet"),
               "pt_records": str(run / "eval" / "selector" / "PT.parquet"),
               "it_records": str(run / "eval" / "selector" / "IT.parquet")},
        output={},
        params={**pair, "dtype": cfg["pair"]["dtype"], "device": cfg["pair"]["device"], "selection": "cap",
                **{k: sel[k] for k in ("cap_cutoff", "verb_exclusion", "lambda", "size_cap", "max_candidates",
                                       "max_new_tokens", "batch_size")}},
    )


def locked_steps(mask_file: Path) -> list[tuple[Mask, list[Pair]]]:
    """Each step the locked selection took: its incumbent and the candidates it tried."""
    obj = read_json(mask_file)
    order = [tuple(p) for p in obj["order"]]
    pool = [tuple(p) for p in obj["pool"]]
    return [(tuple(order[:t]), [c for c in pool if c not in order[:t]]) for t in range(len(order))]


def compare_step(sel: Selection, modules: dict, masks: list[Mask], batch_size: int, margin: float, reps: int) -> dict:
    """One step's masks, plain and verified, at one batch size."""
    model, tokenizer = sel.pt
    args = (model, tokenizer, sel.rows, sel.variant, modules, [layer_mask(m) for m in masks],
            int(sel.job.params["max_new_tokens"]), batch_size)
    plain, plain_s = timed(reps, lambda: evaluate_masks(*args))
    (verified_records, verified), verify_s = timed(reps, lambda: verify_masks(*args, margin))
    return {
        "masks": len(masks),
        "plain_s": plain_s,
        "verify_s": verify_s,
        "plain_masks_per_s": len(masks) / plain_s,
        "verify_masks_per_s": len(masks) / verify_s,
        "speedup": plain_s / verify_s,
        "candidate_rows": verified.rows,
        "share_identical": verified.identical / verified.rows if verified.rows else None,
        "share_verified": (verified.identical + verified.verified) / verified.rows if verified.rows else None,
        "share_diverged": verified.diverged / verified.rows if verified.rows else None,
        "share_near_tie": verified.near_tie / verified.rows if verified.rows else None,
        "diverged_at": {str(k): v for k, v in verified.diverged_at.items()},
        "records_equal": verified_records.equals(plain),
    }


def pool_scaling(sel: Selection, scores: pl.DataFrame, pools: list[int], reps: int) -> dict:
    """Plain steps of ``P`` single-feature masks, and plain PT generation of the same prompts."""
    # Timing needs pools of every size, whatever the cutoffs admit: the top features by score.
    pool = candidates(scores, RULES["cap"], float("-inf"), None, max(pools))
    objective = sel.objective()
    model, tokenizer = sel.pt
    plain = timed(reps, lambda: evaluate(model, tokenizer, sel.rows, Variant(name="PT", mode="pt"), {},
                                           int(sel.job.params["max_new_tokens"]),
                                           int(sel.job.params["batch_size"]), None))[1]
    seconds = {p: timed(reps, lambda p=p: objective([(c,) for c in pool[:p]]))[1] for p in pools if p <= len(pool)}
    one = seconds.get(1) or timed(reps, lambda: objective([(pool[0],)]))[1]
    return {
        "plain_pt_generation_s": plain,
        "step_seconds": {str(p): s for p, s in seconds.items()},
        "per_candidate_ratio": {str(p): s / p / one for p, s in seconds.items()},
        "one_candidate_vs_plain": one / plain,
    }


def timed(reps: int, fn: Callable[[], T]) -> tuple[T, float]:
    """``fn``'s result and its best wall time over ``reps`` calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


def run_seconds(run: Path, seed: int) -> dict[str, float]:
    """Wall seconds of one seed's selection jobs, from Snakemake's benchmark files."""
    root = run / "benchmarks" / f"seed{seed}"
    files = sorted((root / "sweep").rglob("*.tsv")) + sorted((root / "selection").glob("*.tsv"))
    return {str(f.relative_to(root)): float(pl.read_csv(f, separator="\t")["s"][0]) for f in files}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="results/default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batches", default="256,8", help="batch sizes of the verify comparison (rows a batch)")
    ap.add_argument("--steps", default="1,5", help="which of the locked selection's steps to time")
    ap.add_argument("--margin", type=float, default=DEFAULTS["verify_margin"])
    ap.add_argument("--pools", default="", help="pool sizes of the plain scaling (empty: skip it)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/selection_verify.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    cfg = read_json(run / "provenance" / "config.json")
    sel = Selection.read(selection_job(run, cfg, args.seed), RULES["cap"])
    model, _ = sel.pt
    modules = V.materialise(sel.variant, next(model.parameters()).device)[0]
    steps = locked_steps(run / f"seed{args.seed}" / "sweep" / f"verb_exclusion={threshold(cfg['selection']['verb_exclusion'])}"
                         / f"cap_cutoff={threshold(cfg['selection']['cap_cutoff'])}" / "cap_mask.json")
    wanted = [int(t) for t in args.steps.split(",")]
    compare_step(sel, modules, [()], 8, args.margin, 1)  # warm-up: first-call allocations and lazy inits
    comparison = {
        str(b): {str(t): compare_step(sel, modules, [steps[t - 1][0], *(steps[t - 1][0] + (c,) for c in steps[t - 1][1])],
                                      b, args.margin, args.reps)
                 for t in wanted if t <= len(steps)}
        for b in (int(b) for b in args.batches.split(",") if b)
    }
    for b, per_step in comparison.items():
        for t, row in per_step.items():
            print(f"batch {b} step {t}: {row['masks']} masks, plain {row['plain_s']:.2f} s, verify {row['verify_s']:.2f} s "
                  f"(x{row['speedup']:.2f}), settled {row['share_verified']:.3f} ({row['share_identical']:.3f} with no pass), "
                  f"equal {row['records_equal']}",
                  file=sys.stderr)
    pools = [int(p) for p in args.pools.split(",") if p]
    result = {
        "name": "selection",
        "run": str(run),
        "seed": args.seed,
        "n_prompts": sel.rows.height,
        "max_new_tokens": int(sel.job.params["max_new_tokens"]),
        "run_batch_size": int(sel.job.params["batch_size"]),
        "verify_margin": args.margin,
        "verify_vs_plain": comparison,
        **({"pool_scaling": pool_scaling(sel, pl.read_parquet(sel.job.input["scores"]), pools, args.reps)} if pools else {}),
        "run_selection_seconds": run_seconds(run, args.seed),
        "threads": args.threads,
        "device": f"{next(model.parameters()).device} ({platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable.split("/")[-1], *sys.argv]),
    }
    write_json(result, args.out)


if __name__ == "__main__":
    main()
