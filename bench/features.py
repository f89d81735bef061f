"""Feature-card data cost: the streaming pass of ``postdiff.outputs.features`` (read each layer's ``h_pt``
shard by shard, encode, running counts/sums and a running top-k per card feature, then the
activity and context rows) against reading the same shards and encoding them with the surrogate
once, nothing kept.

Synthetic cache shards (hidden 192, 2 layers, ~100k answer positions in 4 shards) and random
surrogates (8x width, k 16). Rounds alternate the two so machine load hits both alike; the ratio
is of the fastest rounds. Writes bench/results/features.json. Goal: ratio <= 1.5.

    .venv/bin/python bench/features.py [--tokens 100000] [--cards 40] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import torch
from ratio import compare, write  # bench/ratio.py

from postdiff.method.cache import read_tensor, write_shard
from postdiff.method.surrogate import TopKSurrogate
from postdiff.outputs import features as F

GOAL = 1.5
LAYERS = [0, 1]


def shards(root: Path, n_tokens: int, n_shards: int, d: int) -> tuple[list[str], F.Texts]:
    """Cache shards of ~``n_tokens`` answer positions (prefix 20, answers 3-48) and their texts."""
    g = torch.Generator().manual_seed(0)
    paths, prompts, prefixes, answers = [], {}, {}, {}
    per_shard = n_tokens // n_shards
    for s in range(n_shards):
        lengths, total = [], 0
        while total < per_shard:
            lengths.append(int(torch.randint(3, 49, (1,), generator=g)))
            total += lengths[-1]
        ids = [f"s{s}r{i}" for i in range(len(lengths))]
        rows = pl.DataFrame({"id": ids, "prefix_ids": [list(range(2, 22))] * len(ids),
                             "token_ids": [list(range(30, 30 + n)) for n in lengths]})
        caches = {layer: (torch.randn(total, d, generator=g), torch.zeros(total, d)) for layer in LAYERS}
        path = root / f"shard{s}.safetensors"
        write_shard(path, caches, rows, {"pt": "bench", "it": "bench"}, s, n_shards)
        paths.append(str(path))
        for pid, prefix, answer in rows.iter_rows():
            prompts[pid], prefixes[pid], answers[pid] = "prompt", prefix, answer
    return paths, F.Texts(prompts, prefixes, answers, SimpleNamespace(decode=lambda t: f"<{t[0]}>"))


def surrogate(d: int, seed: int) -> TopKSurrogate:
    g = torch.Generator().manual_seed(seed)
    module = TopKSurrogate(d, 8 * d, 16)
    with torch.no_grad():
        module.W_enc.copy_(torch.randn(8 * d, d, generator=g) / d**0.5)
        module.W_dec.copy_(torch.randn(8 * d, d, generator=g))
    return module


@torch.no_grad()
def encode_once(modules: dict, paths: list[str]) -> None:
    for layer, module in modules.items():
        for path in paths:
            h = read_tensor(path, f"h_pt.{layer}")
            for i in range(0, h.shape[0], F.ENCODE_BATCH):
                module.sparse_code(h[i : i + F.ENCODE_BATCH])


def data_stage(modules: dict, paths: list[str], texts: F.Texts, cards: list[int], n_contexts: int) -> None:
    for layer, module in modules.items():
        index = F.ShardIndex([], [])
        run = F.stream(module, F.shard_chunks(paths, layer, LAYERS, index), cards, n_contexts)
        F.activity_rows(layer, cards, "selector", run)
        F.context_rows(layer, cards, "selector", run, index, texts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--d", type=int, default=192)
    ap.add_argument("--cards", type=int, default=40, help="card features per layer")
    ap.add_argument("--contexts", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "features.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    modules = {layer: surrogate(args.d, layer) for layer in LAYERS}
    cards = torch.randperm(8 * args.d, generator=torch.Generator().manual_seed(1))[: args.cards].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        paths, texts = shards(Path(tmp), args.tokens, args.shards, args.d)
        n_rows = sum(read_tensor(p, "row").shape[0] for p in paths)

        def ours() -> None:
            data_stage(modules, paths, texts, cards, args.contexts)

        def base() -> None:
            encode_once(modules, paths)

        timings = compare(ours, base, args.rounds)
    write(
        "features", timings, GOAL, args.out,
        answer_positions=n_rows,
        shards=args.shards,
        layers=LAYERS,
        d=args.d,
        n_features=8 * args.d,
        k=16,
        cards_per_layer=args.cards,
        contexts=args.contexts,
        threads=args.threads,
        device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        torch=torch.__version__,
        note="one split; the stage runs this once per split (selector, test). Excludes the lens "
        "(loading IT) and steering (PT generation), which the workflow's benchmark file times",
    )

if __name__ == "__main__":
    main()
