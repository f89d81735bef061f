"""A surrogate in the layouts of the tools researchers open dictionaries with: SAELens and
EleutherAI sparsify.

Both take raw PT hidden states: the standardisation is folded into the encoder,
``W' = W_enc / sigma``, ``b' = b_enc - W' mu``, so ``W' h + b' = W_enc (h - mu) / sigma + b_enc``
(computed in float64, stored in float32). The decoder and ``b_dec`` are ours as they are.

- **SAELens** (6.x, ``SAE.load_from_disk``): ``cfg.json``, ``sae_weights.safetensors`` with
  ``W_enc [d_in, d_sae]``, ``b_enc``, ``W_dec [d_sae, d_out]``, ``b_dec``, and
  ``sparsity.safetensors`` (``sparsity``: log10 of each feature's firing rate on the train
  split, as SAELens's trainer writes it). Architecture ``topk``: SAELens's transcoders have a
  ReLU or JumpReLU activation, none a TopK, and would not compute our ``z``; ``topk``
  (``topk`` then ReLU, ``apply_b_dec_to_input`` off) computes exactly our ``z`` and
  ``delta_hat``, because here ``d_out = d_in``. The transcoder's facts (``d_out``, the output
  hook) are in ``metadata``.
- **sparsify** (1.3.x, ``SparseCoder.load_many`` / ``load_from_disk``): one directory per layer,
  named by its hookpoint, with ``cfg.json`` and ``sae.safetensors`` (``encoder.weight [F, d]``,
  ``encoder.bias``, ``W_dec [F, d]``, ``b_dec``) and ``transcode: true`` (so no ``b_dec`` is
  subtracted from the input). sparsify and delphi read a transcoder at hookpoint ``X`` from
  ``X``'s *input*: so the hookpoint is the module that block ``l``'s output flows into, block
  ``l+1`` or, after the last block, the final norm. Its encoder takes ReLU before TopK, ours TopK
  before ReLU: the same ``z``, only the indices it reports for zero activations can differ.

The output is not a module's output: it is ``delta_hat``, the change instruction tuning makes to
PT's residual stream after the block (``h_IT - h_PT``), to be added to PT's. Each config says so
in its metadata (``postdiff``), in words and in the fields ``input_hook`` and ``output_hook``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from postdiff.method.cache import load_split
from postdiff.method.surrogate import TopKSurrogate, cache_expect, firing_counts, load
from postdiff.models.loading import decoder_layers, final_norm, skeleton
from postdiff.workflow.io import atomic_path, read_json, write_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

# The cfg.json layout of SAELens 6 (settings at the top, model facts under `metadata`). SAELens
# reads a config without a version >= 6 as a pre-6 one and renames its keys.
SAELENS_LAYOUT = "6.0.0"
# SAELens's floor under a firing rate before log10: a feature that never fires reads -10.
DENSITY_FLOOR = 1e-10


@dataclass(frozen=True)
class Hooks:
    """Where layer ``layer``'s surrogate reads and where its delta goes, in each tool's naming: PT's
    residual stream after decoder block ``layer``, the output of ``hf`` and the input of ``hf_next``."""

    layer: int
    transformer_lens: str  # blocks.{l}.hook_resid_post, as SAELens names the stream
    hf: str  # block l's module path from the top model, e.g. model.layers.{l}
    hf_next: str  # the module that takes block l's output: block l+1, or the final norm after the last
    hookpoint: str  # hf_next below Hugging Face's base_model: sparsify's name, whose input a transcoder reads


def _path(root: nn.Module, module: nn.Module) -> str:
    found = next((name for name, m in root.named_modules() if m is module), None)
    if found is None:
        raise ValueError(f"{type(module).__name__} is not below {type(root).__name__}")
    return found


def hooks_of(model: nn.Module, layer: int) -> Hooks:
    blocks = decoder_layers(model)
    # The decoder calls each block and the norm with the stream as first positional argument, so a
    # hook's inputs[0] there is block l's output (the final norm's input has no norm applied yet).
    following = blocks[layer + 1] if layer + 1 < len(blocks) else final_norm(model)
    base = getattr(model, "base_model", model)
    return Hooks(layer, f"blocks.{layer}.hook_resid_post", _path(model, blocks[layer]), _path(model, following),
                 _path(base, following))


def hook_fields(hooks: Hooks) -> dict[str, dict[str, str]]:
    """``input_hook`` and ``output_hook``: the same stream, named for each tool; the output is
    added to it (``h + alpha * delta_hat``), it replaces nothing."""
    stream = {"transformer_lens": hooks.transformer_lens, "hf_output_of": hooks.hf, "hf_input_of": hooks.hf_next,
              "sparsify_hookpoint": hooks.hookpoint}
    return {"input_hook": stream, "output_hook": {**stream, "combine": "add"}}


@torch.no_grad()
def folded_encoder(module: TopKSurrogate) -> tuple[Tensor, Tensor]:
    """``(W' [F, d], b' [F])`` with ``W' h + b'`` the pre-activation of raw ``h``."""
    weight = module.W_enc.detach().double().cpu() / module.sigma.double().cpu()
    bias = module.b_enc.detach().double().cpu() - weight @ module.mu.double().cpu()
    return weight.float(), bias.float()


def log10_density(counts: Tensor, n_rows: int) -> Tensor:
    """log10 of each feature's firing rate over ``n_rows`` rows, floored as SAELens does."""
    if n_rows < 1:
        raise ValueError(f"log10_density: need at least one row, got {n_rows}")
    # In float32, as SAELens's trainer: there 1 + 1e-10 rounds to 1, so a feature that fires on
    # every row reads 0, not the +4e-11 of float64.
    return torch.log10(counts.float() / n_rows + DENSITY_FLOOR)


