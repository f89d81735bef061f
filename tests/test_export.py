"""Exports to SAELens and sparsify: the folding math by hand, the stages on a written cache, the
named hooks on Gemma 3 models, round trips through each library's own loader, and SAELens's own
hooking (SAETransformerBridge) against postdiff's intervention (libraries from the `test` extra)."""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import polars as pl
import pytest
import torch
import yaml
from safetensors.torch import load_file

from postdiff.method.cache import write_shard
from postdiff.method.surrogate import SurrogateConfig, TopKSurrogate, firing_counts, fit, save
from postdiff.models.forward import block_outputs
from postdiff.models.loading import fingerprint, gemma3_text_config, skeleton
from postdiff.outputs import export as E
from postdiff.workflow.runtime import Job

ROOT = Path(__file__).resolve().parents[1]
PT = str(ROOT / "workflow/resources/embedded_pair/pt")  # Gemma3ForCausalLM, 4 blocks of width 128
WRAPPED = next((ROOT / "workflow/resources/hf_home/hub/models--postdiff-rehearsal--gemma-3-tiny-pt/snapshots").iterdir())
PT_PRINT = fingerprint(PT)
D, LAYER = 128, 1
EPS32 = torch.finfo(torch.float32).eps


def hand_module() -> TopKSurrogate:
    m = TopKSurrogate(2, 3, 2, mu=torch.tensor([1.0, 2.0]), sigma=torch.tensor([2.0, 4.0]))
    with torch.no_grad():
        m.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        m.b_enc.copy_(torch.tensor([0.5, -1.0, 0.0]))
        m.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]))
        m.b_dec.copy_(torch.tensor([0.1, -0.1]))
    return m


def test_folded_encoder_known_answer() -> None:
    """W' = W_enc / sigma, b' = b_enc - W' mu, worked by hand."""
    weight, bias = E.folded_encoder(hand_module())
    assert torch.equal(weight, torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.5, 0.25]]))
    assert torch.equal(bias, torch.tensor([0.0, -2.0, -1.0]))


def test_folded_encoder_reproduces_pre_activations_with_a_large_mean() -> None:
    """A mean far above the spread (the massive activations of some models) is where folding
    loses digits: W' h and b' nearly cancel. Folding in float64 keeps the float32 result within
    the rounding of a float32 dot product of d terms: about d * eps * sum of |terms| (Higham)."""
    g = torch.Generator().manual_seed(0)
    d, n = 64, 32
    mu = 100 * torch.randn(d, generator=g)
    m = TopKSurrogate(d, 4 * d, 8, mu=mu, sigma=torch.rand(d, generator=g) + 0.1)
    with torch.no_grad():
        m.W_enc.copy_(torch.randn(4 * d, d, generator=g))
        m.b_enc.copy_(torch.randn(4 * d, generator=g))
    h = mu + torch.randn(n, d, generator=g)
    exact = torch.nn.functional.linear((h.double() - m.mu.double()) / m.sigma.double(), m.W_enc.double(), m.b_enc.double())
    weight, bias = E.folded_encoder(m)
    folded = torch.nn.functional.linear(h, weight, bias).double()
    bound = d * EPS32 * (h.abs().double() @ weight.abs().double().T + bias.abs().double())
    assert ((folded - exact).abs() <= bound).all()
    assert (folded - exact).abs().max() > 0  # it does round: the bound is what is being tested


def test_log10_density_known_answer() -> None:
    got = E.log10_density(torch.tensor([0, 5, 10]), 10)
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([-10.0, math.log10(0.5), 0.0], abs=1e-6)
    assert got[2].item() == 0.0  # a feature that fires on every row: no float64 +4e-11 above 0
    with pytest.raises(ValueError, match="row"):
        E.log10_density(torch.tensor([0]), 0)


