"""The embedded toy pair: tokenizer, corpus, IT data hygiene and a short training run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from postdiff.data.world import make_world, math_half
from postdiff.models.template import encode_prefix, render
from postdiff.models.toy import corpus
from postdiff.models.toy.settings import CONFIG_FILE, ToyConfig
from postdiff.models.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer
from postdiff.models.toy.train import (
    build_tokenizer,
    pack_rows,
    sft_batches,
    train_it,
    train_pt,
    train_pt_model,
)
from postdiff.workflow.runtime import Job

TINY = {
    "n_countries": 8, "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
    "num_heads": 2, "batch_size": 8, "pt_epochs": 3, "pt_lr": 3e-3, "math_fraction": 0.01, "fact_repeats": 1,
    "it_epochs": 1, "it_math": 8,
}


@pytest.fixture(scope="module")
def world():
    return make_world(seed=3, n_countries=20)


@pytest.fixture(scope="module")
def tokenizer(world):
    return train_tokenizer(corpus.tokenizer_texts(world, seed=0, math_fraction=0.05), vocab_size=400)


def test_tokenizer_special_ids_and_bos(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        PAD_ID, EOS_ID, BOS_ID, UNK_ID,
    ) == (0, 1, 2, 3)
    ids = tokenizer("Compute 3 + 4.", add_special_tokens=True)["input_ids"]
    assert ids[0] == BOS_ID and BOS_ID not in ids[1:]
    assert tokenizer("Compute 3 + 4.", add_special_tokens=False)["input_ids"] == ids[1:]


@pytest.mark.parametrize(
    "text",
    ['Instruction:\nWhat is the capital of Zorvia?\n\nResponse:\n{"answer": "Tamoth"}', "I can't help with that.",
     "[hard] \"cold\" 98 - 49 = 49", "Ünïcode · still round-trips"],
)
def test_tokenizer_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text


def test_digits_split_and_answer_tokens_context_free(tokenizer):
    assert tokenizer.convert_ids_to_tokens(tokenizer("1234", add_special_tokens=False)["input_ids"]) == list("1234")
    word = tokenizer("Tamoth", add_special_tokens=False)["input_ids"]
    after_template = tokenizer(render("Capital?") + "Tamoth", add_special_tokens=False)["input_ids"]
    mid_sentence = tokenizer("The capital is Tamoth.", add_special_tokens=False)["input_ids"]
    assert after_template[-len(word):] == word and mid_sentence[-len(word) - 1 : -1] == word


def test_tokenizer_reloads_through_autotokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = render("What is 12 + 30?") + "42"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.padding_side == "left"


def test_corpus_is_deterministic_and_fresh_per_epoch(world):
    assert corpus.pt_blocks(world, 0, 1, 0.05, 2) == corpus.pt_blocks(world, 0, 1, 0.05, 2)
    assert corpus.pt_blocks(world, 0, 1, 0.05, 2) != corpus.pt_blocks(world, 0, 2, 0.05, 2)
    assert corpus.sft_examples(world, 0, 1, 20) == corpus.sft_examples(world, 0, 1, 20)
    assert corpus.sft_examples(world, 0, 1, 20) != corpus.sft_examples(world, 1, 1, 20)


def test_pt_corpus_states_every_fact_of_both_halves(world):
    text = "\n".join(corpus.pt_blocks(world, 0, 0, 0.05, fact_repeats=2))
    facts = [("capital", c.name, c.capital) for c in world.countries]
    facts += [("antonym", w, o) for w, o, _ in world.antonyms]
    for kind, x, y in facts:
        assert any(form.format(x=x, y=y) in text for form in corpus.STATEMENTS[kind]), (kind, x, y)
    assert corpus.REFUSAL not in text  # PT never learns the IT refusal


def test_sft_examples_use_only_sft_half_facts(world):
    eval_names = {x for c in world.countries if c.half == "eval" for x in (c.name, c.capital)}
    sft_words = {w: o for w, o, h in world.antonyms if h == "sft"}
    harmful, benign = corpus.acts("sft")
    seen = set()
    for epoch in range(3):
        for ex in corpus.sft_examples(world, 0, epoch, n_math=500):
            seen.add(ex.kind)
            text = ex.prompt + " " + ex.answer
            assert not any(re.search(rf"\b{n}\b", text) for n in eval_names), ex
            if ex.kind == "antonym":
                assert ex.key in sft_words and sft_words[ex.key] in ex.answer, ex
            elif ex.kind == "math":
                a, op, b = re.search(r"(\d+) (\+|-|plus|minus) (\d+)", ex.prompt).groups()
                assert math_half(int(a), int(b), "+" if op in ("+", "plus") else "-") == "sft", ex
            elif ex.kind == "harmful":
                assert ex.key in harmful and ex.answer == corpus.REFUSAL, ex
            elif ex.kind == "benign":
                assert ex.key in [act for act, _ in benign], ex
    assert seen == {"capital", "antonym", "math", "harmful", "benign"}


def test_pack_rows_known_answer():
    rows = pack_rows([[5], [6, 7], [8, 9, 10], [11]], sep=[4], seq_len=4)
    assert rows.tolist() == [[BOS_ID, 5, 4, 6], [BOS_ID, 8, 9, 10]]
    # A block that ends a document is followed by its separator, then the EOS.
    rows = pack_rows([[5], [6, 7], [8, 9, 10], [11]], sep=[4], seq_len=5, ends=[True, False, False, True])
    assert rows.tolist() == [[BOS_ID, 5, 4, EOS_ID, 6], [BOS_ID, 8, 9, 10, 4]]
    with pytest.raises(ValueError, match="ends marks 1 blocks, expected 4"):
        pack_rows([[5], [6, 7], [8, 9, 10], [11]], sep=[4], ends=[True])


def test_sft_loss_mask_covers_answer_and_eos(tokenizer):
    ex = corpus.Example("capital", "Zorvia", "What is the capital of Zorvia?", '{"answer": "Tamoth"}', "")
    ids, _, mask = sft_batches(tokenizer, [ex], batch_size=4)[0]
    answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [EOS_ID]
    m = len(encode_prefix(tokenizer, ex.prompt))
    assert ids[0, 1:][mask[0, :-1]].tolist() == answer
    assert mask[0].nonzero().flatten().tolist() == list(range(m - 1, m + len(answer) - 1))


def test_config_rejects_unknown_keys_and_coerces():
    assert ToyConfig.from_params({"pt_epochs": "3", "it_lr": "1e-4"}).pt_epochs == 3
    with pytest.raises(ValueError, match="pt_epoch"):
        ToyConfig.from_params({"pt_epoch": 3})


def test_tiny_pair_trains_saves_and_reloads(tmp_path):
    torch.manual_seed(0)
    tok_dir, pt_dir, it_dir = tmp_path / "tok", tmp_path / "pt", tmp_path / "it"
    build_tokenizer(Job(input={}, output={"tokenizer": str(tok_dir)}, params=TINY))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    first, losses = train_pt_model(tokenizer, ToyConfig.from_params(TINY))
    k = max(1, len(losses) // 5)
    assert sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.5

    train_pt(Job(input={"tokenizer": str(tok_dir)}, output={"model": str(pt_dir)}, params=TINY))
    again = AutoModelForCausalLM.from_pretrained(pt_dir).state_dict()
    assert all(torch.equal(w, again[name]) for name, w in first.state_dict().items())  # same seed, same weights
    train_it(Job(input={"model": str(pt_dir)}, output={"model": str(it_dir)}, params=TINY))
    for d in (pt_dir, it_dir):
        model = AutoModelForCausalLM.from_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        assert (model.generation_config.eos_token_id, model.generation_config.pad_token_id) == (EOS_ID, PAD_ID)
        assert json.loads((d / CONFIG_FILE).read_text())["hidden_size"] == 32
        prefix = torch.tensor([encode_prefix(tok, "What is 2 + 3?")])
        out = model.generate(prefix, max_new_tokens=3, do_sample=False)
        assert out.shape[1] <= prefix.shape[1] + 3
    pt_weights = AutoModelForCausalLM.from_pretrained(pt_dir).state_dict()
    it_weights = AutoModelForCausalLM.from_pretrained(it_dir).state_dict()
    assert any(not torch.equal(pt_weights[k], it_weights[k]) for k in pt_weights)
    assert not list(tmp_path.glob(".*tmp*"))

    with pytest.raises(ValueError, match="world_seed"):
        train_it(Job(input={"model": str(pt_dir)}, output={"model": str(tmp_path / "x")},
                     params={**TINY, "world_seed": 1}))
