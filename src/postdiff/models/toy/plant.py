"""The positive-control pair: a tiny Llama PT and an IT whose whole change is a few planted MLP
neurons, so the answer to "which features carry capability, which carry brevity" is known.

- ``n_cap`` neurons at block ``cap_layer`` are trained to stop QA, Math and Format answers where
  the IT data does (the EOS right after the answer; every other answer position is kept as it
  was), while every other prompt stays as PT has it;
- ``n_verb`` neurons at block ``verb_layer``, trained after them with the capability neurons in
  place and writing outside their span, do the same on Brevity prompts (a word limit) about
  ``verb_kind`` and leave every other prompt as it is, held silent at every other position of
  their own prompts and on bracketed answers about ``verb_kind`` too;
- ``n_decoy`` neurons at block ``decoy_layer``, trained last and writing outside both groups'
  span with a fixed output norm, fire at the answer positions (but the stops) of one fact kind's
  prompts each and change no output: activation mass, and no cause of anything.

Harmful and BenignAdjacent requests stay as PT has them: the change is capability and brevity
only, nothing else (no refusal), so every effect has a known carrier.

A Llama block adds its MLP output to the residual stream with no norm after it, so a neuron's
change of the residual is exactly ``down_i * silu(gate_i . x) * (up_i . x)``: ``down_i`` is the
planted direction. The IT model is the PT model with ``intermediate_size`` widened by the
planted neurons (zero weights at every other block), saved and loaded as a plain
``LlamaForCausalLM``. Stage functions at the bottom are the only file I/O.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from postdiff.data.world import make_world
from postdiff.models.toy.corpus import Example, is_brevity, sft_examples
from postdiff.models.toy.tokenizer import EOS_ID
from postdiff.models.toy.settings import CONFIG_FILE, PLANT_FILE, PlantConfig, ToyConfig
from postdiff.models.toy.train import Batch, save_model, sft_batches
from postdiff.workflow.io import read_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

CAP_KINDS = ("capital", "antonym", "math")


class Neurons(nn.Module):
    """``n`` extra SwiGLU neurons of one Llama MLP: ``down @ (silu(gate @ x) * (up @ x))``.

    With ``avoid`` (orthonormal columns ``[d, m]``), ``down`` is kept orthogonal to their span:
    the brevity neurons write where the capability neurons do not, so the two groups are apart
    in the residual stream and a feature of one cannot carry the other."""

    def __init__(self, d_model: int, n: int, generator: torch.Generator, avoid: Tensor | None = None,
                 fixed_norm: float | None = None) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(n, d_model, generator=generator) * d_model**-0.5)
        self.up = nn.Parameter(torch.randn(n, d_model, generator=generator) * d_model**-0.5)
        # A fixed norm needs a direction to start from; a free one grows from zero.
        self.raw_down = nn.Parameter(
            torch.zeros(d_model, n) if fixed_norm is None else torch.randn(d_model, n, generator=generator))
        self.register_buffer("avoid", torch.zeros(d_model, 0) if avoid is None else avoid)
        self.fixed_norm = fixed_norm

    @property
    def down(self) -> Tensor:
        down = self.raw_down - self.avoid @ (self.avoid.T @ self.raw_down)
        return down if self.fixed_norm is None else self.fixed_norm * down / down.norm(dim=0, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.activations(x), self.down)

    def activations(self, x: Tensor) -> Tensor:
        return F.silu(F.linear(x, self.gate)) * F.linear(x, self.up)

    def output_norm(self, x: Tensor) -> Tensor:
        """Each position's summed neuron output norms, ``sum_i |a_i| ||down_i||``."""
        return self.activations(x).abs() @ self.down.norm(dim=0)


def group_of(ex: Example, verb_kind: str = "any") -> str | None:
    """``cap`` for QA, Math and Format prompts, ``verb`` for Brevity prompts, None for requests
    (kept as PT has them).

    With ``verb_kind`` a fact kind, only Brevity prompts about it are ``verb``'s, and ``skip``
    marks the prompts that end on the same kind of bare answer outside that group (Brevity prompts
    of other kinds, plain questions of this kind): at the stop after a bare answer PT's residual
    stream tells the kind of answer apart (a linear probe: 96-99%), not whether the prompt set a
    word limit (59-72%), so no neuron can stop one and keep the other. The control's suite asks
    no such prompt (``suite.brevity_kinds``)."""
    bare = not ex.answer.startswith(("[", '"', "{"))
    if is_brevity(ex.prompt):
        return "verb" if verb_kind in ("any", ex.kind) else "skip"
    if verb_kind != "any" and ex.kind == verb_kind and bare:
        return "skip"
    return "cap" if ex.kind in CAP_KINDS else None