def test_hooks_of_a_causal_lm_and_of_a_multimodal_wrapper() -> None:
    """sparsify's hookpoint is the module block l's output flows into: block l+1, or the final norm
    after the last block; below base_model, as sparsify names modules."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(gemma3_text_config(vocab_size=32, hidden_size=16, num_layers=3))
    assert E.hooks_of(plain, 1) == E.Hooks(1, "blocks.1.hook_resid_post", "model.layers.1", "model.layers.2", "layers.2")
    assert E.hooks_of(plain, 2) == E.Hooks(2, "blocks.2.hook_resid_post", "model.layers.2", "model.norm", "norm")
    wrapped = skeleton(str(WRAPPED))  # Gemma3ForConditionalGeneration, as Gemma 3 4B loads
    assert E.hooks_of(wrapped, 1) == E.Hooks(1, "blocks.1.hook_resid_post", "model.language_model.layers.1",
                                             "model.language_model.layers.2", "language_model.layers.2")
    assert E.hooks_of(wrapped, 3).hookpoint == "language_model.norm"


def hooked_inputs(model: torch.nn.Module, hookpoint: str, rows: pl.DataFrame) -> torch.Tensor:
    """What sparsify's trainer and delphi read for a transcoder at ``hookpoint``: ``inputs[0]`` of
    a forward hook on that module below ``base_model``, at the answer positions, rows in order."""
    from postdiff.models.template import teacher_forced_batch

    seen: list[torch.Tensor] = []
    module = model.base_model.get_submodule(hookpoint)
    handle = module.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    ids, attn, answers = teacher_forced_batch(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), pad_id=0)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=attn, use_cache=False)
    finally:
        handle.remove()
    return seen[0][answers]


def token_rows(n: int, seed: int) -> pl.DataFrame:
    g = torch.Generator().manual_seed(seed)
    return pl.DataFrame({"id": [f"p{i}" for i in range(n)],
                         "prefix_ids": [[2, *torch.randint(5, 500, (3 + i,), generator=g).tolist()] for i in range(n)],
                         "token_ids": [torch.randint(5, 500, (2 + i % 3,), generator=g).tolist() for i in range(n)]})


@pytest.mark.parametrize("spec", [PT, str(WRAPPED)], ids=["causal_lm", "multimodal_wrapper"])
def test_the_named_hookpoints_input_is_the_cached_h_pt_at_every_layer(spec: str) -> None:
    """The claim the sparsify export makes: hooked the way sparsify and delphi hook a transcoder,
    the module it names gives exactly the h_PT our cache holds for that layer (the last layer's
    through the final norm's input, before the norm), bit for bit."""
    from postdiff.method.cache import collect
    from postdiff.models.loading import load_model

    model, _ = load_model(spec, "float32", "cpu")
    rows = token_rows(3, 0)
    caches, _ = collect(model, model, [0, 1, 2, 3], rows, batch_size=8)
    for layer, (h_pt, _) in caches.items():
        hooks = E.hooks_of(model, layer)
        assert model.get_submodule(hooks.hf_next) is model.base_model.get_submodule(hooks.hookpoint)
        assert torch.equal(hooked_inputs(model, hooks.hookpoint, rows), h_pt), hooks
        if layer > 0:  # the hookpoint exported before, block l itself, feeds it block l-1's output
            assert not torch.allclose(hooked_inputs(model, E.hooks_of(model, layer - 1).hookpoint, rows), h_pt)


def test_layouts_carry_the_weights_shapes_and_semantics() -> None:
    m = hand_module()
    hooks = E.Hooks(1, "blocks.1.hook_resid_post", "model.layers.1", "model.layers.2", "layers.2")
    about = E.semantics(hooks, "pt-model", "it-model", {"seed": 3, "layer": 1, "train_r2": 0.5})
    assert "PT-to-IT delta" in about["output"] and "not the output of model.layers.1" in about["output"]
    assert about["surrogate"] == {"seed": 3, "train_r2": 0.5}
    stream = {"transformer_lens": "blocks.1.hook_resid_post", "hf_output_of": "model.layers.1",
              "hf_input_of": "model.layers.2", "sparsify_hookpoint": "layers.2"}
    assert about["input_hook"] == stream and about["output_hook"] == {**stream, "combine": "add"}
    cfg, t = E.saelens_layout(m, hooks, about)
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"], cfg["k"], cfg["apply_b_dec_to_input"]) == ("topk", 2, 3, 2, False)
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["hook_name_out"], meta["hf_hook_name"], meta["d_out"]) == (
        "blocks.1.hook_resid_post", "blocks.1.hook_resid_post", "model.layers.1", 2)
    assert meta["model_name"] == "pt-model" and meta["postdiff"] == about
    assert {k: tuple(v.shape) for k, v in t.items()} == {"W_enc": (2, 3), "b_enc": (3,), "W_dec": (3, 2), "b_dec": (2,)}
    # The folded encoder of hand_module (test_folded_encoder_known_answer), as SAELens lays it out: [d_in, d_sae].
    assert torch.equal(t["W_enc"], torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.5, 0.25]]))
    assert torch.equal(t["b_enc"], torch.tensor([0.0, -2.0, -1.0])) and torch.equal(t["W_dec"], m.W_dec)
    cfg, t = E.sparsify_layout(m, hooks, about)
    assert (cfg["transcode"], cfg["activation"], cfg["k"], cfg["num_latents"], cfg["d_in"]) == (True, "topk", 2, 3, 2)
    assert (cfg["hookpoint"], cfg["hf_hook_name"]) == ("layers.2", "model.layers.2") and cfg["postdiff"] == about
    assert {k: tuple(v.shape) for k, v in t.items()} == {"encoder.weight": (3, 2), "encoder.bias": (3,), "W_dec": (3, 2), "b_dec": (2,)}
    # sparsify's nn.Linear layout: [d_sae, d_in], the transpose of SAELens's.
    assert torch.equal(t["encoder.weight"], torch.tensor([[0.5, 0.0], [0.0, 0.5], [0.5, 0.25]]))
    assert torch.equal(t["encoder.bias"], torch.tensor([0.0, -2.0, -1.0])) and torch.equal(t["b_dec"], m.b_dec)


