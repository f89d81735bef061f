"""Greedy generation with the KV cache, optionally under an intervention (SPEC §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from postdiff.models.forward import EditFactory, Edits, as_variant, edits_for, length_sorted_batches
from postdiff.models.hook import intervene
from postdiff.models.loading import stop_set
from postdiff.models.template import left_padded_prompts


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """The tokenizer's EOS plus the model's generation EOS ids, which :func:`postdiff.models.loading.load_model`
    sets to the pair's one stop set."""
    return stop_set(tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None))


def cut_at_eos(tokens: list[int], eos: Sequence[int]) -> tuple[list[int], bool]:
    """Tokens up to and including the first EOS (pads after it dropped), and whether it came."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1], True
    return tokens, False


def generate(
    model: nn.Module,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    edits: Edits | None = None,
    edit_factory: EditFactory | None = None,
    *,
    min_new_tokens: int = 0,
    use_cache: bool = True,
    batches: Sequence[list[int]] | None = None,
) -> list[tuple[list[int], bool]]:
    """Greedy ``(token_ids, eos)`` per prefix, in input order.

    Rows run left-padded in length-sorted batches (or in ``batches``, lists of row indices);
    ``edit_factory(batch_row_indices)`` gives per-row edits (e.g. one candidate feature mask per row).
    """
    from transformers import GenerationConfig

    variant = as_variant(edits, edit_factory)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prefixes):
        if len(p) == 0:
            raise ValueError(f"prefix {i} is empty")
    eos = stop_ids(model, tokenizer)
    # A fresh config, so sampling knobs in the model's own (top_k, temperature) never apply or warn.
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        use_cache=use_cache,
    )
    device = next(model.parameters()).device
    results: list[tuple[list[int], bool]] = [([], False)] * len(prefixes)
    with tqdm(total=len(prefixes), desc="generate") as bar:
        if batches is None:
            batches = length_sorted_batches([len(p) for p in prefixes], batch_size)
        elif sorted(i for idx in batches for i in idx) != list(range(len(prefixes))):
            raise ValueError("batches must cover every prefix exactly once")
        for idx in batches:
            ids, attn = left_padded_prompts([prefixes[i] for i in idx], tokenizer.pad_token_id)
            with torch.inference_mode(), intervene(model, edits_for(idx, variant)):
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=attn.to(device), generation_config=config
                )
            for row, i in enumerate(idx):
                results[i] = cut_at_eos(out[row, ids.shape[1] :].tolist(), eos)
            bar.update(len(idx))
    return results
