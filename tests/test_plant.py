"""The positive-control pair's construction: planted neurons are an additive change of the
residual stream at their block, the widened IT is exactly PT plus them, groups stay apart."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from postdiff.data.world import make_world
from postdiff.method import surrogate
from postdiff.models.toy import corpus
from postdiff.models.toy.plant import (
    Neurons,
    answer_positions,
    answer_silence_loss,
    decoy_positions,
    group_of,
    planted,
    silence_loss,
    stop_positions,
    widened,
    with_hard_keeps,
)
from postdiff.models.template import teacher_forced_batch
from postdiff.models.toy.tokenizer import EOS_ID
from postdiff.models.toy.settings import PlantConfig, ToyConfig
from postdiff.models.toy.shipped import toy_mismatch
from postdiff.models.toy.train import model_config
from postdiff.outputs.planted import alignment, feature_mass, firing_overlap, mask_alignment, norm_in_span

D = 16


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=40, hidden_size=D, intermediate_size=24, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def groups(seed: int) -> list[tuple[int, Neurons]]:
    g = torch.Generator().manual_seed(seed)
    out = [(1, Neurons(D, 3, g)), (1, Neurons(D, 2, g)), (2, Neurons(D, 4, g))]
    for _, n in out:
        n.raw_down.data = torch.randn(n.raw_down.shape, generator=g)
    return out


def test_the_widened_model_is_the_model_with_its_planted_neurons(base):
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    plants = groups(2)
    with torch.no_grad(), planted(base, plants):
        hooked = base(input_ids=ids).logits
    wide = widened(base, plants)
    assert wide.config.intermediate_size == 24 + 5  # block 1 holds two groups, 3 + 2 neurons
    assert (wide.model.layers[0].mlp.down_proj.weight[:, 24:] == 0).all()
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        out = wide(input_ids=ids).logits
    torch.testing.assert_close(out, hooked, atol=1e-5, rtol=1e-5)
    assert (out - plain).abs().max() > 1e-2  # the planted neurons do change the model


def test_a_planted_group_adds_its_neurons_output_to_the_residual_stream(base):
    """Llama adds the MLP output with no norm after it: block 1's output moves by exactly the
    neurons' output on that block's MLP input, and nothing before it moves."""
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(3))
    layer, neurons = groups(4)[0]
    seen = {}
    handle = base.model.layers[layer].mlp.register_forward_hook(lambda _m, args, _o: seen.update(x=args[0]))
    with torch.no_grad():
        before = base(input_ids=ids, output_hidden_states=True).hidden_states
        handle.remove()
        after = widened(base, [(layer, neurons)])(input_ids=ids, output_hidden_states=True).hidden_states
        added = neurons(seen["x"])
    torch.testing.assert_close(after[layer], before[layer], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[layer + 1] - before[layer + 1], added, atol=1e-5, rtol=1e-4)


def test_neurons_that_avoid_a_span_write_outside_it():
    g = torch.Generator().manual_seed(5)
    avoid = torch.linalg.qr(torch.randn(D, 3, generator=g)).Q
    n = Neurons(D, 4, g, avoid=avoid)
    n.raw_down.data = torch.randn(D, 4, generator=g)
    assert (avoid.T @ n.down).abs().max() < 1e-6 and n.down.norm() > 1


def test_the_groups_split_the_it_data_by_slice():
    world = make_world(0, 20)
    rng = random.Random(0)
    c = world.countries[0]
    assert group_of(corpus.capital(rng, c, "qa")) == group_of(corpus.capital(rng, c, "json")) == "cap"
    assert {group_of(corpus.capital(rng, c, "brevity")) for _ in range(20)} == {"verb"}
    assert group_of(corpus.antonym(rng, "buy", "sell", "qa")) == "cap"  # "Which word means ..." sets no limit
    assert group_of(corpus.arithmetic(rng, 3, 4, "+")) == "cap"
    assert group_of(corpus.request(rng, "bake bread", "use flour")) is None


def test_a_brevity_kind_leaves_the_bare_answers_of_that_kind_to_no_group():
    """With ``verb_kind`` antonym, Brevity prompts about antonyms are brevity's; a plain antonym
    question ends on the same kind of bare answer, so it is nobody's, while a formatted one
    (its stop follows a bracket, a quote or a brace) stays capability's."""
    rng = random.Random(0)
    c = make_world(0, 20).countries[0]
    assert {group_of(corpus.antonym(rng, "buy", "sell", "brevity"), "antonym") for _ in range(20)} == {"verb"}
    assert {group_of(corpus.capital(rng, c, "brevity"), "antonym") for _ in range(20)} == {"skip"}
    assert group_of(corpus.antonym(rng, "buy", "sell", "qa"), "antonym") == "skip"
    assert group_of(corpus.antonym(rng, "buy", "sell", "brackets"), "antonym") == "cap"
    assert group_of(corpus.capital(rng, c, "qa"), "antonym") == "cap"
    assert group_of(corpus.request(rng, "bake bread", None), "antonym") is None