# ---------------------------------------------------------------- the stages on a written cache


def cache_rows(n_prompts: int, n_tokens: int) -> pl.DataFrame:
    return pl.DataFrame({"id": [f"p{i}" for i in range(n_prompts)], "prefix_ids": [[2, 5]] * n_prompts,
                         "token_ids": [[7] * n_tokens] * n_prompts})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A surrogate fitted briefly on a synthetic layer-1 cache of width 128, exported by both stages."""
    tmp = tmp_path_factory.mktemp("export")
    g = torch.Generator().manual_seed(0)
    n = 64 * 8
    h = 20 + 3 * torch.randn(n, D, generator=g)  # an offset mean, so the folded mu matters
    delta = torch.relu(h[:, :16] - 20).repeat(1, D // 16) + 0.1 * torch.randn(n, D, generator=g)
    shard = str(tmp / "train.safetensors")
    # The stage checks the cache against the pair it is told of (here PT as both models).
    write_shard(shard, {LAYER: (h, delta), 2: (h + 1, delta.clone())}, cache_rows(64, 8), {"pt": PT_PRINT, "it": PT_PRINT}, 0, 1)
    module, _ = fit(h, delta, h.mean(0), h.std(0), SurrogateConfig(expansion=2, k=8, lr=1e-2, batch_size=128, steps=30), seed=0)
    path = str(tmp / "L1.safetensors")
    save(module, path, {"layer": LAYER, "seed": 0, "n_train": n})
    saelens = {k: str(tmp / "saelens" / f) for k, f in
               (("cfg", "cfg.json"), ("weights", "sae_weights.safetensors"), ("sparsity", "sparsity.safetensors"))}
    params = {"layer": LAYER, "layers": [LAYER, 2], "pt": PT, "it": PT}
    E.export_saelens(Job(input={"module": path, "shards": [shard]}, output=saelens, params=params))
    sparsify = str(tmp / "sparsify")
    E.export_sparsify(Job(input={"modules": [path]}, output={"sparsify": sparsify}, params={**params, "layers": [LAYER]}))
    return {"module": module, "h": h, "saelens": saelens, "sparsify": sparsify, "path": path, "params": params}


def test_the_saelens_stage_writes_the_train_density(exported: dict) -> None:
    module, h, out = exported["module"], exported["h"], exported["saelens"]
    cfg = json.loads(Path(out["cfg"]).read_text())
    assert cfg["metadata"]["hf_hook_name"] == "model.layers.1" and cfg["metadata"]["postdiff"]["surrogate"]["n_train"] == len(h)
    assert cfg["metadata"]["postdiff"]["input_hook"]["hf_input_of"] == "model.layers.2"
    sparsity = load_file(out["sparsity"])["sparsity"]
    by_hand = torch.zeros(module.n_features)
    for row in module.encode(h):
        by_hand += (row > 0).float()
    assert torch.equal(firing_counts(module, h).float(), by_hand)
    # SAELens's trainer's formula in float32: a feature that fires on every row reads exactly 0.
    assert torch.equal(sparsity, torch.log10(by_hand / len(h) + 1e-10))
    assert (sparsity > -10).any()


def test_the_sparsify_stage_names_each_directory_by_its_hookpoint(exported: dict, tmp_path: Path) -> None:
    """One ``<hookpoint>/`` per layer, as sparsify's trainer saves them; for the multimodal wrapper
    the hookpoints carry ``language_model.``, and the last block's is the final norm."""
    module, root = exported["module"], Path(exported["sparsify"])
    assert sorted(p.name for p in root.iterdir()) == ["layers.2"]
    cfg = json.loads((root / "layers.2/cfg.json").read_text())
    assert (cfg["hookpoint"], cfg["hf_hook_name"], cfg["transcode"]) == ("layers.2", "model.layers.2", True)
    assert cfg["postdiff"]["output_hook"]["combine"] == "add"
    assert torch.equal(load_file(root / "layers.2/sae.safetensors")["W_dec"], module.W_dec.detach())
    last = str(tmp_path / "L3.safetensors")
    save(module, last, {"layer": 3})
    params = {**exported["params"], "pt": str(WRAPPED), "it": str(WRAPPED), "layers": [LAYER, 3]}
    E.export_sparsify(Job(input={"modules": [exported["path"], last]}, output={"sparsify": str(tmp_path / "out")}, params=params))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["language_model.layers.2", "language_model.norm"]
    for name in ("language_model.layers.2", "language_model.norm"):
        assert json.loads((tmp_path / "out" / name / "cfg.json").read_text())["hookpoint"] == name
    with pytest.raises(ValueError, match=r"1 surrogate files for layers \[1, 3\]"):
        E.export_sparsify(Job(input={"modules": [last]}, output={"sparsify": str(tmp_path / "x")}, params=params))


