"""BOS appears exactly once, first, in every encoded prefix where the pair's prefixes take one
(the tokenizer adds it, or its chat template opens with it), and never otherwise."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from postdiff.models.template import encode_prefix, prefix_bos, prefix_disagreement, render

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3


def byte_tokenizer(bos: bool, adds_bos: bool = True, chat: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level, no merges. ``bos``: the tokenizer has a BOS token (Gemma) or none (Qwen);
    ``adds_bos``: its post-processor prepends it; ``chat``: its chat template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if bos and adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    named = {"bos_token": "<bos>"} if bos else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=[] if bos else ["<bos>"], **named)
    tok.chat_template = chat
    return tok


OPENS_WITH_BOS = "{{ bos_token }}{% for m in messages %}<|user|>\n{{ m['content'] }}{% endfor %}"  # OLMo 2's opening
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>{% endfor %}"  # SmolLM2's


def test_a_bos_tokenizer_gives_it_once_first() -> None:
    tok = byte_tokenizer(bos=True)
    ids = encode_prefix(tok, "What is 3 + 4?")
    assert tok.bos_token_id == 2 and ids[0] == 2 and ids.count(2) == 1
    # One token per byte after BOS: nothing else was added or dropped.
    assert len(ids) == 1 + len(render("What is 3 + 4?").encode())


def test_a_tokenizer_without_bos_gives_none() -> None:
    tok = byte_tokenizer(bos=False)
    ids = encode_prefix(tok, "What is 3 + 4?")
    assert tok.bos_token_id is None and 2 not in ids
    assert len(ids) == len(render("What is 3 + 4?").encode())


def test_a_second_bos_in_the_prompt_is_refused() -> None:
    with pytest.raises(ValueError, match=r"holds BOS \(id 2\) 2 times \(first\).*exactly once"):
        encode_prefix(byte_tokenizer(bos=True), "Repeat <bos> after me")


def test_a_bos_named_never_added_but_opening_the_chat_template_is_added_once() -> None:
    """OLMo 2: ``<|endoftext|>`` is its BOS, its tokenizer never adds it, its chat template and its
    training put it first. The old rule ("named means added") refused every such prompt."""
    tok = byte_tokenizer(bos=True, adds_bos=False, chat=OPENS_WITH_BOS)
    ids = encode_prefix(tok, "What is 3 + 4?")
    assert tok("x")["input_ids"][0] != 2 and prefix_bos(tok) == 2
    assert ids == [2, *tok(render("What is 3 + 4?"), add_special_tokens=False)["input_ids"]]


def test_a_bos_named_but_used_by_neither_encoding_nor_template_is_left_out() -> None:
    """SmolLM2 names a BOS (``<|im_start|>`` in the Instruct tokenizer) that neither its encoding nor
    its ChatML template puts first; a tokenizer without a template is read by its encoding alone."""
    for chat in (CHATML, None):
        tok = byte_tokenizer(bos=True, adds_bos=False, chat=chat)
        ids = encode_prefix(tok, "What is 3 + 4?")
        assert tok.bos_token_id == 2 and prefix_bos(tok) is None and 2 not in ids
        assert len(ids) == len(render("What is 3 + 4?").encode())


def test_prefixes_follow_its_tokenizer_and_pt_may_not_add_another_bos() -> None:
    olmo_it = byte_tokenizer(bos=True, adds_bos=False, chat=OPENS_WITH_BOS)
    # OLMo 2 PT's tokenizer (no template, never adds): PT reads IT's BOS-first prefixes, as trained.
    assert prefix_disagreement(byte_tokenizer(bos=True, adds_bos=False), olmo_it) is None
    assert prefix_disagreement(byte_tokenizer(bos=True), byte_tokenizer(bos=True)) is None
    problem = prefix_disagreement(byte_tokenizer(bos=True), byte_tokenizer(bos=True, adds_bos=False, chat=CHATML))
    assert problem == ("PT's tokenizer opens every input with BOS id 2 ('<bos>'), but IT's prefixes, "
                       "which PT reads too, start with no BOS")