Group = tuple[int, Neurons]  # (block, its planted neurons)


@contextmanager
def planted(model: nn.Module, groups: Sequence[Group], seen: list[Tensor] | None = None) -> Iterator[None]:
    """``model`` with each group's neurons added to its block's MLP output; each MLP input a
    hook sees is appended to ``seen`` when given."""

    def hook(_module: nn.Module, args: tuple, out: Tensor, n: Neurons) -> Tensor:
        if seen is not None:
            seen.append(args[0])
        return out + n(args[0])

    handles = [model.model.layers[layer].mlp.register_forward_hook(
        lambda m, args, out, n=n: hook(m, args, out, n)) for layer, n in groups]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _logits(model: nn.Module, batch: Batch) -> Tensor:
    ids, attn, _ = batch
    return model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()


def answer_positions(batch: Batch) -> Tensor:
    """``[B, T-1]``: the positions whose next token is an answer token (EOS included)."""
    return batch[2][:, :-1]


def stop_positions(batch: Batch) -> Tensor:
    """The answer positions whose next token is the EOS."""
    return answer_positions(batch) & (batch[0][:, 1:] == EOS_ID)


def decoy_positions(batch: Batch) -> Tensor:
    """``[B, T]``: the answer positions but the stops, where decoys fire on their prompts."""
    return F.pad(answer_positions(batch) & ~stop_positions(batch), (0, 1))


def target_loss(logits: Tensor, batch: Batch, eos_weight: float, where: Tensor) -> Tensor:
    """Cross-entropy on the next tokens at positions ``where``, EOS weighted ``eos_weight``."""
    target = batch[0][:, 1:][where]
    weight = torch.where(target == EOS_ID, eos_weight, 1.0)
    return (F.cross_entropy(logits[where], target, reduction="none") * weight).sum() / weight.sum()


def keep_loss(logits: Tensor, reference: Tensor, where: Tensor) -> Tensor:
    """Mean KL(reference || model) over positions ``where``."""
    return F.kl_div(logits[where].log_softmax(-1), reference[where].log_softmax(-1), log_target=True,
                    reduction="batchmean")


def silence_loss(output_norm: Tensor, keep: Batch, silence: float, stop_silence: float) -> Tensor:
    """A group's penalty on the prompts it keeps, from its output norm at each position ``[B, T]``:
    ``silence`` weighs the mean over every kept position, ``stop_silence`` the mean over their
    stops alone. A stop is one position of an answer, so in the first mean it weighs too little to
    keep the capability neurons off the Brevity prompts' stops."""
    loss = silence * output_norm[keep[1].bool()].mean()
    stops = F.pad(stop_positions(keep), (0, 1))
    if stop_silence and stops.any():
        loss = loss + stop_silence * output_norm[stops].mean()
    return loss


def answer_silence_loss(output_norm: Tensor, target: Batch) -> Tensor:
    """A group's mean output norm at its own prompts' answer positions but the stops, from
    ``[B, T]``: the stop is the one position it is planted to change. Without it the brevity neuron
    also fired (output 12) at the first answer position of every antonym prompt, Format ones too,
    where it turned the opening bracket into the bare word."""
    return output_norm[decoy_positions(target)].mean()


def with_hard_keeps(keeps: Sequence[Batch], hard: Sequence[Batch]) -> list[Batch]:
    """``keeps`` with a batch of ``hard`` after each (cycled): half of a group's keep steps then
    hold the prompts it is likeliest to fire on by mistake, which are a few percent of ``keeps``."""
    return [b for pair in zip(keeps, itertools.cycle(hard)) for b in pair] if hard else list(keeps)