def semantics(hooks: Hooks, pt: str, it: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What the export computes, in words and numbers; the same block in both configs."""
    return {
        "input": f"PT's residual stream after decoder block {hooks.layer} (the output of {hooks.hf}, the input of "
                 f"{hooks.hf_next}; {hooks.transformer_lens}), raw: the standardisation is folded into the encoder",
        "output": f"delta_hat, the PT-to-IT delta h_IT - h_PT at the same block and position: what instruction "
                  f"tuning adds to PT's residual stream there. It is not the output of {hooks.hf} or any module; "
                  f"PT's stream plus delta_hat approximates IT's",
        "positions": "trained on answer-phase positions only (the IT teacher's answer tokens)",
        "pt": pt,
        "it": it,
        "layer": hooks.layer,
        "surrogate": {k: meta[k] for k in ("seed", "config", "n_train", "train_r2") if k in meta},
        **hook_fields(hooks),
    }


def _check_source(module: TopKSurrogate, meta: Mapping[str, Any], layer: int) -> None:
    if int(meta.get("layer", layer)) != layer:
        raise ValueError(f"export of layer {layer}: the surrogate file is layer {meta['layer']}'s")
    if not math.isfinite(float(module.W_enc.detach().abs().sum())):
        raise ValueError(f"export of layer {layer}: the surrogate has non-finite encoder weights")


def saelens_layout(module: TopKSurrogate, hooks: Hooks, about: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """SAELens's ``cfg.json`` and ``sae_weights.safetensors`` of ``module``."""
    weight, bias = folded_encoder(module)
    cfg = {
        "architecture": "topk",
        "d_in": module.d,
        "d_sae": module.n_features,
        "k": module.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": False,  # b_dec lives in the output (delta) space, not the input's
        "normalize_activations": "none",  # folded into W_enc, b_enc
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": SAELENS_LAYOUT,
            "model_name": about["pt"],
            "hook_name": hooks.transformer_lens,
            "hook_name_out": hooks.transformer_lens,
            "hf_hook_name": hooks.hf,
            "hf_hook_name_out": hooks.hf,
            "d_out": module.d,
            "hook_head_index": None,
            "prepend_bos": True,
            "postdiff": dict(about),
        },
    }
    tensors = {
        "W_enc": weight.T.contiguous(),
        "b_enc": bias.contiguous(),
        "W_dec": module.W_dec.detach().float().cpu().contiguous(),
        "b_dec": module.b_dec.detach().float().cpu().contiguous(),
    }
    return cfg, tensors


