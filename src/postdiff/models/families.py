"""The PT/IT families the workflow is tested on, and what each one's real checkpoints look like.

The facts here are those of the hub checkpoints that ``config/pairs/`` names: the model class,
depth, tied or untied head, weight dtype, and the tokenizer's BOS and stop behaviour. The twins
(:mod:`postdiff.models.twins`) are built from them, preflight names the family of a configured pair, and
a test checks that each ``config/pairs/`` file puts its layers where :func:`paper_layers` does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Family:
    """One PT/IT family. Token fields are token strings; ``specials`` are in id order.

    ``bos`` is the BOS token the tokenizer adds to every encoding (None: none is added, as for
    Qwen, OLMo 2 and SmolLM2). ``eos`` is each role's tokenizer EOS, ``stops`` each role's
    generation-config ``eos_token_id``. ``turn_end`` is the token IT ends an answer with.
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
    bos: str | None
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

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The twin's head is untied, as at 8B (Llama 3.2 1B/3B tie theirs; SmolLM2 is a tied Llama).
        Family(
            "llama3", "LlamaConfig", "LlamaForCausalLM", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-1B-Instruct",
            n_layers=16, tied=False, dtype="bfloat16",
            specials=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
            bos="<|begin_of_text|>", eos={"pt": "<|end_of_text|>", "it": "<|eot_id|>"},
            stops={"pt": ("<|end_of_text|>",), "it": ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")},
            turn_end="<|eot_id|>",
        ),
        # No BOS token at all; q/k/v biases; embedding rows beyond the tokenizer.
        Family(
            "qwen2.5", "Qwen2Config", "Qwen2ForCausalLM", "Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-1.5B-Instruct",
            n_layers=28, tied=True, dtype="bfloat16", specials=_QWEN_SPECIALS, bos=None, eos=_QWEN_EOS,
            stops=_QWEN_STOPS, turn_end="<|im_end|>", pad="<|endoftext|>", row_multiple=64,
        ),
        # Qwen 2.5's tokens, plus q/k RMS norms in attention.
        Family(
            "qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen/Qwen3-1.7B-Base", "Qwen/Qwen3-1.7B",
            n_layers=28, tied=True, dtype="bfloat16", specials=(*_QWEN_SPECIALS, "<think>", "</think>"), bos=None,
            eos=_QWEN_EOS, stops=_QWEN_STOPS, turn_end="<|im_end|>", pad="<|endoftext|>", row_multiple=64,
        ),
        # Post-norm blocks (norms after attention and after the MLP); q/k norms.
        Family(
            "olmo2", "Olmo2Config", "Olmo2ForCausalLM", "allenai/OLMo-2-0425-1B", "allenai/OLMo-2-0425-1B-Instruct",
            n_layers=16, tied=False, dtype="float32", specials=("<|endoftext|>", "<|pad|>"),
            bos=None, eos={"pt": "<|endoftext|>", "it": "<|endoftext|>"},
            stops={"pt": ("<|endoftext|>",), "it": ("<|endoftext|>",)}, turn_end="<|endoftext|>", pad="<|pad|>",
            row_multiple=64,
        ),
        # Attention and final-logit soft-capping (eager attention); sandwich norms; (1 + w) RMS norms.
        Family(
            "gemma2", "Gemma2Config", "Gemma2ForCausalLM", "google/gemma-2-2b", "google/gemma-2-2b-it",
            n_layers=26, tied=True, dtype="float32",
            specials=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
            bos="<bos>", eos={"pt": "<eos>", "it": "<eos>"}, stops={"pt": ("<eos>",), "it": ("<eos>", "<end_of_turn>")},
            turn_end="<end_of_turn>", pad="<pad>", unk="<unk>", specials_first=True,
            # The real caps are 50 and 30; the twin's logits are near 1, so its caps are too, or
            # tanh would leave them unchanged and a lens without the final cap would pass.
            layout={"attn_logit_softcapping": 1.0, "final_logit_softcapping": 1.0, "sliding_window": 8},
        ),
        # Sliding-window attention (v0.1's; v0.3 has none): the twin's window is shorter than its prompts.
        Family(
            "mistral", "MistralConfig", "MistralForCausalLM", "mistralai/Mistral-7B-v0.3",
            "mistralai/Mistral-7B-Instruct-v0.3", n_layers=32, tied=False, dtype="bfloat16",
            specials=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), bos="<s>", eos={"pt": "</s>", "it": "</s>"},
            stops={"pt": ("</s>",), "it": ("</s>",)}, turn_end="</s>", unk="<unk>", specials_first=True,
            layout={"sliding_window": 8},
        ),
        # Llama architecture with ChatML tokens; PT and IT tokenizers name different EOS tokens.
        Family(
            "smollm2", "LlamaConfig", "LlamaForCausalLM", "HuggingFaceTB/SmolLM2-1.7B",
            "HuggingFaceTB/SmolLM2-1.7B-Instruct", n_layers=24, tied=True, dtype="bfloat16",
            specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), bos=None,
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