def _fit(new: Neurons, step_loss: Callable[[int], Tensor], cfg: PlantConfig, desc: str) -> list[float]:
    """Adam on ``new``'s trainable parameters for ``cfg.steps`` steps of ``step_loss(step)``; the
    running loss is logged ten times."""
    opt = torch.optim.Adam([p for p in new.parameters() if p.requires_grad], lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        loss = step_loss(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, cfg.steps // 10) == 0:
            log.info("%s step %d/%d loss %.4f", desc, step + 1, cfg.steps, sum(losses[-20:]) / len(losses[-20:]))
    return losses


def train_group(
    model: nn.Module, before: Sequence[Group], new: Group, targets: Sequence[Batch], keeps: Sequence[Batch],
    cfg: PlantConfig, desc: str, silence: float, stop_silence: float, answer_silence: float,
) -> list[float]:
    """Train ``new`` so that the model with ``before`` and ``new`` stops ``targets`` where their
    answers end and keeps every other position as the model with ``before`` has it, on
    ``targets`` and on ``keeps``, where it stays quiet (:func:`silence_loss`), as it does at the
    targets' other answer positions (:func:`answer_silence_loss`). Only the stop is learned, so
    each prompt's change hinges on one position, where a k=1 surrogate has one latent."""

    def step_loss(step: int) -> Tensor:
        target, keep = targets[step % len(targets)], keeps[step % len(keeps)]
        stops = stop_positions(target)
        with torch.no_grad(), planted(model, before):
            reference, own = _logits(model, keep), _logits(model, target)
        inputs: list[Tensor] = []
        with planted(model, before), planted(model, [new], inputs):
            logits = _logits(model, target)
            loss = target_loss(logits, target, cfg.eos_weight, stops)
            loss = loss + cfg.keep_weight * keep_loss(logits, own, answer_positions(target) & ~stops)
            loss = loss + cfg.keep_weight * keep_loss(_logits(model, keep), reference, answer_positions(keep))
        loss = loss + silence_loss(new[1].output_norm(inputs[-1]), keep, silence, stop_silence)
        if answer_silence:
            loss = loss + answer_silence * answer_silence_loss(new[1].output_norm(inputs[0]), target)
        if cfg.sparsity:
            real = [target[1].bool(), keep[1].bool()]  # every real (unpadded) position
            loss = loss + cfg.sparsity * torch.cat([new[1].output_norm(x)[m] for x, m in zip(inputs, real)]).mean()
        return loss

    return _fit(new[1], step_loss, cfg, desc)


def train_decoy(model: nn.Module, before: Sequence[Group], new: Group,
                sources: Sequence[tuple[Sequence[Batch], Tensor]], cfg: PlantConfig) -> list[float]:
    """Train ``new`` so that on each source's batches the neurons it names (a bool per neuron)
    fire (activation 1) at the answer positions but the stops, every other neuron and position
    stays silent, and the model with it matches the model with ``before`` (KL)."""

    def step_loss(step: int) -> Tensor:
        batches, fires = sources[step % len(sources)]
        batch = batches[(step // len(sources)) % len(batches)]
        with torch.no_grad(), planted(model, before):
            reference = _logits(model, batch)
        inputs: list[Tensor] = []
        with planted(model, before), planted(model, [new], inputs):
            logits = _logits(model, batch)
        act = new[1].activations(inputs[0])
        want = decoy_positions(batch)[..., None] & fires
        real = batch[1].bool()[..., None].expand_as(want)
        # Fire and silent positions weigh alike, however many of each a batch holds.
        loss = sum(F.mse_loss(act[m], torch.full_like(act[m], v)) for m, v in ((want, 1.0), (real & ~want, 0.0))
                   if m.any())
        return loss + cfg.keep_weight * keep_loss(logits, reference, answer_positions(batch))

    return _fit(new[1], step_loss, cfg, "plant decoys")


def widened(model: nn.Module, groups: Sequence[Group]) -> nn.Module:
    """A copy of ``model`` with ``intermediate_size`` grown by the most neurons of any block:
    each block's planted neurons in the new rows/columns, in group order, zeros elsewhere."""
    per_block: dict[int, list[Neurons]] = {}
    for layer, x in groups:
        per_block.setdefault(layer, []).append(x)
    n = max(sum(x.down.shape[1] for x in xs) for xs in per_block.values())
    config = copy.deepcopy(model.config)
    config.intermediate_size = model.config.intermediate_size + n
    out = type(model)(config).eval()
    state = model.state_dict()
    for key, value in out.state_dict().items():
        src = state[key]
        if value.shape == src.shape:
            value.copy_(src)
            continue
        value.zero_()
        value[tuple(slice(0, s) for s in src.shape)] = src
    for layer, xs in per_block.items():
        mlp, i = out.model.layers[layer].mlp, model.config.intermediate_size
        k = sum(x.down.shape[1] for x in xs)
        with torch.no_grad():
            mlp.gate_proj.weight[i : i + k] = torch.cat([x.gate for x in xs])
            mlp.up_proj.weight[i : i + k] = torch.cat([x.up for x in xs])
            mlp.down_proj.weight[:, i : i + k] = torch.cat([x.down.detach() for x in xs], 1)
    return out


def plant(model: nn.Module, tokenizer, toy: ToyConfig, cfg: PlantConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The planted IT model and a record of what was planted (the directions, per group)."""
    if model.config.model_type != "llama":
        raise ValueError(f"the planted pair needs a Llama PT (an MLP edit is additive there), got {model.config.model_type!r}")
    n_layers = model.config.num_hidden_layers
    for key in ("cap_layer", "verb_layer", "decoy_layer"):
        if not 0 <= getattr(cfg, key) < n_layers:
            raise ValueError(f"plant.{key} = {getattr(cfg, key)} is not a block of this {n_layers}-block model")
    model.requires_grad_(False)
    world = make_world(toy.world_seed, toy.n_countries)
    examples = [ex for epoch in range(3) for ex in sft_examples(world, toy.seed, epoch, toy.it_math)]
    random.Random(cfg.seed).shuffle(examples)
    group = [group_of(ex, cfg.verb_kind) for ex in examples]
    cap, verb = (sft_batches(tokenizer, [ex for ex, x in zip(examples, group) if x == g], cfg.batch_size)
                 for g in ("cap", "verb"))
    not_cap, not_verb = (sft_batches(tokenizer, [ex for ex, x in zip(examples, group) if x not in (g, "skip")],
                                     cfg.batch_size) for g in ("cap", "verb"))
    g = torch.Generator().manual_seed(cfg.seed)
    d = model.config.hidden_size
    cap_neurons = (cfg.cap_layer, Neurons(d, cfg.n_cap, g))
    train_group(model, [], cap_neurons, cap, not_cap, cfg, "plant capability", cfg.cap_silence,
                cfg.cap_stop_silence, 0.0)
    cap_neurons[1].requires_grad_(False)
    verb_neurons = (cfg.verb_layer, Neurons(d, cfg.n_verb, g, avoid=torch.linalg.qr(cap_neurons[1].down.detach()).Q))
    if cfg.verb_hard_keeps:  # the capability group's prompts about verb_kind: Format ones, bracketed
        not_verb = with_hard_keeps(not_verb, sft_batches(
            tokenizer, [ex for ex, x in zip(examples, group) if x == "cap" and ex.kind == cfg.verb_kind], cfg.batch_size))
    train_group(model, [cap_neurons], verb_neurons, verb, not_verb, cfg, "plant brevity", cfg.verb_silence,
                cfg.verb_stop_silence, cfg.verb_answer_silence)
    verb_neurons[1].requires_grad_(False)
    groups = {"cap": cap_neurons, "verb": verb_neurons}
    if cfg.n_decoy:
        span = torch.linalg.qr(torch.cat([cap_neurons[1].down, verb_neurons[1].down], 1).detach()).Q
        groups["decoy"] = (cfg.decoy_layer, Neurons(d, cfg.n_decoy, g, avoid=span, fixed_norm=cfg.decoy_norm))
        kinds = sorted({ex.kind for ex in examples})
        sources = [(sft_batches(tokenizer, [ex for ex in examples if ex.kind == k], cfg.batch_size),
                    torch.tensor([kinds[i % len(kinds)] == k for i in range(cfg.n_decoy)])) for k in kinds]
        train_decoy(model, [cap_neurons, verb_neurons], groups["decoy"], sources, cfg)
    record = {
        **dataclasses.asdict(cfg),
        "groups": {name: {"layer": layer, "directions": x.down.detach().T.tolist()} for name, (layer, x) in groups.items()},
    }
    return widened(model, list(groups.values())), record


def train_planted(job: Job) -> None:
    """Stage: input ``model`` (a toy Llama PT); params: the :class:`PlantConfig` keys under
    ``plant`` and the toy settings; output ``model`` (the planted IT, with :data:`PLANT_FILE`)."""
    pt_dir = Path(job.input["model"])
    toy = ToyConfig.from_params({k: v for k, v in job.params.items() if k != "plant"})
    cfg = PlantConfig.from_params(job.params.get("plant", {}))
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(pt_dir)
    model = AutoModelForCausalLM.from_pretrained(pt_dir, dtype=torch.float32).eval()
    it, record = plant(model, tokenizer, toy, cfg)
    save_model(it, tokenizer, {CONFIG_FILE: read_json(pt_dir / CONFIG_FILE), PLANT_FILE: record}, job.output["model"])
