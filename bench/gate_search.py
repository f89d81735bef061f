"""Gate search cost: the KL passes of a gate search with ``forward.BlockCache`` (the blocks up to
the first gated layer run once per batch, then start from their kept output) against the same
passes without it, each pass computed in full.

A tiny random-init Gemma 3 pair of ``--num-layers`` blocks (hidden 192, vocab 1024), ~180
teacher-like rows (a calib split: 30 prompts of 6 slices; prefix ~20 tokens, answers 3-48), and
the FullDelta edit of random TopK surrogates (8x width, k 16) at ``--layers``, at ``--points``
gate vectors a round, as a search measures them. Both sides give the same floats (checked here,
and in tests/test_hook.py). Rounds alternate the two so machine load hits both alike; the ratio
is of the fastest rounds. Writes bench/results/gate_search<suffix>.json. The default is the
embedded pair's shape (4 blocks, layers 1 and 2); Gemma 3 4B's (34 blocks, layers 17 and 29) is
``--num-layers 34 --layers 17 29 --suffix _34blocks``. Goal: ratio <= 0.8 on the default shape.

    .venv/bin/python bench/gate_search.py [--rounds 5] [--threads 2] [--num-layers 4] [--layers 1 2]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from caching import teacher_rows, tiny_gemma  # bench/caching.py
from features import surrogate  # bench/features.py
from ratio import compare, write  # bench/ratio.py

from postdiff.method.variants import layer_delta
from postdiff.models.forward import BlockCache, reference_logprobs, variant_kl
from postdiff.models.hook import LayerEdit

GOAL = 0.8


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=180)
    ap.add_argument("--points", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-layers", type=int, default=4)
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--suffix", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pt, it = tiny_gemma(0, args.num_layers), tiny_gemma(1, args.num_layers)
    frame = teacher_rows(args.rows, seed=0)
    rows = list(zip(frame["prefix_ids"].to_list(), frame["token_ids"].to_list(), strict=True))
    reference = reference_logprobs(it, rows, args.batch_size)
    modules = {layer: surrogate(pt.config.hidden_size, layer) for layer in args.layers}
    alphas = torch.linspace(0, 1.5, args.points).tolist()
    variants = {f"{a:g}": {layer: LayerEdit(a, layer_delta("full", sae, None, None)) for layer, sae in modules.items()}
                for a in alphas}
    cache = BlockCache(pt, min(args.layers), 2 << 30)
    out: dict[str, dict] = {}

    def ours() -> None:
        out["ours"] = variant_kl(pt, rows, args.batch_size, variants, reference, cache)

    def base() -> None:
        out["base"] = variant_kl(pt, rows, args.batch_size, variants, reference)

    timings = compare(ours, base, args.rounds)
    if any(not torch.equal(out["ours"][k], out["base"][k]) for k in variants):
        raise SystemExit("the cached passes gave other KLs than the full ones")
    write("gate search KL passes: BlockCache vs every pass in full", timings, GOAL,
          Path(__file__).parent / "results" / f"gate_search{args.suffix}.json", rows=args.rows,
          points_per_round=args.points, num_layers=args.num_layers, layers=args.layers, threads=args.threads,
          batch_size=args.batch_size, torch=torch.__version__, machine=platform.processor() or platform.machine())


if __name__ == "__main__":
    main()