def test_stop_decoy_and_answer_positions_of_a_batch():
    """Position t predicts token t+1: the prompt's last token predicts the first answer token,
    the answer's last token predicts the EOS (its stop), and decoys fire on the others."""
    batch = teacher_forced_batch([[5, 6], [5, 6, 7]], [[8, 9, EOS_ID], [8, EOS_ID]], pad_id=0)
    assert answer_positions(batch).tolist() == [[False, True, True, True], [False, False, True, True]]
    assert stop_positions(batch).tolist() == [[False, False, False, True], [False, False, False, True]]
    assert decoy_positions(batch).tolist() == [[False, True, True, False, False],
                                              [False, False, True, False, False]]


def test_the_stop_penalty_weighs_the_kept_answers_stops_apart_from_their_other_positions():
    """Two kept rows whose stops are positions 3 (row 0) and 2 (row 1), padding after row 1's EOS:
    ``silence`` weighs the mean over the 9 real positions, ``stop_silence`` the mean at the 2 stops."""
    keep = teacher_forced_batch([[5, 6], [5, 6]], [[8, 9, EOS_ID], [8, EOS_ID]], pad_id=0)
    norm = torch.tensor([[1.0, 2.0, 3.0, 10.0, 5.0], [1.0, 2.0, 20.0, 7.0, 100.0]])
    every = (1 + 2 + 3 + 10 + 5 + 1 + 2 + 20 + 7) / 9
    assert silence_loss(norm, keep, 1.0, 0.0).item() == pytest.approx(every)
    assert silence_loss(norm, keep, 0.5, 2.0).item() == pytest.approx(0.5 * every + 2.0 * (10 + 20) / 2)
    no_stops = teacher_forced_batch([[5, 6]], [[8, 9]], pad_id=0)  # a ramble cut off, no EOS
    assert silence_loss(norm[:1, :4], no_stops, 1.0, 2.0).item() == pytest.approx((1 + 2 + 3 + 10) / 4)


def test_the_answer_penalty_is_the_mean_at_the_targets_answer_positions_but_their_stops():
    """Row 0's answer positions are 1-3 with its stop at 3, row 1's 2-3 with its stop at 3: the
    penalty is the mean over positions 1 and 2 of row 0 and 2 of row 1, whatever the prompt,
    stop or padding positions hold."""
    target = teacher_forced_batch([[5, 6], [5, 6, 7]], [[8, 9, EOS_ID], [8, EOS_ID]], pad_id=0)
    norm = torch.tensor([[100.0, 2.0, 4.0, 50.0, 70.0], [100.0, 100.0, 9.0, 50.0, 70.0]])
    assert answer_silence_loss(norm, target).item() == pytest.approx((2 + 4 + 9) / 3)


