"""Greedy generation with the KV cache, optionally under an intervention (SPEC §3)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from postdiff.models.forward import EditFactory, Edits, answer_argmax, as_variant, edits_for, length_sorted_batches
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


@dataclass
class Verified:
    """What verification decided for the non-incumbent rows of one call: ``identical`` had the
    incumbent's edits at every position of its tokens, so its tokens with no pass; ``verified``
    took the incumbent's tokens from a teacher-forced pass; ``diverged`` had another greedy
    token (``diverged_at``: how many first did so at each answer position); ``near_tie`` agreed
    but with a margin under the tolerance, or had an incumbent that did. The last two were
    generated."""

    rows: int = 0
    identical: int = 0
    verified: int = 0
    diverged: int = 0
    near_tie: int = 0
    diverged_at: dict[int, int] = field(default_factory=dict)


# Given the incumbent's outputs (one per prompt), whether each row (copy ``g`` of prompt ``i``
# is row ``g * n + i``) has the incumbent's edits at every answer position of its tokens.
Identical = Callable[[Sequence[tuple[list[int], bool]]], Sequence[bool]]


@dataclass(frozen=True)
class Watch:
    """A proof of equal edits without a pass: the incumbent generates under
    ``edit_factory(idx)`` (its own edits, watching what they see), after which ``identical``
    names the copies whose edits were the incumbent's all along its tokens. Greedy decoding
    that sees the same edits at the same positions emits the same tokens, bit for bit."""

    edit_factory: EditFactory
    identical: Identical


def verify_then_generate(
    model: nn.Module,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    n_groups: int,
    edit_factory: EditFactory,
    max_new_tokens: int,
    batch_size: int,
    margin: float,
    watch: Watch | None = None,
) -> tuple[list[tuple[list[int], bool]], Verified]:
    """Greedy ``(token_ids, eos)`` of ``n_groups`` copies of the prompts (copy ``g`` of prompt
    ``i`` is row ``g * n + i``; ``edit_factory`` gets those indices), as :func:`generate` gives
    them, generating only what the incumbent (copy 0) does not settle.

    A copy that ``watch`` proves identical takes the incumbent's tokens with no pass. Greedy
    decoding is its argmax at each position, so another copy whose teacher-forced argmax on the
    incumbent's tokens (stop token included) is those tokens would generate them. A pass without
    the KV cache rounds differently from a cached decode: a position whose top two logits are
    within ``margin`` of each other, in the copy or in the incumbent, does not count as
    agreement. A prompt with a copy that does not agree is generated again from scratch, that
    copy and the incumbent in one batch, and its settled copies take the incumbent's new tokens:
    copies with equal edits still get equal tokens, in bf16 too."""
    n = len(prefixes)
    incumbent = generate(model, tokenizer, prefixes, max_new_tokens, batch_size,
                         edit_factory=watch.edit_factory if watch else edit_factory)
    proven = watch.identical(incumbent) if watch else [False] * (n_groups * n)
    identical = [r < n or bool(proven[r]) for r in range(n_groups * n)]
    # Only prompts with a copy not proven identical need the pass, and their incumbent with them.
    open_prompts = {r % n for r in range(n, n_groups * n) if not identical[r]}
    forced = [r for r in range(n_groups * n) if r % n in open_prompts and (r < n or not identical[r])]
    agrees, diverges_at = dict.fromkeys(forced, False), [-1] * (n_groups * n)
    rows = [(prefixes[r % n], incumbent[r % n][0]) for r in forced]
    for k, argmax, lead in answer_argmax(model, rows, batch_size, lambda idx: edit_factory([forced[k] for k in idx])):
        r = forced[k]
        wrong = (argmax.cpu() != torch.as_tensor(rows[k][1])).nonzero()
        diverges_at[r] = int(wrong[0]) if len(wrong) else -1
        agrees[r] = not len(wrong) and bool((lead >= margin).all())
    held = [r < n or identical[r] or (agrees[r] and agrees[r % n]) for r in range(n_groups * n)]
    redo = {i: [i, *(r for r in range(n + i, n_groups * n, n) if not held[r])]
            for i in open_prompts if not all(held[i::n])}
    outputs = [incumbent[r % n] for r in range(n_groups * n)]
    if redo:
        order = [r for copies in redo.values() for r in copies]
        batches = _prompt_batches(list(redo.values()), [len(prefixes[i]) for i in redo], batch_size)
        at = {r: k for k, r in enumerate(order)}
        again = generate(model, tokenizer, [prefixes[r % n] for r in order], max_new_tokens, batch_size,
                         edit_factory=lambda idx: edit_factory([order[k] for k in idx]),
                         batches=[[at[r] for r in batch] for batch in batches])
        for r in range(n_groups * n):
            if r % n in redo:
                outputs[r] = again[at[r if r in at else r % n]]
    return outputs, _verified(identical, held, diverges_at, n)


def _prompt_batches(copies: list[list[int]], lengths: list[int], batch_size: int) -> list[list[int]]:
    """Batches of row indices that keep each prompt's ``copies`` together (longest prompts
    first), as many prompts a batch as ``batch_size`` rows allow (at least one)."""
    batches: list[list[int]] = [[]]
    for k in sorted(range(len(copies)), key=lambda k: -lengths[k]):
        if batches[-1] and len(batches[-1]) + len(copies[k]) > batch_size:
            batches.append([])
        batches[-1].extend(copies[k])
    return batches


def _verified(identical: list[bool], held: list[bool], diverges_at: list[int], n: int) -> Verified:
    stats = Verified(rows=len(held) - n)
    for r in range(n, len(held)):
        if identical[r]:
            stats.identical += 1
        elif diverges_at[r] >= 0:
            stats.diverged += 1
            stats.diverged_at[diverges_at[r]] = stats.diverged_at.get(diverges_at[r], 0) + 1
        elif held[r]:
            stats.verified += 1
        else:
            stats.near_tie += 1
    stats.diverged_at = dict(sorted(stats.diverged_at.items()))
    return stats
