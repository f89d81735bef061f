"""Caching cost: ``cache.collect`` (both models, hooks, answer-position gather, copy to CPU)
against two plain forward passes (PT and IT) over the same length-sorted batches, no hooks.

A tiny random-init Gemma 3 pair (hidden 192, 4 layers, vocab 1024) and ~1000 teacher-like rows
(prefix ~20 tokens, answers 3-48). Rounds alternate the two so machine load hits both alike;
the ratio is of the fastest rounds. Writes bench/results/caching.json (caching_cuda.json on a
GPU, where the models and the stored caches are bf16 as on a real pair). Goal: ratio <= 1.15.

    .venv/bin/python bench/caching.py [--rows 1000] [--rounds 5] [--threads 2] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import polars as pl
import torch
from ratio import compare, write  # bench/ratio.py
from transformers import Gemma3ForCausalLM

from postdiff.method.cache import collect
from postdiff.models.forward import length_sorted_batches
from postdiff.models.loading import gemma3_text_config, pick_device, pick_dtype
from postdiff.models.template import teacher_forced_batch

VOCAB = 1024
GOAL = 1.15


def tiny_gemma(seed: int, num_layers: int = 4) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    cfg = gemma3_text_config(VOCAB, 192, num_layers, intermediate_size=768, num_heads=4, num_kv_heads=2,
                             sliding_window=64)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def teacher_rows(n: int, seed: int) -> pl.DataFrame:
    g = torch.Generator().manual_seed(seed)
    prefix_len = torch.randint(16, 25, (n,), generator=g).tolist()
    answer_len = torch.randint(3, 49, (n,), generator=g).tolist()
    return pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "prefix_ids": [[2] + torch.randint(4, VOCAB, (m - 1,), generator=g).tolist() for m in prefix_len],
            "token_ids": [torch.randint(4, VOCAB, (a,), generator=g).tolist() for a in answer_len],
        }
    )


@torch.inference_mode()
def plain_forwards(pt, it, rows: pl.DataFrame, batch_size: int, device: torch.device) -> None:
    prefixes, answers = rows["prefix_ids"].to_list(), rows["token_ids"].to_list()
    for idx in length_sorted_batches([len(p) + len(a) for p, a in zip(prefixes, answers)], batch_size):
        ids, attn, _ = teacher_forced_batch([prefixes[i] for i in idx], [answers[i] for i in idx], pad_id=0)
        ids, attn = ids.to(device), attn.to(device)
        pt(input_ids=ids, attention_mask=attn, use_cache=False)
        it(input_ids=ids, attention_mask=attn, use_cache=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="models and stored caches (auto: bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--out", default=None, help="default: bench/results/caching.json, caching_cuda.json on CUDA")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out = args.out or str(Path(__file__).parent / "results" / f"caching{'_cuda' if device.type == 'cuda' else ''}.json")
    pt, it = (tiny_gemma(seed).to(device, dtype) for seed in (0, 1))
    rows = teacher_rows(args.rows, seed=0)
    n_tokens = int(rows["token_ids"].list.len().sum())

    def ours() -> None:
        collect(pt, it, args.layers, rows, args.batch_size, dtype)

    def base() -> None:
        plain_forwards(pt, it, rows, args.batch_size, device)

    timings = compare(ours, base, args.rounds, sync=torch.cuda.synchronize if device.type == "cuda" else lambda: None)
    write(
        "caching", timings, GOAL, out,
        rows=args.rows,
        answer_tokens=n_tokens,
        layers=args.layers,
        batch_size=args.batch_size,
        threads=args.threads,
        model="Gemma3ForCausalLM random init, hidden 192, intermediate 768, 4 layers, vocab 1024",
        dtype=str(dtype).removeprefix("torch."),
        device=torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        torch=torch.__version__,
        note="ratio of the fastest of `rounds` alternating rounds; the baseline also computes the "
        "LM head and final norm, which block_outputs skips after the last wanted block",
    )

if __name__ == "__main__":
    main()
