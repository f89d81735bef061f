"""The toy pair's tokenizer: a small byte-level BPE with Gemma's special ids.

Whitespace runs, single punctuation marks and single digits are split off before the byte-level
step, so a word tokenises the same right after ``Response:\\n`` as mid-sentence (the default
byte-level regex glues the leading space on, which hurt PT-to-IT transfer), and numbers are
spelled digit by digit, which the tiny model needs to learn arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
SPECIALS = (PAD, EOS, BOS, UNK)  # ids 0, 1, 2, 3 in this order, as in Gemma
PAD_ID, EOS_ID, BOS_ID, UNK_ID = range(4)
_SPLIT = Regex(r"\s+|\d|[^\w\s]|_")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the BPE on ``texts``; the post-processor prepends BOS when special tokens are on."""
    if vocab_size < len(SPECIALS) + 256:
        raise ValueError(f"vocab_size {vocab_size} is below the 260 ids that specials and bytes need")
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(_SPLIT, behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left",  # batched generate needs left padding
    )