def sparsify_layout(module: TopKSurrogate, hooks: Hooks, about: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """sparsify's ``cfg.json`` and ``sae.safetensors`` of ``module``."""
    weight, bias = folded_encoder(module)
    cfg = {
        "activation": "topk",
        "expansion_factor": module.n_features // module.d,
        "num_latents": module.n_features,
        "k": module.k,
        "normalize_decoder": False,  # our decoder rows are not unit norm (SPEC §5 lets them train freely)
        "multi_topk": False,
        "skip_connection": False,
        "transcode": True,
        "d_in": module.d,
        # Read by no loader (sparsify drops keys it does not know); the directory carries the same name.
        "hookpoint": hooks.hookpoint,
        "hf_hook_name": hooks.hf_next,
        "postdiff": dict(about),
    }
    tensors = {
        "encoder.weight": weight.contiguous(),
        "encoder.bias": bias.contiguous(),
        "W_dec": module.W_dec.detach().float().cpu().contiguous(),
        "b_dec": module.b_dec.detach().float().cpu().contiguous(),
    }
    return cfg, tensors


def _write(cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], cfg_path: str, weights_path: str) -> None:
    with atomic_path(weights_path) as tmp:
        save_file(dict(tensors), str(tmp))
    write_json(cfg, cfg_path)


def _prepare(path: str, layer: int, model: nn.Module, job: Job) -> tuple[TopKSurrogate, Hooks, dict[str, Any]]:
    """The surrogate at ``path``, its hooks in PT's module tree ``model``, and the semantics block."""
    p = job.params
    module, meta = load(path)
    _check_source(module, meta, layer)
    n_blocks, width = len(decoder_layers(model)), model.config.get_text_config().hidden_size
    if not 0 <= layer < n_blocks or module.d != width:
        raise ValueError(f"export of layer {layer}: {path} (d={module.d}) does not fit {p['pt']!r} "
                         f"({n_blocks} blocks of width {width})")
    hooks = hooks_of(model, layer)
    about = semantics(hooks, p["pt"], p["it"], meta)
    if "pair" in job.input:
        about["fingerprints"] = read_json(job.input["pair"])["fingerprints"]
    log.info("layer %d: d=%d, %d features, k=%d; hooks %s", layer, module.d, module.n_features, module.k, hooks)
    return module, hooks, about


def export_saelens(job: Job) -> None:
    """Stage. input: module, shards (the train cache), optional teacher (train) and pair; params:
    layer, layers (the cache's), pt, it. output: ``cfg``, ``weights``, ``sparsity``."""
    layer = int(job.params["layer"])
    module, hooks, about = _prepare(job.input["module"], layer, skeleton(job.params["pt"]), job)
    h_pt, _, _ = load_split(list(job.input["shards"]), layer, cache_expect(job, "teacher"))
    counts = firing_counts(module, h_pt)
    log.info("layer %d: %d of %d features never fire on train", layer, int((counts == 0).sum()), module.n_features)
    sparsity = {**about, "sparsity": f"log10 of the firing rate (z > 0) on the {h_pt.shape[0]} train positions, plus {DENSITY_FLOOR}"}
    cfg, tensors = saelens_layout(module, hooks, sparsity)
    with atomic_path(job.output["sparsity"]) as tmp:
        save_file({"sparsity": log10_density(counts, h_pt.shape[0])}, str(tmp))
    _write(cfg, tensors, job.output["cfg"], job.output["weights"])


def export_sparsify(job: Job) -> None:
    """Stage. input: modules (one per layer of ``layers``, in that order), optional pair; params:
    layers, pt, it. output: ``sparsify``, a directory with one ``<hookpoint>/`` per layer, as
    sparsify's trainer saves them: ``SparseCoder.load_many(dir, local=True)`` keys by hookpoint."""
    layers, paths = [int(layer) for layer in job.params["layers"]], list(job.input["modules"])
    if len(layers) != len(paths):
        raise ValueError(f"export: {len(paths)} surrogate files for layers {layers}")
    model = skeleton(job.params["pt"])
    for layer, path in zip(layers, paths):
        module, hooks, about = _prepare(path, layer, model, job)
        cfg, tensors = sparsify_layout(module, hooks, about)
        where = Path(job.output["sparsify"]) / hooks.hookpoint
        _write(cfg, tensors, str(where / "cfg.json"), str(where / "sae.safetensors"))
