from types import SimpleNamespace

import pytest
import torch
from test_models import SMALL, multimodal_gemma3
from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM

from postdiff.models.forward import answer_logprobs
from postdiff.models.generation import cut_at_eos, generate, stop_ids
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import gemma3_text_config

V, D, EOS, NEW = 64, 32, 1, 10
TOK = SimpleNamespace(pad_token_id=0, eos_token_id=EOS)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Gemma3ForCausalLM(gemma3_text_config(V, D, 3, num_heads=2, num_kv_heads=1, sliding_window=8)).eval()


@pytest.fixture(scope="module")
def prefixes():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, V, (m,), generator=g).tolist() for m in (5, 11, 3, 8)]


def edit(alpha, seed=3) -> dict[int, LayerEdit]:
    W = 0.5 * torch.randn(D, D, generator=torch.Generator().manual_seed(seed))
    return {1: LayerEdit(alpha, lambda h: h @ W)}


@pytest.fixture(scope="module")
def plain(model, prefixes):
    return generate(model, TOK, prefixes, NEW, batch_size=3)


@pytest.fixture(scope="module")
def edited(model, prefixes):
    return generate(model, TOK, prefixes, NEW, batch_size=3, edits=edit(1.0))


def test_cut_at_eos():
    assert cut_at_eos([5, 1, 0, 0], [1]) == ([5, 1], True)
    assert cut_at_eos([0, 5, 7], [1, 7]) == ([0, 5, 7], True)
    assert cut_at_eos([0, 5, 6], [1]) == ([0, 5, 6], False)


def test_stop_ids_join_tokenizer_and_generation_config(model):
    model.generation_config.eos_token_id = [EOS, 60]
    try:
        assert stop_ids(model, TOK) == [EOS, 60]
    finally:
        model.generation_config.eos_token_id = EOS


def test_left_padded_batch_rows_equal_unbatched(model, prefixes, plain):
    assert plain == [generate(model, TOK, [p], NEW, batch_size=1)[0] for p in prefixes]
    for ids, eos in plain:
        assert eos == (ids[-1] == EOS) and EOS not in ids[:-1]
        assert len(ids) == NEW or eos


def test_min_new_tokens_forces_the_length(model, prefixes):
    out = generate(model, TOK, prefixes, 6, batch_size=4, min_new_tokens=6)
    assert [len(ids) for ids, _ in out] == [6] * 4


def test_alpha_zero_is_token_identical(model, prefixes, plain):
    assert generate(model, TOK, prefixes, NEW, batch_size=3, edits=edit(0.0)) == plain


def test_edit_changes_output_and_kv_cache_agrees_with_full_recompute(model, prefixes, plain, edited):
    assert edited != plain
    assert generate(model, TOK, prefixes, NEW, batch_size=3, edits=edit(1.0), use_cache=False) == edited


def test_generation_agrees_with_teacher_forced_pass_under_the_edit(model, prefixes, edited):
    """Greedy tokens are the argmax of the same edit applied teacher-forced at m-1 .. m+n-2."""
    rows = list(zip(prefixes, [ids for ids, _ in edited]))
    for i, lp in answer_logprobs(model, rows, batch_size=4, edits=edit(1.0)):
        assert lp.argmax(-1).tolist() == rows[i][1]


@pytest.mark.parametrize(
    "build",
    [lambda: LlamaForCausalLM(LlamaConfig(**SMALL)), lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=16)),
     multimodal_gemma3],
    ids=["llama", "gemma2", "gemma3-multimodal"],
)
def test_position_logic_holds_for_other_architectures(build, prefixes):
    torch.manual_seed(4)
    other = build().eval()
    cached = generate(other, TOK, prefixes, 6, batch_size=4, edits=edit(1.0))
    assert cached != generate(other, TOK, prefixes, 6, batch_size=4)
    assert cached == generate(other, TOK, prefixes, 6, batch_size=4, edits=edit(1.0), use_cache=False)
    rows = list(zip(prefixes, [ids for ids, _ in cached]))
    for i, lp in answer_logprobs(other, rows, batch_size=4, edits=edit(1.0)):
        assert lp.argmax(-1).tolist() == rows[i][1]


def test_per_row_edits_from_a_factory(model, prefixes, plain, edited):
    seen = []

    def factory(idx):
        seen.append(list(idx))
        return edit(torch.tensor([float(i % 2) for i in idx]))

    mixed = generate(model, TOK, prefixes, NEW, batch_size=3, edit_factory=factory)
    assert sorted(i for batch in seen for i in batch) == list(range(len(prefixes)))
    assert mixed == [edited[i] if i % 2 else plain[i] for i in range(len(prefixes))]


def test_bad_arguments(model, prefixes):
    with pytest.raises(ValueError, match="not both"):
        generate(model, TOK, prefixes, NEW, 2, edits=edit(1.0), edit_factory=lambda idx: {})
    with pytest.raises(ValueError, match="prefix 1 is empty"):
        generate(model, TOK, [[3], []], NEW, 2)
