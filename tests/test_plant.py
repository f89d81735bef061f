"""The positive-control pair's construction: planted neurons are an additive change of the
residual stream at their block, the widened IT is exactly PT plus them, groups stay apart."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from postdiff.data.world import make_world
from postdiff.models.toy import corpus
from postdiff.models.toy.plant import Neurons, group_of, planted, widened
from postdiff.models.toy.settings import PlantConfig, ToyConfig
from postdiff.models.toy.shipped import toy_mismatch
from postdiff.models.toy.train import model_config
from postdiff.outputs.planted import alignment, mask_alignment

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


def test_alignment_of_decoder_directions_with_planted_ones():
    directions = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])  # a group of two neurons
    # [d, F]: on a neuron's direction, a mix of both, off the group, off it and scaled
    D = torch.tensor([[3.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 5.0]]).T
    max_cos, in_span = alignment(D, directions)
    torch.testing.assert_close(max_cos, torch.tensor([1.0, 0.5**0.5, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(in_span, torch.tensor([1.0, 1.0, 0, 0], dtype=torch.float64))
    table = mask_alignment({"CapMask": {1: [0, 1]}, "RandomMask": {0: [3]}}, {1: D, 0: D}, {"cap": (1, directions)})
    assert table.rows() == [("CapMask", 1, 0, "cap", 1.0, 1.0), ("CapMask", 1, 1, "cap", pytest.approx(0.5**0.5), 1.0),
                            ("RandomMask", 0, 3, None, None, None)]
