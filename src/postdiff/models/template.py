"""The neutral template and the exact prompt/answer token boundary (SPEC §1, §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TEMPLATE = "Instruction:\n{prompt}\n\nResponse:\n"


def render(prompt: str) -> str:
    return TEMPLATE.format(prompt=prompt)


def encode_prefix(tokenizer, prompt: str) -> list[int]:
    """Prefix ids, with the tokenizer's own special tokens (BOS for Gemma)."""
    ids = list(tokenizer(render(prompt), add_special_tokens=True)["input_ids"])
    check_bos(ids, tokenizer.bos_token_id, prompt)
    return ids


def check_bos(ids: Sequence[int], bos_id: int | None, prompt: str) -> None:
    """A tokenizer with a BOS token must start each prefix with it, and only there: Gemma's
    outputs degrade without it, and a second one (a prompt spelling ``<bos>``, a template adding
    its own) is another input than the one the pair was trained on. A tokenizer without one
    (Qwen) adds none."""
    if bos_id is None:
        return
    count = sum(1 for i in ids if i == bos_id)
    if count != 1 or ids[0] != bos_id:
        where = "first" if ids and ids[0] == bos_id else "not first"
        raise ValueError(
            f"prompt {prompt[:60]!r}: its encoded prefix holds BOS (id {bos_id}) {count} times ({where}); "
            "each prefix needs it exactly once, as its first token"
        )


def answer_positions(m: int, n: int) -> range:
    """Positions whose next-token prediction is an answer token: ``m-1 .. m+n-2``."""
    return range(m - 1, m + n - 1)


def teacher_forced_batch(
    prefixes: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``prefix + answer`` rows.

    Returns ``input_ids`` and ``attention_mask`` of shape ``[b, T]`` and a boolean
    ``answer_mask`` that is true exactly at each row's answer-phase positions.
    """
    lengths = [len(p) + len(a) for p, a in zip(prefixes, answers, strict=True)]
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(lengths), T), dtype=torch.long)
    ans = torch.zeros((len(lengths), T), dtype=torch.bool)
    for i, (p, a) in enumerate(zip(prefixes, answers)):
        row = list(p) + list(a)
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attn[i, : len(row)] = 1
        pos = answer_positions(len(p), len(a))
        ans[i, pos.start : pos.stop] = True
    return ids, attn, ans


def left_padded_prompts(
    prefixes: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt batch for ``generate``: every row's position ``m-1`` is the last column."""
    T = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prefixes), T), dtype=torch.long)
    for i, p in enumerate(prefixes):
        ids[i, T - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        attn[i, T - len(p) :] = 1
    return ids, attn
