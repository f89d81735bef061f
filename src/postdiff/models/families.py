"""The PT/IT families the workflow is tested on, and what each one's real checkpoints look like.

The facts here are those of the hub checkpoints that ``config/pairs/`` names: the model class,
depth, tied or untied head, weight dtype, and the tokenizer's BOS and stop behaviour. The twins
(:mod:`postdiff.models.twins`) are built from them, preflight names the family of a configured pair
and refuses one whose tokenizer opens prefixes otherwise than :attr:`Family.prefix` says, and a test
checks that each ``config/pairs/`` file puts its layers where :func:`paper_layers` does.

Sources. No hub is reachable from where this was written, so each fact is marked by where it
comes from: *config* (the published ``config.json`` / ``tokenizer_config.json`` / chat template,
as quoted in ``FIELD-NOTES.md`` (2026-12-05) or in a verbatim copy in a public repository), or
*unverified* (the workflow's earlier reading, not checked against a published file). Preflight's
prefix check and pair_info's stop set read the real files at run time, so an unverified token
fact that is wrong stops the first run with one line instead of running off distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One PT/IT family. Token fields are token strings; ``specials`` are in id order.

    ``bos`` is the BOS token each role's tokenizer names (``bos_token``; None: it names none, as
    Qwen's). ``adds_bos``: encoding adds it (``add_bos_token`` or a post-processor); OLMo 2 and
    SmolLM2 name one and never add it. ``chat_bos``: IT's chat template opens with
    ``{{ bos_token }}``. ``prefix`` is what every prefix must start with, the rule
    :func:`postdiff.models.template.prefix_bos` derives from the IT tokenizer: its BOS when it adds
    it or its template opens with it (OLMo 2: we add it), else nothing (SmolLM2). ``eos`` is each
    role's tokenizer EOS, ``stops`` each role's generation-config ``eos_token_id``. ``turn_end`` is
    the token IT ends an answer with.
    ``specials_first``: the special tokens take the lowest ids (Gemma, SmolLM2, Mistral) rather
    than following the regular vocabulary (Llama 3, Qwen, OLMo 2). ``row_multiple``: the
    embedding is padded to a multiple of it, beyond the tokenizer's ids (1: no padding).
    """

    name: str
    config_class: str
    architecture: str
    pt: str
    it: str
    n_layers: int
    tied: bool
    dtype: str
    specials: tuple[str, ...]
    bos: dict[str, str | None]
    adds_bos: bool
    chat_bos: bool
    prefix: str | None
    eos: dict[str, str]
    stops: dict[str, tuple[str, ...]]
    turn_end: str
    pad: str | None = None
    unk: str | None = None
    specials_first: bool = False
    row_multiple: int = 1
    # Config keys that give the twin the family's layout (soft-caps, sliding window, ...).
    layout: dict[str, Any] = field(default_factory=dict)


