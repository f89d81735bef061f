"""The intervention hook and the teacher-forced passes built on it (postdiff.models.hook, postdiff.models.forward)."""

import math

import pytest
import torch
from transformers import Gemma3ForCausalLM

from postdiff.models.forward import (
    BlockCache,
    answer_kl,
    answer_logprobs,
    block_outputs,
    length_sorted_batches,
    reference_logprobs,
    variant_kl,
)
from postdiff.models.hook import LayerEdit, intervene
from postdiff.models.loading import gemma3_text_config
from postdiff.models.template import teacher_forced_batch

V, D, L = 64, 32, 3


def tiny(seed: int) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(gemma3_text_config(V, D, L, num_heads=2, num_kv_heads=1, sliding_window=8)).eval()


@pytest.fixture(scope="module")
def pt():
    return tiny(0)


@pytest.fixture(scope="module")
def it():
    return tiny(1)


@pytest.fixture(scope="module")
def rows():
    g = torch.Generator().manual_seed(2)
    sizes = [(5, 4), (9, 2), (3, 7), (12, 5), (7, 1)]  # longer than the sliding window
    return [(torch.randint(3, V, (m,), generator=g).tolist(), torch.randint(1, V, (n,), generator=g).tolist())
            for m, n in sizes]


@pytest.fixture(scope="module")
def batch(rows):
    return teacher_forced_batch([p for p, _ in rows], [a for _, a in rows], pad_id=0)


def linear_edit(alpha, seed=3) -> LayerEdit:
    W = torch.randn(D, D, generator=torch.Generator().manual_seed(seed))
    return LayerEdit(alpha, lambda h: h @ W)


def hook_ids(model) -> list[list[int]]:
    # transformers adds its own persistent hooks once output_hidden_states is used
    return [list(layer._forward_hooks) for layer in model.model.layers]


def logits(model, batch, edits=None, mask=None):
    ids, attn, ans = batch
    with torch.no_grad(), intervene(model, edits or {}, ans if mask is None else mask):
        return model(input_ids=ids, attention_mask=attn).logits


def test_alpha_zero_and_zero_delta_reproduce_pt_exactly(pt, batch):
    plain = logits(pt, batch)
    assert torch.equal(logits(pt, batch, {1: linear_edit(0.0)}), plain)
    assert torch.equal(logits(pt, batch, {0: LayerEdit(1.0, torch.zeros_like), 2: LayerEdit(2.0, torch.zeros_like)}), plain)
    # Negative control: alpha = 1 moves the logits by up to 0.52 (measured), far above 1e-2.
    assert not torch.allclose(logits(pt, batch, {1: linear_edit(1.0)}), plain, atol=1e-2)


def test_positions_before_m_minus_1_are_untouched(pt, batch, rows):
    plain = logits(pt, batch)
    edited = logits(pt, batch, {0: linear_edit(1.0), 2: linear_edit(0.5, seed=4)})
    for i, (prefix, answer) in enumerate(rows):
        m = len(prefix)
        assert torch.equal(edited[i, : m - 1], plain[i, : m - 1])
        # Negative control: position m-1 of every row moves by up to 0.55 (measured), far above 1e-3.
        assert not torch.allclose(edited[i, m - 1], plain[i, m - 1], atol=1e-3)


def test_edit_at_last_block_matches_hand_computation(pt, batch):
    ids, attn, ans = batch
    c = torch.randn(D, generator=torch.Generator().manual_seed(5))
    h = block_outputs(pt, ids, attn, [L - 1])[L - 1]
    h_edit = torch.where(ans[..., None], h + 0.7 * c, h)
    with torch.no_grad():
        expected = pt.lm_head(pt.model.norm(h_edit))
    got = logits(pt, batch, {L - 1: LayerEdit(0.7, lambda x: c.expand_as(x))})
    # Exact: the hook's h + 0.7 * c and the head run the same ops on the same shapes as above.
    assert torch.equal(got, expected)


def test_per_row_alpha_and_per_row_fn(pt, batch):
    plain = logits(pt, batch)
    alone = logits(pt, batch, {1: linear_edit(1.0)})
    alpha = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    mixed = logits(pt, batch, {1: linear_edit(alpha)})
    row_mask = torch.tensor([False, True, False, True, True])[:, None, None]
    W = torch.randn(D, D, generator=torch.Generator().manual_seed(3))
    per_row_fn = logits(pt, batch, {1: LayerEdit(1.0, lambda h: torch.where(row_mask, 0.0, h @ W))})
    for i in range(5):
        assert torch.equal(mixed[i], (alone if alpha[i] else plain)[i])
        # Exact: a zero delta adds 0.0 and the other rows compute h @ W in the same batch.
        assert torch.equal(per_row_fn[i], (plain if row_mask[i] else alone)[i])