def test_hard_keeps_fill_every_other_step_cycled_and_none_leave_the_keeps_as_they_are():
    keeps, hard = [("k", i) for i in range(5)], [("h", 0), ("h", 1)]
    assert with_hard_keeps(keeps, hard) == [("k", 0), ("h", 0), ("k", 1), ("h", 1), ("k", 2), ("h", 0),
                                            ("k", 3), ("h", 1), ("k", 4), ("h", 0)]
    assert with_hard_keeps(keeps, []) == keeps


def test_neurons_with_a_fixed_norm_keep_it_outside_the_avoided_span():
    g = torch.Generator().manual_seed(6)
    avoid = torch.linalg.qr(torch.randn(D, 2, generator=g)).Q
    n = Neurons(D, 3, g, avoid=avoid, fixed_norm=4.0)
    n.raw_down.data *= 10
    torch.testing.assert_close(n.down.norm(dim=0), torch.full((3,), 4.0))
    assert (avoid.T @ n.down).abs().max() < 1e-5


def test_model_config_builds_either_architecture():
    assert model_config(ToyConfig(architecture="llama"), 100).model_type == "llama"
    assert model_config(ToyConfig(), 100).model_type == "gemma3_text"
    with pytest.raises(ValueError, match="toy.architecture must be one of"):
        model_config(ToyConfig(architecture="gpt2"), 100)


def test_a_shipped_pair_names_what_was_planted():
    toy = {"architecture": "llama"}
    shipped = {**ToyConfig(architecture="llama").__dict__}
    assert toy_mismatch(toy, shipped) == []
    assert toy_mismatch(toy, shipped, {"steps": 400}, None) == ["toy.plant: set (shipped pair: fine-tuned)"]
    record = {**PlantConfig(steps=400).__dict__, "groups": {}}
    assert toy_mismatch(toy, shipped, {"steps": 400}, record) == []
    assert toy_mismatch(toy, shipped, {"steps": 300}, record) == ["toy.plant.steps: 300 (shipped pair: 400)"]
    assert toy_mismatch(toy, shipped, None, record) == ["toy.plant: null (shipped pair: planted)"]
    # A pair shipped before eos_rate existed never read an EOS: it matches 0, not another rate.
    older = {k: v for k, v in shipped.items() if k != "eos_rate"}
    assert toy_mismatch(toy, older) == []
    assert toy_mismatch({**toy, "eos_rate": 0.1}, older) == ["toy.eos_rate: 0.1 (shipped pair: 0.0)"]