_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_EOS = {"pt": "<|endoftext|>", "it": "<|im_end|>"}
_QWEN_STOPS = {"pt": ("<|endoftext|>",), "it": ("<|im_end|>", "<|endoftext|>")}
_NO_BOS = {"pt": None, "it": None}

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # Tied head: config (config.json `tie_word_embeddings: true` at 1B and 3B, FIELD-NOTES;
        # verbatim copy of the 1B Instruct config.json in kevinstephano/thunder_model_blocks,
        # hf_llama/llama_config.py; 8B's is untied). BOS <|begin_of_text|> named and added, and
        # the chat template opens with it: config (FIELD-NOTES). Stops: unverified.
        Family(
            "llama3", "LlamaConfig", "LlamaForCausalLM", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct",
            n_layers=16, tied=True, dtype="bfloat16",
            specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
            bos={"pt": "<|begin_of_text|>", "it": "<|begin_of_text|>"}, adds_bos=True, chat_bos=True,
            prefix="<|begin_of_text|>", eos={"pt": "<|end_of_text|>", "it": "<|eot_id|>"},
            stops={"pt": ("<|end_of_text|>",), "it": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")},
            turn_end="<|eot_id|>",
        ),
        # No BOS token at all (config, FIELD-NOTES); q/k/v biases; embedding rows beyond the
        # tokenizer. Stops, pad and the row padding: unverified.
        Family(
            "qwen2.5", "Qwen2Config", "Qwen2ForCausalLM", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct",
            n_layers=28, tied=True, dtype="bfloat16", specials=_QWEN_SPECIALS, bos=_NO_BOS, adds_bos=False,
            chat_bos=False, prefix=None, eos=_QWEN_EOS, stops=_QWEN_STOPS, turn_end="<|im_end|>", pad="<|endoftext|>",
            row_multiple=64,
        ),
        # Qwen 2.5's tokens, plus q/k RMS norms in attention. No BOS: config (FIELD-NOTES); the rest unverified.
        Family(
            "qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B",
            n_layers=28, tied=True, dtype="bfloat16", specials=(*_QWEN_SPECIALS, "<think>", "</think>"), bos=_NO_BOS,
            adds_bos=False, chat_bos=False, prefix=None, eos=_QWEN_EOS, stops=_QWEN_STOPS, turn_end="<|im_end|>",
            pad="<|endoftext|>", row_multiple=64,
        ),
        # Post-norm blocks (norms after attention and after the MLP); q/k norms. GPT-2 style
        # tokenizer: bos_token <|endoftext|>, add_bos_token false, and the Instruct chat template
        # and training put <|endoftext|> first, so our prefixes add it: config (FIELD-NOTES).
        # Whether the base tokenizer ships a chat template, pad <|pad|>, fp32 weights and the stops:
        # unverified (the issue could not confirm the dtype from a published config).
        Family(
            "olmo2", "Olmo2Config", "Olmo2ForCausalLM", "allenai/OLMo-2-0425-1B", "allenai/OLMo-2-0425-1B-Instruct",
            n_layers=16, tied=False, dtype="float32", specials=("<|endoftext|>", "<|pad|>"),
            bos={"pt": "<|endoftext|>", "it": "<|endoftext|>"}, adds_bos=False, chat_bos=True, prefix="<|endoftext|>",
            eos={"pt": "<|endoftext|>", "it": "<|endoftext|>"},
            stops={"pt": ("<|endoftext|>",), "it": ("<|endoftext|>",)}, turn_end="<|endoftext|>", pad="<|pad|>",
            row_multiple=64,
        ),
        # Attention and final-logit soft-capping (eager attention); sandwich norms; (1 + w) RMS
        # norms. <end_of_turn> is id 107: config (FIELD-NOTES). <bos> added and opening the chat
        # template, fp32 weights: unverified (the dtype could not be confirmed from a published config).
        Family(
            "gemma2", "Gemma2Config", "Gemma2ForCausalLM", "google/gemma-2-2b", "google/gemma-2-2b-it",
            n_layers=26, tied=True, dtype="float32",
            specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos={"pt": "<bos>", "it": "<bos>"}, adds_bos=True, chat_bos=True, prefix="<bos>",
            eos={"pt": "<eos>", "it": "<eos>"}, stops={"pt": ("<eos>",), "it": ("<eos>", "<end_of_turn>")},
            turn_end="<end_of_turn>", pad="<pad>", unk="<unk>", specials_first=True,
            # The real caps are 50 and 30; the twin's logits are near 1, so its caps are too, or
            # tanh would leave them unchanged and a lens without the final cap would pass.
            layout={"attn_logit_softcapping": 1.0, "final_logit_softcapping": 1.0, "sliding_window": 8},
        ),
        # Sliding-window attention (v0.1's; v0.3 has none): the twin's window is shorter than its
        # prompts. <s> added and opening the chat template, bf16, stops: unverified.
        Family(
            "mistral", "MistralConfig", "MistralForCausalLM", "mistralai/Mistral-7B-v0.3",
            "mistralai/Mistral-7B-Instruct-v0.3", n_layers=32, tied=False, dtype="bfloat16",
            specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos={"pt": "<s>", "it": "<s>"}, adds_bos=True,
            chat_bos=True, prefix="<s>", eos={"pt": "</s>", "it": "</s>"},
            stops={"pt": ("</s>",), "it": ("</s>",)}, turn_end="</s>", unk="<unk>", specials_first=True,
            layout={"sliding_window": 8},
        ),
        # Llama architecture with ChatML tokens. The base tokenizer names <|endoftext|> as BOS,
        # the Instruct one <|im_start|>; neither adds it: config (FIELD-NOTES). The Instruct
        # template opens with "<|im_start|>system" as text, not with bos_token, so the prefix takes
        # no BOS: unverified (seen only in third-party copies of the rendered template). PT and IT
        # tokenizers name different EOS tokens; stops unverified.
        Family(
            "smollm2", "LlamaConfig", "LlamaForCausalLM", "HuggingFaceTB/SmolLM2-1.7B",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct", n_layers=24, tied=True, dtype="bfloat16",
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            bos={"pt": "<|endoftext|>", "it": "<|im_start|>"}, adds_bos=False, chat_bos=False, prefix=None,
            eos={"pt": "<|endoftext|>", "it": "<|im_end|>"}, stops={"pt": ("<|endoftext|>",), "it": ("<|im_end|>",)},
            turn_end="<|im_end|>", specials_first=True,
        ),
    )
}

# Beyond the families above, the Gemma 3 pairs the workflow was built on (embedded, rehearsal, 4B).
GEMMA3_ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
TESTED_ARCHITECTURES = frozenset({f.architecture for f in FAMILIES.values()} | set(GEMMA3_ARCHITECTURES))

# Gemma 3 4B: layers 17 and 29 of 34 (config/gemma3-4b.yaml), i.e. half and ~0.85 of the depth.
MID, LATE = 0.5, 0.85


def paper_layers(n_layers: int) -> list[int]:
    """The paper's mid and late layer for a model with ``n_layers`` decoder blocks."""
    return [int(n_layers * MID), round(n_layers * LATE)]


def family_of(pt: str, it: str) -> Family | None:
    """The family whose hub ids are ``pt`` and ``it``, if any."""
    return next((f for f in FAMILIES.values() if (f.pt, f.it) == (pt, it)), None)