def test_hooks_removed_even_when_forward_raises(pt, batch):
    plain = logits(pt, batch)
    before = hook_ids(pt)

    def boom(h):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        logits(pt, batch, {0: linear_edit(1.0), 1: LayerEdit(1.0, boom)})
    assert hook_ids(pt) == before
    assert torch.equal(logits(pt, batch), plain)


class TupleBlock(torch.nn.Module):
    """A block in the style of older archs: ``(hidden, extra)``."""

    def forward(self, h):
        return h * 2, "extra"


def test_tuple_block_outputs_are_edited_in_place_of_the_hidden_state():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([TupleBlock()])
    h = torch.ones(2, 3, 4)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    with intervene(model, {0: LayerEdit(torch.tensor([1.0, 3.0]), torch.ones_like)}, mask):
        out, extra = model.layers[0](h)
    assert extra == "extra"
    assert out[:, :, 0].tolist() == [[2, 3, 3], [2, 2, 5]]


def test_bad_edits_are_refused(pt, batch):
    ids, attn, ans = batch
    with pytest.raises(ValueError, match="layer 3"):
        logits(pt, batch, {3: linear_edit(1.0)})
    with pytest.raises(ValueError, match="answer_mask has shape"):
        logits(pt, batch, {1: linear_edit(1.0)}, mask=ans[:, :-1])
    with pytest.raises(ValueError, match=r"alpha has shape \(2,\)"):
        logits(pt, batch, {1: linear_edit(torch.ones(2))})
    with pytest.raises(ValueError, match="fn returned shape"):
        logits(pt, batch, {1: LayerEdit(1.0, lambda h: h[..., :4])})


def test_length_sorted_batches():
    assert length_sorted_batches([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError, match="batch_size"):
        length_sorted_batches([1], 0)


def test_answer_logprobs_batched_equal_unbatched(pt, rows):
    batched = dict(answer_logprobs(pt, rows, batch_size=3))
    assert sorted(batched) == list(range(len(rows)))
    for i, (prefix, answer) in enumerate(rows):
        (j, single), = answer_logprobs(pt, [rows[i]], batch_size=1)
        assert batched[i].shape == (len(answer), V)
        # Padding to another width reorders fp32 reductions: log-probs of size <= 4.5 moved by at
        # most 4.8e-7 (measured under default, avx2 and avx512); 1e-5 leaves a 20x margin.
        torch.testing.assert_close(batched[i], single, rtol=0, atol=1e-5)
        # fp32 exp and sum over V = 64: within 2.4e-7 of 1 (measured); the float32 default is 1e-5.
        torch.testing.assert_close(batched[i].exp().sum(-1), torch.ones(len(answer)))


def test_answer_logprobs_match_full_logits_at_answer_positions(pt, rows, batch):
    full = torch.log_softmax(logits(pt, batch), -1)
    for i, lp in answer_logprobs(pt, rows, batch_size=2):
        m, n = len(rows[i][0]), len(rows[i][1])
        # Batches of 2 against one batch of 5: reduction order again, at most 4.8e-7 (measured).
        torch.testing.assert_close(lp, full[i, m - 1 : m + n - 1], rtol=0, atol=1e-5)


def test_answer_kl_known_answer():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]]).log()
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]]).log()
    first = 0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75)
    got = answer_kl(p, q, counts=[2, 1])
    # fp32 logs against the float64 answer rounded to fp32: the float32 default (1.3e-6
    # relative) allows a few ulp; it came out exact under all three CPU capabilities.
    torch.testing.assert_close(got, torch.tensor([first / 2, math.log(2)]))
    torch.testing.assert_close(answer_kl(p, q), torch.tensor((first + math.log(2)) / 3))
    assert answer_kl(q, q, counts=[1, 2]).eq(0).all()