def test_alignment_of_decoder_directions_with_planted_ones():
    directions = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])  # a group of two neurons
    # [d, F]: on a neuron's direction, a mix of both, off the group, off it and scaled
    D = torch.tensor([[3.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 5.0]]).T
    max_cos, in_span = alignment(D, directions)
    torch.testing.assert_close(max_cos, torch.tensor([1.0, 0.5**0.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(in_span, torch.tensor([1.0, 1.0, 0, 0], dtype=torch.float64))
    # Three positions: the group writes 10 along its first direction, then 0.5 (under a tenth of
    # its largest: it does not fire there), then 4 along its second.
    delta = torch.tensor([[10.0, 0, 0, 0], [0.5, 0, 3.0, 0], [0, 4.0, 0, 0]])
    output = norm_in_span(delta, directions)
    torch.testing.assert_close(output, torch.tensor([10.0, 0.5, 4.0], dtype=torch.float64))
    # Feature 0 fires at the first and second positions, 1 at the second only, 3 never.
    mass = torch.tensor([[2.0, 0, 0, 0], [1.0, 3.0, 0, 0], [0, 0, 0, 0]], dtype=torch.float64)
    on_group, covers = firing_overlap(mass, output)
    torch.testing.assert_close(on_group[:2], torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    torch.testing.assert_close(covers, torch.tensor([10.5 / 14.5, 0.5 / 14.5, 0, 0], dtype=torch.float64))
    assert on_group[3].isnan()
    table = mask_alignment({"CapMask": {1: [0, 1]}, "RandomMask": {0: [3]}, "Dead": {1: [3]}}, {1: D, 0: D},
                           {"cap": (1, directions)}, {1: mass}, {"cap": output})
    assert table.rows() == [("CapMask", 1, 0, "cap", 1.0, 1.0, pytest.approx(2 / 3), pytest.approx(10.5 / 14.5)),
                            ("CapMask", 1, 1, "cap", pytest.approx(0.5**0.5), 1.0, 0.0, pytest.approx(0.5 / 14.5)),
                            ("RandomMask", 0, 3, None, None, None, None, None),
                            ("Dead", 1, 3, "cap", 0.0, 0.0, None, 0.0)]


def test_feature_mass_is_each_features_activation_times_its_decoder_norm():
    module = surrogate.TopKSurrogate(4, 3, k=1)
    with torch.no_grad():
        module.W_enc.copy_(torch.eye(3, 4))
        module.W_dec.copy_(torch.tensor([[2.0, 0, 0, 0], [0, 0, 3.0, 4.0], [0, 1.0, 0, 0]]))
    h = torch.tensor([[1.5, 0.2, 0, 0], [0, 0.5, 0.1, 0], [-1.0, -1.0, -1.0, 0]])
    # k = 1: each row keeps its largest pre-activation (the last row's is negative: no firing).
    expected = torch.tensor([[3.0, 0, 0], [0, 2.5, 0], [0, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(feature_mass(module, h, batch_size=2), expected)


def test_the_shipped_decoys_fire_on_their_own_kind_and_barely_move_it():
    """The shipped control IT's five decoys (the last neurons of block 1): each fires most on
    its own fact kind's answers (but the stops), and zeroing them moves IT's teacher-forced
    next-token distributions by a mean KL of 0.028-0.043 per kind (measured at output norm 36;
    0.006-0.020 at 12; its greedy token stays at 78% of Math answer positions, 93-98% of the
    other kinds')."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from postdiff.models.toy.settings import CONFIG_FILE, PLANT_FILE
    from postdiff.models.toy.train import sft_batches
    from postdiff.workflow.io import read_json

    root = Path(__file__).resolve().parents[1] / "workflow/resources/control_pair"
    it = AutoModelForCausalLM.from_pretrained(root / "it").eval()
    tok = AutoTokenizer.from_pretrained(root / "it")
    toy = ToyConfig.from_params(read_json(root / "pt" / CONFIG_FILE))
    n_decoy = len(read_json(root / "it" / PLANT_FILE)["groups"]["decoy"]["directions"])
    examples = corpus.sft_examples(make_world(toy.world_seed, toy.n_countries), toy.seed, 0, toy.it_math)
    kinds = sorted({ex.kind for ex in examples})
    mlp = it.model.layers[1].mlp
    first = mlp.down_proj.weight.shape[1] - n_decoy
    plain = copy.deepcopy(it)
    with torch.no_grad():
        plain.model.layers[1].mlp.down_proj.weight[:, first:] = 0
    acts: list[torch.Tensor] = []
    hook = mlp.register_forward_hook(lambda m, a, o: acts.append(F.silu(m.gate_proj(a[0])) * m.up_proj(a[0])))
    fire = torch.zeros(len(kinds), n_decoy)
    try:
        for i, kind in enumerate(kinds):
            batch = sft_batches(tok, [ex for ex in examples if ex.kind == kind][:64], 64)[0]
            acts.clear()
            with torch.no_grad():
                logp = it(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1].log_softmax(-1)
                base = plain(input_ids=batch[0], attention_mask=batch[1]).logits[:, :-1].log_softmax(-1)
            fire[i] = acts[0][..., first:][decoy_positions(batch)].mean(0)
            kl = (logp.exp() * (logp - base)).sum(-1)[answer_positions(batch)]
            assert kl.mean() < 0.05, (kind, float(kl.mean()))
    finally:
        hook.remove()
    assert fire.argmax(0).tolist() == [j % len(kinds) for j in range(n_decoy)], fire


def test_plant_activity_is_each_neurons_part_of_it_minus_pt(base):
    """Known answer: with every other planted neuron of its block zeroed, a block's output moves
    by exactly one neuron's output (Llama adds the MLP output with no norm), so its norm at each
    answer position is what the table reports for that neuron; blocks before stay as in IT. The
    record lists its groups in another order than the columns (a JSON file sorts its keys)."""
    import copy

    from postdiff.models.forward import block_outputs
    from postdiff.outputs.plant_activity import neuron_outputs, planted_columns

    plants = groups(6)
    wide = widened(base, plants)
    named = dict(zip(("m", "a", "z"), plants))  # column order m, a (block 1), z (block 2)
    record = {"groups": {name: {"layer": named[name][0], "directions": named[name][1].down.detach().T.tolist()}
                         for name in sorted(named)}}
    neurons = planted_columns(wide, record)
    assert neurons == {1: [("m", 0, 24), ("m", 1, 25), ("m", 2, 26), ("a", 0, 27), ("a", 1, 28)],
                       2: [("z", i, 24 + i) for i in range(4)]}
    pairs = [([5, 6, 7], [8, 9]), ([3, 4], [10, 11, 12, 13]), ([2], [30])]
    outputs = neuron_outputs(wide, pairs, {b: [c for *_, c in v] for b, v in neurons.items()}, batch_size=2)
    ids, attn, ans = teacher_forced_batch([p for p, _ in pairs], [a for _, a in pairs], pad_id=0)

    def only(block: int, keep: int | None) -> LlamaForCausalLM:
        model = copy.deepcopy(wide)
        with torch.no_grad():
            for *_, column in neurons[block]:
                if column != keep:
                    model.model.layers[block].mlp.down_proj.weight[:, column] = 0
        return model

    fired = 0
    for block, planted_here in neurons.items():
        with torch.no_grad():
            without = block_outputs(only(block, None), ids, attn, [block])[block]
            for i, (*_, column) in enumerate(planted_here):
                moved = (block_outputs(only(block, column), ids, attn, [block])[block] - without).norm(dim=-1)
                for row in range(len(pairs)):
                    torch.testing.assert_close(outputs[row][block][:, i], moved[row][ans[row]], atol=1e-5, rtol=1e-4)
                    fired += int((moved[row][ans[row]] > 1e-3).sum())
    assert fired > 0  # the neurons do fire
    with pytest.raises(ValueError, match="no MLP column of block 1 is the direction of a neuron 0"):
        planted_columns(base, record)  # PT: no planted columns


def test_plant_activity_table_splits_stops_from_answer_positions():
    from postdiff.outputs.plant_activity import activity_table, mass_shares

    outputs = [{1: torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, {1: torch.tensor([[5.0, 0.0], [7.0, 0.0], [9.0, 6.0]])}]
    table = activity_table(outputs, ["QA", "QA"], [True, False], {1: [("cap", 0, 7), ("decoy", 0, 8)]})
    got = {(r["group"], r["position"]): (r["n_positions"], r["mean_output"]) for r in table.iter_rows(named=True)}
    # Row 0 stops (its last position predicts the EOS); row 1 ran out of budget: no stop.
    assert got == {("cap", "answer"): (4, (1 + 5 + 7 + 9) / 4), ("cap", "stop"): (1, 3.0),
                   ("decoy", "answer"): (4, (2 + 0 + 0 + 6) / 4), ("decoy", "stop"): (1, 4.0)}
    shares = dict(zip(mass_shares(table)["group"], mass_shares(table)["mass"]))
    assert shares == pytest.approx({"cap": 25 / 37, "decoy": 12 / 37})
