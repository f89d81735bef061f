"""The neutral template and the exact prompt/answer token boundary (SPEC §1, §3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

TEMPLATE = "Instruction:\n{prompt}\n\nResponse:\n"


def render(prompt: str) -> str:
    return TEMPLATE.format(prompt=prompt)


def prefix_bos(tokenizer) -> int | None:
    """The BOS id every prefix must open with, or None: the BOS the tokenizer adds on encoding
    (Llama 3, Gemma, Mistral), else the one its chat template opens with (OLMo 2 names
    ``<|endoftext|>`` and never adds it, but its template and its training put it first), else none
    (Qwen names no BOS; SmolLM2 names one that neither its encoding nor its ChatML template uses).
    Naming a BOS is not using it: :mod:`postdiff.models.families` states each family's answer."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    adds = list(tokenizer("x", add_special_tokens=True)["input_ids"][:1]) == [bos]
    return bos if adds or _template_opens_with_bos(tokenizer) else None


def _template_opens_with_bos(tokenizer) -> bool:
    if not getattr(tokenizer, "chat_template", None):
        return False
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return chat.startswith(tokenizer.bos_token)


def encode_prefixes(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's prefix ids: :func:`prefix_bos` once, then the template's tokens."""
    bos = prefix_bos(tokenizer)
    return [_encode(tokenizer, prompt, bos) for prompt in prompts]


def encode_prefix(tokenizer, prompt: str) -> list[int]:
    return encode_prefixes(tokenizer, [prompt])[0]


def _encode(tokenizer, prompt: str, bos: int | None) -> list[int]:
    # The BOS is ours to place: OLMo 2's tokenizer would not add the one its template opens with.
    ids = ([] if bos is None else [bos]) + list(tokenizer(render(prompt), add_special_tokens=False)["input_ids"])
    check_bos(ids, bos, prompt)
    return ids


def check_bos(ids: Sequence[int], bos_id: int | None, prompt: str) -> None:
    """A prefix with a BOS (``bos_id``, from :func:`prefix_bos`) holds it exactly once, first:
    Gemma's outputs degrade without it, and a second one (a prompt spelling ``<bos>``, a template
    adding its own) is another input than the one the pair was trained on. A pair whose prefixes
    take no BOS (Qwen, SmolLM2) is not checked."""
    if bos_id is None:
        return
    count = sum(1 for i in ids if i == bos_id)
    if count != 1 or ids[0] != bos_id:
        where = "first" if ids and ids[0] == bos_id else "not first"
        raise ValueError(
            f"prompt {prompt[:60]!r}: its encoded prefix holds BOS (id {bos_id}) {count} times ({where}); "
            "each prefix needs it exactly once, as its first token"
        )


def prefix_disagreement(pt_tokenizer, it_tokenizer) -> str | None:
    """Why PT would read the pair's prefixes off its training distribution, or None. The prefixes
    follow IT's tokenizer (the teacher encodes them; PT reads the same ids), so PT's own rule may
    differ only where PT's own rule puts no BOS first: OLMo 2's base tokenizer may have no chat
    template (unverified), and OLMo 2 PT was trained with ``<|endoftext|>`` between documents anyway."""
    pt, it = prefix_bos(pt_tokenizer), prefix_bos(it_tokenizer)
    if pt is None or pt == it:
        return None
    said = "no BOS" if it is None else f"BOS id {it} ({it_tokenizer.convert_ids_to_tokens(it)!r})"
    return (f"PT's tokenizer opens every input with BOS id {pt} ({pt_tokenizer.convert_ids_to_tokens(pt)!r}), "
            f"but IT's prefixes, which PT reads too, start with {said}")


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
