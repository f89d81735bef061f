"""BOS appears exactly once, first, in every encoded prefix, or never when the tokenizer has none."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from postdiff.models.template import encode_prefix, render

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # Gemma's ids 0..3


def byte_tokenizer(bos: bool, adds_bos: bool = True) -> PreTrainedTokenizerFast:
    """Byte-level, no merges. ``bos``: the tokenizer has a BOS token (Gemma) or none (Qwen);
    ``adds_bos``: its post-processor prepends it."""
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if bos and adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    named = {"bos_token": "<bos>"} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=[] if bos else ["<bos>"], **named)


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


def test_a_bos_tokenizer_that_does_not_add_it_is_refused() -> None:
    with pytest.raises(ValueError, match=r"holds BOS \(id 2\) 0 times \(not first\)"):
        encode_prefix(byte_tokenizer(bos=True, adds_bos=False), "What is 3 + 4?")
