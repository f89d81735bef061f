"""The toy pair's settings and the files that record them beside each model's config.json:
what the stages that only check or read them (installing the shipped pair, the planted table)
need, without the torch and transformers that training imports."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_FILE = "postdiff_toy.json"  # the ToyConfig a model was trained with, beside config.json
PLANT_FILE = "postdiff_plant.json"  # the planted neurons' settings and directions, beside config.json


@dataclass(frozen=True)
class ToyConfig:
    """Every knob of the toy pair; a stage's params may set any subset of these keys.

    The defaults were measured on 2 CPU cores: the 1.1M-parameter model sees each made-up fact
    about 200 times in 20 epochs and trains in about 3 minutes; with 120 sightings, or the
    2.4M-parameter model at half the epochs, memorisation of the capitals failed in some runs.
    Two-digit arithmetic is not learned at this budget, so the PT-to-IT gap comes from QA and
    Format; the arithmetic in the corpus still gives the Math slice PT-like and IT-like shapes.
    """

    world_seed: int = 0
    n_countries: int = 240
    seed: int = 0
    architecture: str = "gemma3"  # or "llama": no norm after each block's MLP, so an MLP edit is additive
    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    batch_size: int = 16
    pt_epochs: int = 20
    pt_lr: float = 3e-3
    # Share of PT corpus blocks that end a document (an EOS after the separator). 0 for the
    # embedded pair: an EOS it never read, IT's stop is a new token. The positive control's PT
    # reads some: a stop is then a small push on a token PT knows, not a write big enough to
    # flatten the whole distribution (README, "The positive control").
    eos_rate: float = 0.0
    math_fraction: float = 0.25  # share of all arithmetic problems in each PT epoch
    fact_repeats: int = 8  # statements of each capital and antonym per PT epoch
    it_epochs: int = 3
    it_lr: float = 2e-4
    it_math: int = 400  # arithmetic examples per IT epoch

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> ToyConfig:
        return settings_from_params(cls, params, "toy")


def settings_from_params(cls: type, params: Mapping[str, Any], what: str) -> Any:
    """A frozen settings dataclass from any subset of its keys, each cast to its default's type."""
    defaults = dataclasses.asdict(cls())
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {what} param(s) {unknown}; known: {sorted(defaults)}")
    return cls(**{k: type(defaults[k])(v) for k, v in params.items()})


@dataclass(frozen=True)
class PlantConfig:
    """Every knob of the planted change; a stage's params may set any subset of these keys. The
    defaults are the shipped control pair's (``config/control.yaml``)."""

    seed: int = 0
    cap_layer: int = 1
    verb_layer: int = 1
    n_cap: int = 1
    n_verb: int = 1
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-2
    eos_weight: float = 3.0  # stopping is one token per answer; without weight it is learned last
    keep_weight: float = 1.0  # KL to the model before this group, on every position it must keep
    # Mean norm of the neurons' output over every position: a neuron that fires everywhere moves
    # the mean of delta, which a surrogate keeps in b_dec and a mask (no b_dec) never adds back.
    sparsity: float = 1.0
    # Mean output norm on the prompts a group keeps as they were: the stop after an answer looks
    # alike on every prompt, and without it the capability neurons fire at Brevity stops too.
    cap_silence: float = 1.0
    verb_silence: float = 1.0
    # A group's mean output norm at the stops of the prompts it keeps: the mean above weighs one
    # stop an answer too little (plant.silence_loss). Without it the brevity neuron fired at QA
    # stops (output 15), already stopped by the capability neuron, and its latents mixed both.
    cap_stop_silence: float = 0.5
    verb_stop_silence: float = 0.5
    # The brevity neurons' mean output norm at their own answer positions but the stop
    # (plant.answer_silence_loss), and half their keep steps on the bracketed answers about
    # verb_kind (plant.with_hard_keeps): both keep them off Format prompts about antonyms.
    verb_answer_silence: float = 1.0
    verb_hard_keeps: bool = True
    # "any": every Brevity prompt is the brevity group's; a fact kind (capital, antonym): only
    # Brevity prompts about it, and plain questions about it are nobody's (plant.group_of).
    verb_kind: str = "antonym"
    # Decoys, trained last: neuron i fires on the prompts of fact kind i (sorted kinds, cycled)
    # at every answer position but the stop, with a fixed output norm, and changes no output
    # (KL): features with activation mass, and high capability scores, that cause nothing. At a
    # norm of 12 the capability neuron's latent was the most massive on one surrogate seed of
    # three, so ActivationMassMask found it; at 36 five decoy latents outweigh it on every seed.
    n_decoy: int = 5
    decoy_layer: int = 1
    decoy_norm: float = 36.0

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PlantConfig:
        return settings_from_params(cls, params, "plant")