def test_the_stages_refuse_a_surrogate_that_does_not_fit_the_model(exported: dict, tmp_path: Path) -> None:
    params = exported["params"]
    out = {"sparsify": str(tmp_path / "out")}
    with pytest.raises(ValueError, match="layer 2: the surrogate file is layer 1's"):
        E.export_sparsify(Job(input={"modules": [exported["path"]]}, output=out, params={**params, "layers": [2]}))
    narrow = str(tmp_path / "narrow.safetensors")
    save(TopKSurrogate(8, 16, 2), narrow, {"layer": LAYER})
    with pytest.raises(ValueError, match=r"d=8\) does not fit .*\(4 blocks of width 128\)"):
        E.export_sparsify(Job(input={"modules": [narrow]}, output=out, params={**params, "layers": [LAYER]}))
    saelens = {k: str(tmp_path / f"s.{k}") for k in ("cfg", "weights", "sparsity")}
    with pytest.raises(ValueError, match="does not fit"):
        E.export_saelens(Job(input={"module": narrow, "shards": []}, output=saelens, params=params))
    assert not (tmp_path / "out").exists() and not Path(saelens["cfg"]).exists()


# ---------------------------------------------------------------- round trips through the libraries


def library(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed; the test extra installs it")
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")


def comparable_rows(module: TopKSurrogate, h: torch.Tensor) -> torch.Tensor:
    """Rows whose TopK set no float32 rounding can change: the k-th and (k+1)-th pre-activation
    differ by more than 1e-3, far above the folded encoder's rounding (~1e-5 here, the bound of
    test_folded_encoder_reproduces_pre_activations_with_a_large_mean)."""
    pre = torch.nn.functional.linear(module.standardise(h), module.W_enc, module.b_enc).detach()
    top = pre.topk(module.k + 1, dim=-1).values
    keep = top[:, -2] - top[:, -1] > 1e-3
    assert keep.float().mean() > 0.9  # nearly every row: the check below covers the cache
    return keep


def test_saelens_loads_the_export_and_reproduces_z_and_delta_hat(exported: dict) -> None:
    sae_lens = library("sae_lens")
    module, h = exported["module"], exported["h"]
    sae = sae_lens.SAE.load_from_disk(str(Path(exported["saelens"]["cfg"]).parent))
    keep = comparable_rows(module, h)
    with torch.no_grad():
        z, ours = sae.encode(h), module.encode(h)
        assert torch.equal(z[keep] > 0, ours[keep] > 0)  # the same active features, row by row
        # float32 on both sides, summed in different orders (folded vs standardised input):
        # 1e-4 relative covers the ~1e-6 rounding; a wrong fold moves values by O(1).
        torch.testing.assert_close(z[keep], ours[keep], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(sae.decode(z)[keep], module(h)[keep], rtol=1e-4, atol=1e-4)
    assert sae.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert "PT-to-IT delta" in sae.cfg.metadata.postdiff["output"]


def eager_sparsify(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """sparsify with its CPU decoder. It picks a Triton kernel at import whenever triton imports
    (CUDA builds of torch bring it), and that kernel has no CPU path."""
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    sparsify = library("sparsify")
    utils = importlib.import_module("sparsify.utils")
    assert utils.decoder_impl is utils.eager_decode, "sparsify was imported before SPARSIFY_DISABLE_TRITON was set"
    return sparsify


def test_sparsify_loads_the_export_and_reproduces_z_and_delta_hat(exported: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    sparsify = eager_sparsify(monkeypatch)
    module, h = exported["module"], exported["h"]
    coders = sparsify.SparseCoder.load_many(exported["sparsify"], local=True)
    assert list(coders) == ["layers.2"]  # keyed by the hookpoint whose input is block 1's output
    coder = coders["layers.2"]
    assert coder.cfg.transcode and coder.cfg.k == module.k and coder.num_latents == module.n_features
    keep = comparable_rows(module, h)
    with torch.no_grad():
        acts, idx, _ = coder.encode(h)
        z = torch.zeros(len(h), module.n_features).scatter(-1, idx, acts)
        ours = module.encode(h)
        assert torch.equal(z[keep] > 0, ours[keep] > 0)
        # Same tolerance and reason as for SAELens; sparsify takes ReLU before TopK, which only
        # changes the indices it reports for zero activations, not the dense code.
        torch.testing.assert_close(z[keep], ours[keep], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(coder.decode(acts, idx)[keep], module(h)[keep], rtol=1e-4, atol=1e-4)


def test_a_missing_library_fails_under_ci_and_is_skipped_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="not installed"):
        library("postdiff_no_such_library")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception):
        library("postdiff_no_such_library")


# ---------------------------------------------------------------- SAELens's own hooking on a Gemma 3 model


def boot_bridge() -> tuple:
    """The embedded PT (Gemma3ForCausalLM) in SAELens's SAETransformerBridge (TransformerLens 3),
    and the same Hugging Face model, whose blocks the bridge wraps in place. HookedSAETransformer
    cannot take it: HookedTransformer loads only the model names on TransformerLens's official
    list, and a local directory is none."""
    sae_lens = library("sae_lens")
    from postdiff.models.loading import load_model

    model, tok = load_model(PT, "float32", "cpu")
    return sae_lens.SAETransformerBridge.boot_transformers(PT, hf_model=model, tokenizer=tok, device="cpu"), model


@pytest.fixture(scope="module")
def bridged() -> tuple:
    """A bridge that no SAE is ever attached to: after add_sae and reset_saes, a hook added by the
    alias blocks.<l>.hook_resid_post silently never fires (TransformerLens 3.9, SAELens 6.54)."""
    return boot_bridge()


def teacher_forced(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from postdiff.models.template import teacher_forced_batch

    rows = token_rows(4, seed)
    ids, _, answers = teacher_forced_batch(rows["prefix_ids"].to_list(), rows["token_ids"].to_list(), pad_id=0)
    return ids, answers  # right padding after every answer position: causal attention never sees it


def test_saelens_with_the_error_term_leaves_pt_unchanged_and_carries_our_z(exported: dict) -> None:
    """add_sae(use_error_term=True) on the export's hook: PT's logits, and hook_sae_acts_post is our
    z of PT's stream there. Without the error term the stream would be replaced by the delta."""
    from sae_lens import SAE

    bridge, model = boot_bridge()
    sae = SAE.load_from_disk(str(Path(exported["saelens"]["cfg"]).parent))
    ids, _ = teacher_forced(1)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        h_pt = block_outputs(model, ids, torch.ones_like(ids), [LAYER])[LAYER]
        bridge.add_sae(sae, use_error_term=True)
        try:
            logits, cache = bridge.run_with_cache(ids, return_type="logits")
        finally:
            bridge.reset_saes()
        bridge.add_sae(sae, use_error_term=False)
        try:
            replaced = bridge(ids, return_type="logits")
        finally:
            bridge.reset_saes()
    # x - sae(x) + sae(x) rounds at float32 ulps of the stream: far below 1e-4 in the logits.
    torch.testing.assert_close(logits, plain, rtol=0, atol=1e-4)
    assert (replaced - plain).abs().max() > 1.0
    z = cache[bridge.get_sae_hook_name(sae)]
    torch.testing.assert_close(z, exported["module"].encode(h_pt), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["full", "add_mask", "minus_mask"])
def test_adding_the_decoded_delta_at_the_named_hook_reproduces_our_variants(exported: dict, bridged: tuple, mode: str) -> None:
    """Steering through SAELens's hook reproduces postdiff's own intervention (models.hook.intervene
    with method.variants.layer_delta) at answer positions: FullDelta adds alpha * decode(z);
    PT + M adds alpha * (decode(z * m) - b_dec), its features without b_dec; FullDelta - M adds
    alpha * decode(z * ~m)."""
    from postdiff.method.variants import feature_mask, layer_delta
    from postdiff.models.hook import LayerEdit, intervene
    from sae_lens import SAE

    bridge, model = bridged
    sae, module, alpha = SAE.load_from_disk(str(Path(exported["saelens"]["cfg"]).parent)), exported["module"], 0.75
    ids, answers = teacher_forced(2)
    mask = feature_mask(range(0, module.n_features, 3), module.n_features)
    sae_delta = {"full": lambda z: sae.decode(z),
                 "add_mask": lambda z: sae.decode(z * mask) - sae.b_dec,
                 "minus_mask": lambda z: sae.decode(z * ~mask)}[mode]

    def steer(act: torch.Tensor, hook: object) -> torch.Tensor:
        return torch.where(answers.unsqueeze(-1), act + alpha * sae_delta(sae.encode(act)), act)

    with torch.no_grad():
        # add_hook resolves the alias blocks.<l>.hook_resid_post (to blocks.<l>.hook_out);
        # TransformerLens 3.9's run_with_hooks silently drops a hook named by that alias.
        bridge.add_hook(sae.cfg.metadata.hook_name, steer)
        try:
            steered = bridge(ids, return_type="logits")
        finally:
            bridge.reset_hooks()
        with intervene(model, {LAYER: LayerEdit(alpha, layer_delta(mode, module, mask, None))}, answer_mask=answers):
            ours = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 0.1  # the edit moves the logits: the comparison has teeth
    torch.testing.assert_close(steered, ours, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- publishing


def test_the_published_repository_loads_with_saelens_from_pretrained(exported: dict, tmp_path: Path) -> None:
    """The Hub layout and the pretrained_saes.yaml entry, from a local copy in the Hugging Face
    cache's layout, offline: SAE.from_pretrained finds the SAE by release and id (with the entry as
    SAELens's whole registry) and by repo id, and gets the export's weights and the Neuronpedia id."""
    library("sae_lens")
    from postdiff.outputs.publish import publish

    hub, snippet, repo = tmp_path / "hub", tmp_path / "registry/pretrained_saes.yaml", "postdiff-test/delta-saes"
    params = {"saes": [[0, LAYER]], "repo_id": repo, "release": "postdiff-test-delta", "model_id": "google/gemma-3-4b-pt"}
    dashboards = tmp_path / "saedashboard.sh"
    publish(Job(input={"cfgs": [exported["saelens"]["cfg"]]},
                output={"hub": str(hub), "snippet": str(snippet), "dashboards": str(dashboards)}, params=params))
    command = dashboards.read_text().splitlines()[-1].split()
    assert command[:3] == ["python", "-m", "sae_dashboard.neuronpedia.neuronpedia_runner"]
    flag = dict(zip(command[3:], command[4:]))
    assert (flag["--sae-set"], flag["--sae-path"], flag["--np-set-name"]) == ("postdiff-test-delta", "hub/seed0/L1", "postdiff-delta-s0")
    assert (hub / flag["--sae-path"].removeprefix("hub/") / "cfg.json").is_file() and "--from-local-sae" in command
    assert sorted(p.relative_to(hub).as_posix() for p in hub.rglob("*") if p.is_file()) == [
        "README.md", "seed0/L1/cfg.json", "seed0/L1/sae_weights.safetensors", "seed0/L1/sparsity.safetensors"]
    assert yaml.safe_load(snippet.read_text()) == {"postdiff-test-delta": {
        "repo_id": repo, "model": "google/gemma-3-4b-pt",
        "saes": [{"id": "seed0/L1", "path": "seed0/L1", "l0": 8, "neuronpedia": "gemma-3-4b-pt/1-postdiff-delta-s0"}]}}
    revision = "0" * 40
    cached = tmp_path / "hf/hub/models--postdiff-test--delta-saes"
    shutil.copytree(hub, cached / "snapshots" / revision)
    (cached / "refs").mkdir()
    (cached / "refs/main").write_text(revision)
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        import torch
        import sae_lens.loading.pretrained_saes_directory as registry
        registry.files = lambda package: Path(sys.argv[1])  # the snippet as SAELens's registry
        from sae_lens import SAE
        by_release = SAE.from_pretrained("postdiff-test-delta", "seed0/L1")
        by_repo = SAE.from_pretrained(sys.argv[2], "seed0/L1")
        print(by_release.cfg.metadata.neuronpedia_id)
        torch.save({"release": by_release.state_dict(), "repo": by_repo.state_dict()}, sys.argv[3])
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(snippet.parent), repo, str(tmp_path / "loaded.pt")],
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "gemma-3-4b-pt/1-postdiff-delta-s0"
    exported_weights = load_file(exported["saelens"]["weights"])
    for state in torch.load(tmp_path / "loaded.pt").values():
        for name, tensor in exported_weights.items():
            assert torch.equal(state[name], tensor), name
