import math
from pathlib import Path

import polars as pl
import pytest
import torch

from postdiff.method.cache import write_shard
from postdiff.method.standardise import standardiser
from postdiff.method.surrogate import (
    SurrogateConfig,
    TopKSurrogate,
    dead_fraction,
    fit,
    layer_metrics,
    load,
    loss_gradients,
    r2,
    save,
    train_layer,
)
from postdiff.workflow.runtime import Job

D_IN, F_TRUE = 16, 32
FAST = SurrogateConfig(expansion=4, k=8, lr=1e-2, batch_size=256, steps=400)


def synthetic(n: int, seed: int, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``delta`` from a known dictionary: ~3 of 32 thresholded-ReLU features of ``h`` per row."""
    dictionary = torch.Generator().manual_seed(0)
    W = torch.randn(F_TRUE, D_IN, generator=dictionary)
    W /= W.norm(dim=1, keepdim=True)
    D = torch.randn(D_IN, F_TRUE, generator=dictionary)
    D /= D.norm(dim=0)
    g = torch.Generator().manual_seed(seed)
    h = 3 * torch.randn(n, D_IN, generator=g) + 1
    z = (((h - 1) / 3) @ W.T - 1.3).relu()
    delta = z @ D.T + 0.5 + 0.01 * torch.randn(n, D_IN, generator=g)
    return h, scale * delta



@pytest.fixture(scope="module")
def data():
    h, delta = synthetic(4096, seed=1)
    return h, delta, h.mean(0), h.std(0)


@pytest.fixture(scope="module")
def fitted(data):
    h, delta, mu, sigma = data
    return fit(h, delta, mu, sigma, FAST, seed=0)


def random_module(d=6, n=12, k=3, seed=0) -> TopKSurrogate:
    g = torch.Generator().manual_seed(seed)
    m = TopKSurrogate(d, n, k, mu=torch.randn(d, generator=g), sigma=torch.rand(d, generator=g) + 0.5)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_topk_keeps_exactly_k_largest_per_row():
    m = random_module()
    with torch.no_grad():
        m.b_enc.fill_(100.0)  # every pre-activation positive, so exactly k survive
    h = torch.randn(2, 5, 6)
    z = m.encode(h)
    assert z.shape == (2, 5, 12)
    assert ((z > 0).sum(-1) == 3).all()
    pre = torch.nn.functional.linear(m.standardise(h), m.W_enc, m.b_enc)
    kth = pre.topk(3, dim=-1).values[..., -1:]
    assert torch.equal(z > 0, pre >= kth)
    assert torch.equal(z[z > 0], pre[z > 0])  # encode runs this same F.linear


# One gather block, or (a tiny CPU_BLOCK) one slot per block.
@pytest.fixture(params=[1 << 18, 1], ids=["one-block", "slot-blocks"])
def block(request, monkeypatch):
    monkeypatch.setattr("postdiff.method.surrogate.CPU_BLOCK", request.param)


@pytest.mark.parametrize("k", [3, 40])
@pytest.mark.parametrize("with_dead", [False, True], ids=["mse", "mse+auxk"])
def test_loss_gradients_equal_autograd_of_the_dense_loss(k, with_dead, block):
    m = random_module(d=6, n=64, k=k)
    g = torch.Generator().manual_seed(2)
    x, target = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    with torch.no_grad():
        m.b_enc.sub_(4.0)  # some chosen pre-activations negative: the ReLU's zero gradient
        pre = x @ m.W_enc.T + m.b_enc
        idx = pre.topk(k, dim=-1).indices
    ids = torch.tensor([3, 17, 40])  # AuxK's dead features
    z = torch.rand(5, 3, generator=g)
    dead = (z, ids, 0.7) if with_dead else None
    for p in m.parameters():
        p.grad = torch.full_like(p, float("nan"))  # every entry must be overwritten
    with torch.no_grad():
        mse, aux = loss_gradients(m, x, target, idx, pre.gather(1, idx).relu(), dead)
    ours = {name: p.grad.clone() for name, p in m.named_parameters()}

    for p in m.parameters():
        p.grad = None
    vals = (x @ m.W_enc.T + m.b_enc).gather(1, idx).relu()
    err = target - (torch.zeros(5, 64).scatter(1, idx, vals) @ m.D.T + m.b_dec)
    dense_aux = (torch.zeros(5, 64).index_copy(1, ids, z) @ m.D.T - err.detach()).pow(2).mean()
    loss = err.pow(2).mean() + (0.7 * dense_aux if with_dead else 0)
    loss.backward()
    # Closed form (embedding_bag over k slots) against dense autograd: the same fp32 sums in
    # another order. Measured under default, avx2 and avx512: losses of size <= 16 within 2.2e-7
    # relative (torch.allclose's default 1e-5); gradients of size <= 5.9 within 9.5e-7, 11% of
    # atol 1e-6 + rtol 1e-5.
    assert torch.allclose(mse, err.pow(2).mean()) and torch.allclose(aux, dense_aux if with_dead else torch.tensor(0.0))
    assert (vals == 0).any() and (vals > 0).any()
    for name, p in m.named_parameters():
        assert torch.allclose(ours[name], p.grad, atol=1e-6), name


def test_encode_standardises_with_mu_sigma():
    m = TopKSurrogate(2, 2, 2, mu=torch.tensor([1.0, -2.0]), sigma=torch.tensor([2.0, 4.0]))
    with torch.no_grad():
        m.W_enc.copy_(torch.eye(2))
    z = m.encode(torch.tensor([[5.0, 10.0], [-1.0, -2.0]]))
    assert torch.equal(z, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def test_fresh_module_predicts_zero_and_forward_matches_decode_of_encode():
    assert torch.equal(TopKSurrogate(4, 8, 2)(torch.randn(3, 4)), torch.zeros(3, 4))
    m = random_module()
    h = torch.randn(4, 7, 6)
    # k-slot embedding_bag against a dense matmul over F = 12: another fp32 summation order,
    # outputs of size <= 46 within 3.8e-6 (measured under default, avx2 and avx512).
    assert torch.allclose(m(h), m.decode(m.encode(h)), atol=1e-5)


def test_masked_decode_full_empty_and_per_row():
    m = random_module()
    z = m.encode(torch.randn(4, 6))
    full, empty = torch.ones(12, dtype=torch.bool), torch.zeros(12, dtype=torch.bool)
    # (x + b_dec) - b_dec rounds x at size ~30 (ulp 1.9e-6): measured within 2.4e-7, and
    # torch.allclose's default rtol 1e-5 adds 3e-4 there.
    assert torch.allclose(m.masked_decode(z, full), m.decode(z) - m.b_dec, atol=1e-6)
    assert torch.equal(m.masked_decode(z, empty), torch.zeros(4, 6))
    one = empty.clone()
    j = int((z > 0).sum(0).argmax())  # a feature that fires, so the comparison is not 0 == 0
    one[j] = True
    # Exact: every other term of the matmul is a zero product.
    assert (z[:, j] > 0).any() and torch.equal(m.masked_decode(z, one), z[:, j : j + 1] * m.D[:, j])
    rows = torch.rand(4, 12, generator=torch.Generator().manual_seed(1)) > 0.5
    expected = torch.stack([m.masked_decode(z[i], rows[i]) for i in range(4)])
    # A [4, F] matmul against four [F] ones, and below [4, 3, F] against [4, F]: kernels of
    # other shapes may sum in another order; measured bit-identical under all three capabilities.
    assert torch.allclose(m.masked_decode(z, rows), expected, atol=1e-6)
    z3 = m.encode(torch.randn(4, 3, 6))  # [b, t, F] with a per-row [b, F] mask
    assert torch.allclose(m.masked_decode(z3, rows)[:, 2], m.masked_decode(z3[:, 2], rows), atol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        m.masked_decode(z, torch.ones(11, dtype=torch.bool))


def test_r2_and_dead_fraction_known_answers():
    m = TopKSurrogate(2, 3, 2)
    with torch.no_grad():
        m.W_enc.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
        m.D.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    h = torch.rand(50, 2, generator=torch.Generator().manual_seed(0)) + 0.1  # positive: forward(h) = h
    assert r2(m, h, h, h.mean(0)) == 1.0  # exact: identity weights, so SSE is 0.0
    assert r2(m, h, 2 * h, (2 * h).mean(0)) < 1.0
    mean_only = TopKSurrogate(2, 3, 2)
    with torch.no_grad():
        mean_only.b_dec.copy_(h.mean(0))
    assert r2(mean_only, h, h, h.mean(0)) == 0.0  # exact: it predicts the very mean SST uses
    assert dead_fraction(m, h) == 1 / 3  # a count: feature 2 is negative on every row
    assert math.isnan(r2(mean_only, h, torch.ones_like(h), torch.ones(2)))


def test_fit_recovers_a_known_sparse_dictionary(data, fitted):
    _, delta, _, _ = data
    module, curve = fitted
    h_test, delta_test = synthetic(2048, seed=2)
    # Trained numbers: test R^2 0.99052 under default, 0.99057 under avx2 and avx512; the last
    # 20 steps' MSE is 0.0098 / 0.0097 of the first 20's. The bounds sit far from both.
    assert r2(module, h_test, delta_test, delta.mean(0)) > 0.9
    assert curve.columns == ["step", "loss", "mse", "aux"] and curve.height == FAST.steps
    assert curve["mse"][-20:].mean() < 0.2 * curve["mse"][:20].mean()


def test_fit_is_seeded_and_scale_equivariant(data, fitted):
    h, delta, mu, sigma = data
    cfg = SurrogateConfig(expansion=2, k=4, lr=1e-2, batch_size=128, steps=40)
    a, curve_a = fit(h, delta, mu, sigma, cfg, seed=3)
    b, curve_b = fit(h, delta, mu, sigma, cfg, seed=3)
    c, _ = fit(h, delta, mu, sigma, cfg, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert curve_a.equals(curve_b)
    assert not torch.equal(a.W_enc, c.W_enc)
    # Training on the delta divided by its scale makes the fit blind to units.
    big, _ = fit(h, 1000 * delta, mu, sigma, cfg, seed=3)
    # Equivariant in exact arithmetic; 40 fp32 Adam steps round differently at the two scales.
    # Measured under default, avx2 and avx512: at most 2.4e-4 apart at outputs of size ~1e3
    # (1.2e-5 relative), 80x inside rtol 1e-3.
    assert torch.allclose(big(h[:64]), 1000 * a(h[:64]), rtol=1e-3, atol=1e-2)


def test_fit_on_a_bf16_cache_trains_in_fp32(data):
    """Caches of real pairs are stored in bf16; training upcasts each batch, so the module and
    its optimiser state are fp32 and equal a fit on the same values given as fp32."""
    h, delta, mu, sigma = data
    h16, d16 = h.bfloat16(), delta.bfloat16()
    cfg = SurrogateConfig(expansion=2, k=4, lr=1e-2, batch_size=128, steps=30)
    from_bf16, curve_bf16 = fit(h16, d16, mu, sigma, cfg, seed=0)
    from_fp32, curve_fp32 = fit(h16.float(), d16.float(), mu, sigma, cfg, seed=0)
    assert {p.dtype for p in from_bf16.parameters()} == {torch.float32}
    assert all(torch.equal(x, y) for x, y in zip(from_bf16.state_dict().values(), from_fp32.state_dict().values()))
    assert curve_bf16.equals(curve_fp32)


def test_auxk_gives_dead_features_a_loss():
    h, delta = synthetic(2048, seed=5)
    # Far more features than the data needs and k=1: many never fire and die after 5 steps.
    cfg = SurrogateConfig(expansion=16, k=1, lr=1e-2, batch_size=128, steps=60, dead_steps=5, auxk_coef=0.5)
    _, curve = fit(h, delta, h.mean(0), h.std(0), cfg, seed=0)
    assert (curve["aux"][:5] == 0).all() and (curve["aux"][5:] > 0).any()
    # The fp32 loss against a float64 sum of its fp32 parts: a rounding or two, measured 6e-8.
    assert curve["loss"].to_numpy() == pytest.approx((curve["mse"] + 0.5 * curve["aux"]).to_numpy(), rel=1e-5)
    _, off = fit(h, delta, h.mean(0), h.std(0), SurrogateConfig(**{**cfg.__dict__, "auxk_coef": 0.0}), seed=0)
    assert (off["aux"] == 0).all()


def test_save_load_round_trip(tmp_path, fitted):
    module, _ = fitted
    save(module, tmp_path / "m.safetensors", {"layer": 2, "note": "x"})
    back, meta = load(tmp_path / "m.safetensors")
    assert meta == {"layer": 2, "note": "x"} and back.k == module.k
    for name, t in module.state_dict().items():
        assert torch.equal(t, back.state_dict()[name]), name
    h = torch.randn(5, D_IN)
    assert torch.equal(back(h), module(h))
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.safetensors")


def test_config_validation_and_params():
    cfg = SurrogateConfig.from_params({"k": 4, "steps": 10, "layer": 3, "seed": 1})
    assert (cfg.k, cfg.steps, cfg.expansion) == (4, 10, 8)
    with pytest.raises(ValueError, match="k"):
        SurrogateConfig(k=0)
    with pytest.raises(ValueError, match="k=9"):
        TopKSurrogate(2, 8, 9)


def test_train_layer_and_layer_metrics_stages(tmp_path, data):
    h, delta, _, _ = data
    fps = {"pt": "a", "it": "b"}
    paths = {}
    for split, (lo, hi) in {"train": (0, 3000), "calib": (3000, 3500), "selector": (3500, 4096)}.items():
        n = hi - lo
        # Stand-in rows: one prompt per 4 positions (the cache stores positions, not tokens).
        rows = pl.DataFrame({"id": [f"{split}{i}" for i in range(n // 4)], "prefix_ids": [[2, 5]] * (n // 4),
                             "token_ids": [[7, 8, 9, 1]] * (n // 4)})
        hi = lo + 4 * (n // 4)
        caches = {3: (h[lo:hi], delta[lo:hi]), 5: (h[lo:hi] + 1, delta[lo:hi].clone())}
        paths[split] = [str(tmp_path / f"{split}.safetensors")]
        write_shard(paths[split][0], caches, rows, fps, 0, 1)
    std = str(tmp_path / "std.safetensors")
    standardiser(Job(input={"shards": paths["train"]}, output={"standardiser": std}, params={"layers": [3, 5]}))
    out = {k: str(tmp_path / f"out.{k}") for k in ("module", "curve", "curve_png")}
    params = {"layer": 3, "layers": [3, 5], "seed": 0, "device": "cpu", **FAST.__dict__, "steps": 100}
    train_layer(Job(input={"shards": paths["train"], "standardiser": std}, output=out, params=params))
    module, meta = load(out["module"])
    assert meta["layer"] == 3 and meta["config"]["steps"] == 100 and meta["n_train"] == 3000
    # The standardiser's float64 mean rounded to fp32: a few fp32 ulp at most; measured identical.
    assert torch.allclose(module.mu, h[:3000].double().mean(0).float(), rtol=1e-6, atol=0)
    assert pl.read_parquet(out["curve"]).height == 100
    assert Path(out["curve_png"]).read_bytes()[:4] == b"\x89PNG"
    metrics_path = str(tmp_path / "metrics.parquet")
    layer_metrics(Job(input={"module": out["module"], "standardiser": std, **paths}, output={"metrics": metrics_path},
                      params={"layer": 3, "layers": [3, 5], "device": "cpu"}))
    metrics = pl.read_parquet(metrics_path)
    assert metrics["split"].to_list() == ["train", "calib", "selector"]
    # Exact: the same r2 of the same rows, module and mean; the JSON metadata keeps the float.
    assert metrics["r2"][0] == meta["train_r2"] and (metrics["r2"] > 0.5).all()
    with pytest.raises(ValueError, match="layers"):
        train_layer(Job(input={"shards": paths["train"], "standardiser": std}, output=out, params={**params, "layers": [3]}))


def test_a_zero_b_dec_stays_zero_and_the_features_carry_all_of_delta():
    """``b_dec: zero`` (the positive control's): on a delta that is exactly 0 where no feature
    fires, b_dec is held at 0 through training, so the sum over every feature (a full mask,
    SPEC §6: no b_dec) is the whole prediction. Trained ``b_dec`` on the same data moves off 0."""
    h, delta = synthetic(4096, seed=1)
    delta = delta - 0.5  # the generator's offset: delta is now the features' sum plus noise
    cfg = SurrogateConfig(expansion=4, k=8, lr=1e-2, batch_size=256, steps=200, b_dec="zero")
    zero, _ = fit(h, delta, h.mean(0), h.std(0), cfg, seed=0)
    trained, _ = fit(h, delta, h.mean(0), h.std(0), SurrogateConfig(**{**cfg.__dict__, "b_dec": "train"}), seed=0)
    assert torch.equal(zero.b_dec, torch.zeros_like(zero.b_dec)) and trained.b_dec.abs().max() > 0
    z = zero.encode(h[:64])
    every = torch.ones(zero.n_features, dtype=torch.bool)
    assert torch.allclose(zero.masked_decode(z, every), zero(h[:64]), atol=1e-5)
    h_test, delta_test = synthetic(2048, seed=2)
    assert r2(zero, h_test, delta_test - 0.5, delta.mean(0)) > 0.8
    with pytest.raises(ValueError, match="b_dec"):
        SurrogateConfig(b_dec="mean")
