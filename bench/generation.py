"""Overhead of the intervention hook on greedy generation with the KV cache.

Hooked ``generate`` (a fixed random linear edit at one layer) against plain ``generate`` on a tiny
random Gemma 3 (hidden 192, 4 layers, ~2.4M parameters), same prompts and the same number of new
tokens (``min_new_tokens = max_new_tokens``), runs interleaved; ``ratio`` is the median of
hooked/plain wall time over back-to-back pairs. On CUDA the model is bf16, as a real pair is, and
the figures go to bench/results/generation_cuda.json. Goal: ratio <= 1.10.

    .venv/bin/python bench/generation.py [--device cpu] [--reps 9] [--out bench/results/generation.json]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time

import torch
import transformers
from transformers import Gemma3ForCausalLM

from postdiff.models.generation import generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import gemma3_text_config, pick_device, pick_dtype
from postdiff.workflow.io import write_json


class _Ids:
    pad_token_id, eos_token_id = 0, 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--layer", type=int, default=2)
    # One thread by default: on a shared 2-core machine, two-thread timings swung 5x with other load.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--out", default=None, help="default: bench/results/generation.json, generation_cuda.json on CUDA")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    out = args.out or f"bench/results/generation{'_cuda' if device.type == 'cuda' else ''}.json"
    torch.manual_seed(args.seed)
    config = gemma3_text_config(1024, 192, 4, intermediate_size=768, num_heads=4, num_kv_heads=2)
    model = Gemma3ForCausalLM(config).to(device, dtype).eval()
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(16, 41, (args.prompts,), generator=g).tolist()
    prefixes = [torch.randint(4, 1024, (m,), generator=g).tolist() for m in lengths]
    W = (torch.randn(192, 192, generator=g) / 192**0.5).to(device, dtype)
    edits = {args.layer: LayerEdit(0.5, lambda h: h @ W)}

    def run(hooked: bool) -> tuple[float, float]:
        """Wall and process CPU seconds of one generate call."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        out = generate(model, _Ids, prefixes, args.new_tokens, args.batch_size,
                       edits=edits if hooked else None, min_new_tokens=args.new_tokens)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        assert all(len(ids) == args.new_tokens for ids, _ in out)
        return wall, cpu

    run(False), run(True)  # warm-up: allocator, kernels, lazy imports
    timings: dict[str, list[float]] = {"plain": [], "hooked": []}
    cpu: dict[str, list[float]] = {"plain": [], "hooked": []}
    for rep in range(args.reps):
        # Alternate which goes first, so drift in machine load hits both alike.
        for kind in (("plain", "hooked") if rep % 2 == 0 else ("hooked", "plain")):
            wall_s, cpu_s = run(kind == "hooked")
            timings[kind].append(wall_s)
            cpu[kind].append(cpu_s)
    median = {k: statistics.median(v) for k, v in timings.items()}
    tokens = args.prompts * args.new_tokens
    result = {
        # Median of back-to-back pairs: robust to load from other processes drifting over the run.
        "ratio": statistics.median(h / p for h, p in zip(timings["hooked"], timings["plain"])),
        "ratio_of_medians": median["hooked"] / median["plain"],
        "ratio_of_minima": min(timings["hooked"]) / min(timings["plain"]),
        "cpu_ratio": statistics.median(h / p for h, p in zip(cpu["hooked"], cpu["plain"])),
        "median_s": median,
        "timings_s": timings,
        "cpu_s": cpu,
        "tokens_per_s": {k: tokens / v for k, v in median.items()},
        "goal": "ratio <= 1.10",
        "setup": {"prompts": args.prompts, "prompt_lengths": [min(lengths), max(lengths)],
                  "batch_size": args.batch_size, "new_tokens": args.new_tokens, "edit_layer": args.layer,
                  "edit": "0.5 * h @ W, W random [192, 192]", "params": n_params, "seed": args.seed},
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
    }
    write_json(result, out)
    print(f"ratio {result['ratio']:.3f} (medians {result['ratio_of_medians']:.3f}, minima "
          f"{result['ratio_of_minima']:.3f}, cpu {result['cpu_ratio']:.3f}); "
          f"plain {median['plain']:.3f}s hooked {median['hooked']:.3f}s -> {out}")


if __name__ == "__main__":
    main()