def test_variant_kl_shares_the_it_pass(pt, it, rows):
    it_lp = reference_logprobs(it, rows, batch_size=2)
    variants = {"it": None, "pt": None, "edited": {1: linear_edit(1.0)}}
    kl_it = variant_kl(it, rows, 2, {"it": None}, reference=it)["it"]
    assert kl_it.eq(0).all()
    by_model = variant_kl(pt, rows, 2, variants, reference=it)
    by_cache = variant_kl(pt, rows, 3, variants, reference=it_lp)
    # KLs of ~1.6e-2 are means of differences of fp32 log-probs (rounding ~5e-7 at size 4.5);
    # batches of 2 and 3 pad differently. Measured: at most 1.4e-7 apart here and below, under
    # default, avx2 and avx512; the bound 1e-6 + 1e-5 * KL is 8x that.
    for name in variants:
        torch.testing.assert_close(by_model[name], by_cache[name], rtol=1e-5, atol=1e-6)
    # Negative control: the edit moves the KLs by up to 3.6e-3, 26% of their size (measured).
    assert (by_model["pt"] > 0).all() and not torch.allclose(by_model["pt"], by_model["edited"])
    for i, row in enumerate(rows):
        (_, lp), = answer_logprobs(pt, [row], 1)
        torch.testing.assert_close(by_model["pt"][i].float(), answer_kl(it_lp[i], lp), rtol=1e-5, atol=1e-6)


def test_variant_kl_per_row_edits(pt, it, rows):
    calls = []

    def factory(idx):
        calls.append(list(idx))
        return {1: linear_edit(torch.tensor([1.0 if i % 2 else 0.0 for i in idx]))}

    kl = variant_kl(pt, rows, 2, {"rows": factory, "pt": None, "all": {1: linear_edit(1.0)}}, reference=it)
    assert sorted(i for c in calls for i in c) == list(range(len(rows)))
    for i in range(len(rows)):
        # Exact: alpha 0 adds 0 * delta = 0.0 and alpha 1 the same delta, in the same batches.
        assert torch.equal(kl["rows"][i], kl["all" if i % 2 else "pt"][i])


def block_calls(model, block: int) -> list[int]:
    calls: list[int] = []
    model.model.layers[block].register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("max_bytes", [2**30, 0])
def test_a_block_cache_gives_the_same_kl_and_runs_the_blocks_before_it_once_per_batch(it, rows, max_bytes):
    pt = tiny(0)  # its own copy: the hooks that count calls stay on it
    first, edited = block_calls(pt, 0), block_calls(pt, 1)
    variants = {"pt": None, "a": {1: linear_edit(0.5)}, "b": {1: linear_edit(1.0), 2: linear_edit(0.5, seed=4)},
                "late": {2: linear_edit(1.0)}}
    plain = variant_kl(pt, rows, 2, variants, reference=it)
    n_batches = len(length_sorted_batches([len(p) + len(a) for p, a in rows], 2))
    assert len(first) == len(edited) == len(variants) * n_batches
    first.clear()
    edited.clear()
    cache = BlockCache(pt, 1, max_bytes)
    cached = [variant_kl(pt, rows, 2, variants, reference=it, cache=cache) for _ in range(2)]
    for out in cached:
        for name in variants:
            assert torch.equal(out[name], plain[name]), name  # the same floats, not close ones
    passes = 2 * len(variants) * n_batches
    kept = max_bytes > 0
    assert len(first) == len(edited) == (n_batches if kept else passes)
    assert len(cache.outputs) == (n_batches if kept else 0)
    assert isinstance(pt.model.layers[0], type(tiny(0).model.layers[0]))  # the blocks are back
    with pytest.raises(ValueError, match=r"edits at layers \[0\] come before the cached block 1"):
        variant_kl(pt, rows, 2, {"early": {0: linear_edit(1.0)}}, reference=it, cache=cache)
    with pytest.raises(ValueError, match="another model"):
        variant_kl(it, rows, 2, variants, reference=it, cache=cache)


def test_block_outputs_read_block_outputs_and_skip_the_head(pt, batch):
    ids, attn, _ = batch
    before = hook_ids(pt)
    head_calls = []
    handle = pt.lm_head.register_forward_hook(lambda *a: head_calls.append(1))
    try:
        out = block_outputs(pt, ids, attn, [2, 0, 1])
    finally:
        handle.remove()
    assert list(out) == [2, 0, 1] and not head_calls
    assert hook_ids(pt) == before
    with torch.no_grad():
        hs = pt(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
    for layer in (0, 1):
        assert torch.equal(out[layer], hs[layer + 1])
    # Negative control: hidden_states[-1] has the final norm, up to 4.8 away (measured).
    assert not torch.allclose(out[2], hs[3], atol=1e-2)
    assert torch.equal(pt.model.norm(out[2]), hs[3])  # the same module on the same tensor
