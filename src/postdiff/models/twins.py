"""Tiny PT/IT twins of the tested families (:mod:`postdiff.models.families`), built offline in well under a second.

A twin is its family's real model class, built from the family's transformers config class with
the family's layout (tied or untied head, soft-caps, sliding window; norm placement and q/k norms
come with the class), saved in the family's checkpoint dtype with a byte-level tokenizer that
carries the family's special tokens, per-role BOS (named, added on encoding or not, opening IT's chat
template or not) and per-role EOS, and generation configs that
stop where the real ones do. Token ids are the twin's own (a 256-byte vocabulary plus the
specials, placed first or last as in the real vocabulary), not the real checkpoints' ids.

IT is PT with two known edits: seeded noise on the MLP down-projection of block
:data:`EDITED_LAYER` (so blocks before it compute the same outputs in both models, and every later
block differs), and its unembedding row of the family's turn-end token moved towards PT's mean
final hidden state, far enough that the token wins greedy decoding at about :data:`STOP_SHARE` of
positions: IT ends answers with it (``<|eot_id|>``, ``<|im_end|>``, ``<end_of_turn>``, ...) while
PT rambles.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from postdiff.models.families import FAMILIES, Family
from postdiff.models.template import encode_prefixes

N_LAYERS = 4
EDITED_LAYER = 1
NOISE = 0.5  # relative to the down-projection's own scale: a clear PT-to-IT gap
STOP_SHARE = 0.3
ANSWER_TOKENS = 8  # greedy tokens per SAMPLE prompt whose positions size the turn-end edit
NORM_SPREAD = 0.3
SEED = 0
# Prompts whose positions set the turn-end edit's size (any text works; these look like the suite's).
SAMPLE = ("What is the capital of Norway?", "Add 12 and 30.", "Answer in upper case: the colour of snow.")
CHAT_BODY = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def _bytes() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tokenizer(family: Family, role: str):
    """A byte-level tokenizer with the family's specials and ``role``'s BOS, EOS and BOS behaviour:
    the BOS it names, whether encoding adds it, and (IT only) a chat template that opens with
    ``{{ bos_token }}`` where the real one does. The template is a stand-in that renders only the
    messages' text; what the workflow reads of it is how it opens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pieces = [*family.specials, *_bytes()] if family.specials_first else [*_bytes(), *family.specials]
    vocab = {t: i for i, t in enumerate(pieces)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    bos = family.bos[role]
    if family.adds_bos:
        tk.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    named = {"bos_token": bos, "eos_token": family.eos[role], "pad_token": family.pad, "unk_token": family.unk}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **{k: v for k, v in named.items() if v is not None})
    tok.add_special_tokens({"additional_special_tokens": [t for t in family.specials if t not in named.values()]})
    if role == "it":
        tok.chat_template = ("{{ bos_token }}" if family.chat_bos else "") + CHAT_BODY
    return tok


def rows(family: Family, n_ids: int) -> int:
    """Embedding rows: the tokenizer's ids, padded as the family pads its embedding."""
    return -(-n_ids // family.row_multiple) * family.row_multiple


def config(family: Family, tok):
    """The family's config class at twin size, with its layout and the tokenizer's special ids."""
    import transformers

    cls = getattr(transformers, family.config_class)
    return cls(
        vocab_size=rows(family, len(tok)),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.1,  # decisive logits, so greedy decoding is not a coin toss among ties
        tie_word_embeddings=family.tied,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **family.layout,
    )


def generation_config(family: Family, role: str, tok):
    """The role's real stop tokens; IT's asks for sampling, as real IT checkpoints do (ignored by
    the workflow's greedy decoding)."""
    from transformers import GenerationConfig

    stops = [tok.convert_tokens_to_ids(t) for t in family.stops[role]]
    sampling = dict(do_sample=True, temperature=0.6, top_p=0.9) if role == "it" else {}
    return GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=stops[0] if len(stops) == 1 else stops,
                            pad_token_id=tok.pad_token_id, **sampling)


def _answer_states(model: torch.nn.Module, prefix: list[int]) -> torch.Tensor:
    """Final hidden states at the answer positions of ``model``'s greedy continuation of ``prefix``."""
    ids = list(prefix)
    for _ in range(ANSWER_TOKENS):
        ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, len(prefix) - 1 :]


@torch.no_grad()
def turn_end_edit(model: torch.nn.Module, tok, turn_end: int) -> torch.Tensor:
    """The shift of the ``turn_end`` unembedding row that makes it the greedy choice at about
    :data:`STOP_SHARE` of ``model``'s answer positions on :data:`SAMPLE` (its greedy continuation
    of each prefix, from position ``m-1``): along their mean final hidden state. Prompt positions
    would not do: a tied twin repeats its last token once it answers, where they never look."""
    h = torch.cat([_answer_states(model, prefix) for prefix in encode_prefixes(tok, SAMPLE)]).float()
    unembed = model.get_output_embeddings().weight.float()
    logits = h @ unembed.T
    u = h.mean(0)
    u = u / u.norm()
    reach = h @ u
    # Shift c along u raises the turn-end logit by c * reach at each position.
    need = (logits.max(-1).values - logits[:, turn_end]) / reach
    c = float(torch.quantile(need[reach > 0], STOP_SHARE))
    return c * u


def models(family: Family, seed: int = SEED):
    """``(pt, it, tokenizers)``: the fp32 twins in eval mode, and each role's tokenizer."""
    import transformers

    toks = {role: tokenizer(family, role) for role in ("pt", "it")}
    cfg = config(family, toks["pt"])
    cls = getattr(transformers, family.architecture)
    torch.manual_seed(seed)
    pt = cls(cfg).eval()
    with torch.no_grad():
        # Norms start at scale 1 (w = 1, or Gemma's gamma = 0); a lens that skipped the final
        # norm's scale, or a hook that read after a norm, would go unnoticed.
        for name, param in pt.named_parameters():
            if "norm" in name:
                param.add_(NORM_SPREAD * torch.randn(param.shape))
    it = cls(cfg).eval()
    it.load_state_dict(pt.state_dict())
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        down = it.get_decoder().layers[EDITED_LAYER].mlp.down_proj.weight
        down.add_(NOISE * down.std() * torch.randn(down.shape, generator=g))
        turn_end = toks["it"].convert_tokens_to_ids(family.turn_end)
        it.get_output_embeddings().weight[turn_end] += turn_end_edit(it, toks["it"], turn_end).to(down.dtype)
    return pt, it, toks


def build(family: Family, root: Path, seed: int = SEED) -> dict[str, Path]:
    """Save the twin pair under ``root/<family>/{pt,it}``; the two directories by role."""
    pt, it, toks = models(family, seed)
    dtype = getattr(torch, family.dtype)
    out = {}
    for role, model in (("pt", pt), ("it", it)):
        path = root / family.name / role
        model.generation_config = generation_config(family, role, toks[role])
        model.to(dtype).save_pretrained(path)
        toks[role].save_pretrained(path)
        out[role] = path
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory to write <family>/pt and <family>/it under")
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: every family")
    args = parser.parse_args(argv)
    for name in args.family or sorted(FAMILIES):
        for role, path in build(FAMILIES[name], args.root).items():
            print(f"{name} {role}: {path}")


if __name__ == "__main__":
    main()
