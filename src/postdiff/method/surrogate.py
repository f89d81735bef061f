"""The per-layer TopK sparse surrogate of the answer-phase delta (SPEC §5).

``x = (h - mu) / sigma``, ``u = ReLU(W_enc x + b_enc)``, ``z = TopK(u, k)``,
``delta_hat = D z + b_dec``. Decoder columns start unit-norm and then train freely: with
TopK the split of a feature's size between ``z_j`` and ``||D_j||`` is arbitrary, and pinning
``||D_j|| = 1`` (the encoder then has to carry every magnitude) trained slower and left more
features dead on the benchmark cache. A feature's size is therefore ``|z_j| * ||D_j||``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from postdiff.method.cache import Expect, load_split
from postdiff.method.standardise import load_standardiser
from postdiff.models.loading import pick_device
from postdiff.models.preflight import fingerprints
from postdiff.workflow.io import atomic_path, read_safetensors, write_parquet
from postdiff.workflow.runtime import Job

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

FORMAT = "postdiff-topk/1"


@dataclass(frozen=True)
class SurrogateConfig:
    expansion: int = 8
    k: int = 16
    lr: float = 1e-3
    batch_size: int = 256
    steps: int = 2000
    aux_k: int | None = None  # None: d // 2, the heuristic of Gao et al. (2024), App. B.1
    auxk_coef: float = 1 / 32
    dead_steps: int = 200  # a feature that has not fired for this many steps is dead
    b_dec: str = "train"  # "train": from the mean of delta; "zero": held at 0

    def __post_init__(self) -> None:
        for name in ("expansion", "k", "batch_size", "steps", "dead_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"surrogate config: {name} must be >= 1, got {getattr(self, name)}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"surrogate config: aux_k must be >= 1 or null, got {self.aux_k}")
        if self.b_dec not in ("train", "zero"):
            raise ValueError(f"surrogate config: b_dec must be 'train' or 'zero', got {self.b_dec!r}")
        if not self.lr > 0 or self.auxk_coef < 0:
            raise ValueError(f"surrogate config: need lr > 0 and auxk_coef >= 0, got {self.lr}, {self.auxk_coef}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SurrogateConfig:
        """The config keys present in ``params``; other keys (layer, seed, ...) are ignored."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


def _by_feature(idx: Tensor) -> tuple[Tensor, Tensor]:
    """The ``(feature, row)`` pairs of an ``[N, k]`` selection as coalesced COO indices
    (sorted by feature; a row never repeats a feature), and the order of ``idx``'s flat
    entries that sorts them so."""
    features, order = idx.reshape(-1).sort(stable=True)  # flat entries run row by row
    return torch.stack([features, order // idx.shape[1]]), order


def _outer_sum_into(out: Tensor, pairs: tuple[Tensor, Tensor], weights: Tensor, vectors: Tensor) -> None:
    """Set row ``f`` of ``[F, d]`` ``out`` to the sum of ``weights[n, j] * vectors[n]`` over the
    (n, j) with ``idx[n, j] = f`` (``pairs = _by_feature(idx)``): a sparse ``[F, N]`` times
    dense ``[N, d]`` product, with no ``[N, k, d]`` temporary and no fresh output."""
    indices, order = pairs
    sparse = torch.sparse_coo_tensor(
        indices, weights.reshape(-1)[order], (out.shape[0], vectors.shape[0]), is_coalesced=True, check_invariants=False
    )
    torch.addmm(out, sparse, vectors, beta=0, out=out)


# _row_dots gathers the rows it needs a few slots at a time: on the CPU in blocks of about 1 MB
# (in the benchmark's training loop 5 of 16 slots at a time took 0.6 ms a step, all 16 at once
# 0.9 ms), on an accelerator in large blocks, since each block costs three kernel launches.
CPU_BLOCK = 1 << 18
ACCELERATOR_BLOCK = 1 << 24


def _row_dots(table: Tensor, idx: Tensor, vectors: Tensor) -> Tensor:
    """``[N, k]`` with entry ``(n, j)`` = ``table[idx[n, j]] . vectors[n]``."""
    n, k = idx.shape
    budget = CPU_BLOCK if table.device.type == "cpu" else ACCELERATOR_BLOCK
    slots = max(1, budget // (n * table.shape[1]))
    parts = []
    for j in range(0, k, slots):
        block = idx[:, j : j + slots]
        rows = table.index_select(0, block.reshape(-1)).view(*block.shape, -1)
        parts.append(rows.mul_(vectors[:, None, :]).sum(-1))
    return torch.cat(parts, 1)


class TopKSurrogate(nn.Module):
    """Starts at zero (``delta_hat = 0``); :func:`fit` initialises and trains it."""

    def __init__(self, d: int, n_features: int, k: int, mu: Tensor | None = None, sigma: Tensor | None = None):
        super().__init__()
        if not 1 <= k <= n_features:
            raise ValueError(f"TopKSurrogate: need 1 <= k <= n_features, got k={k}, n_features={n_features}")
        self.k = int(k)
        self.register_buffer("mu", torch.zeros(d) if mu is None else mu.detach().float().clone())
        self.register_buffer("sigma", torch.ones(d) if sigma is None else sigma.detach().float().clone())
        if self.mu.shape != (d,) or self.sigma.shape != (d,):
            raise ValueError(f"TopKSurrogate: mu/sigma must have shape [{d}], got {tuple(self.mu.shape)}, {tuple(self.sigma.shape)}")
        if not bool((self.sigma > 0).all()):
            raise ValueError("TopKSurrogate: sigma must be positive (floor it in the standardiser)")
        self.W_enc = nn.Parameter(torch.zeros(n_features, d))
        self.b_enc = nn.Parameter(torch.zeros(n_features))
        # The decoder is trained feature-major, one row per feature: the table embedding_bag
        # needs, and contiguous for fused Adam (a strided one is copied every step).
        self.W_dec = nn.Parameter(torch.zeros(n_features, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    @property
    def D(self) -> Tensor:
        """The paper's ``[d, F]`` decoder, column ``j`` the direction of feature ``j``."""
        return self.W_dec.T

    @property
    def d(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n_features(self) -> int:
        return self.W_dec.shape[0]

    def standardise(self, h: Tensor) -> Tensor:
        return (h.to(self.mu.dtype) - self.mu) / self.sigma

    def sparse_code(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` of raw ``h`` as its k (value, feature index) pairs per row."""
        pre = F.linear(self.standardise(h), self.W_enc, self.b_enc)
        idx = pre.detach().topk(self.k, dim=-1, sorted=False).indices
        return pre.gather(-1, idx).relu(), idx

    def sparse_decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """``sum_j D[:, idx_j] vals_j`` (no ``b_dec``) for ``[..., k]`` values and indices."""
        k = idx.shape[-1]
        out = F.embedding_bag(idx.reshape(-1, k), self.W_dec, per_sample_weights=vals.reshape(-1, k), mode="sum")
        return out.reshape(*vals.shape[:-1], self.d)

    def encode(self, h: Tensor) -> Tensor:
        vals, idx = self.sparse_code(h)
        return torch.zeros(*vals.shape[:-1], self.n_features, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, h: Tensor) -> Tensor:
        return self.sparse_decode(*self.sparse_code(h)) + self.b_dec

    def masked_decode(self, z: Tensor, mask: Tensor) -> Tensor:
        """``sum_{j in mask} D_j z_j``; ``mask`` is ``[F]`` or one row per batch row ``[b, F]``."""
        if mask.dtype != torch.bool or mask.shape[-1] != self.n_features or mask.dim() not in (1, 2):
            raise ValueError(f"masked_decode: mask must be bool [F] or [b, F] with F={self.n_features}, got {mask.dtype} {tuple(mask.shape)}")
        if mask.dim() == 2:
            if z.dim() < 2 or z.shape[0] != mask.shape[0]:
                raise ValueError(f"masked_decode: per-row mask {tuple(mask.shape)} does not match z {tuple(z.shape)}")
            mask = mask.reshape(mask.shape[0], *([1] * (z.dim() - 2)), self.n_features)
        return (z * mask) @ self.W_dec


def loss_gradients(
    module: TopKSurrogate, x: Tensor, target: Tensor, idx: Tensor, vals: Tensor,
    dead: tuple[Tensor, Tensor, float] | None = None,
) -> tuple[Tensor, Tensor]:
    """The training loss's gradient in closed form, written into each parameter's ``.grad``.

    ``x`` is the standardised ``[N, d]`` batch, ``idx`` its TopK features and ``vals`` their
    ReLU pre-activations; ``err = target - delta_hat``. The loss is ``mean(err^2)`` plus, with
    ``dead = (z, ids, weight)``, ``weight * mean((z @ D[:, ids].T - err)^2)`` for a dense
    AuxK code ``z`` over the dead features ``ids``, with ``err`` held fixed there. Only the
    chosen (and dead) features' rows are touched: no dense ``[N, F]`` gradient, no autograd
    graph, and no fresh parameter-sized buffer each step. Returns ``mean(err^2)`` and the
    unweighted AuxK mean (0 without ``dead``).
    """
    err = target - module.b_dec - module.sparse_decode(vals, idx)
    grad_out = err * (-2 / err.numel())  # d mean(err^2) / d delta_hat
    pairs = _by_feature(idx)
    torch.sum(grad_out, 0, out=module.b_dec.grad)
    _outer_sum_into(module.W_dec.grad, pairs, vals, grad_out)
    aux = err.new_zeros(())
    if dead is not None:
        z, ids, weight = dead
        residual = z @ module.W_dec[ids] - err
        aux = residual.pow(2).mean()
        module.W_dec.grad.index_add_(0, ids, z.T @ residual, alpha=2 * weight / err.numel())
    g = _row_dots(module.W_dec, idx, grad_out).mul_(vals > 0)  # through the ReLU
    _outer_sum_into(module.W_enc.grad, pairs, g, x)
    module.b_enc.grad.zero_().index_add_(0, idx.reshape(-1), g.reshape(-1))
    return err.pow(2).mean(), aux


def _init(module: TopKSurrogate, b_dec: Tensor, generator: torch.Generator) -> None:
    d, n = module.d, module.n_features
    bound = 1 / math.sqrt(d)  # nn.Linear's default scale, so pre-activations start at O(1)
    with torch.no_grad():
        module.W_enc.copy_(torch.empty(n, d).uniform_(-bound, bound, generator=generator))
        module.b_enc.zero_()
        D = torch.randn(d, n, generator=generator)
        module.D.copy_(D / D.norm(dim=0, keepdim=True))
        module.b_dec.copy_(b_dec)


@torch.no_grad()
def fit(
    h_pt: Tensor, delta: Tensor, mu: Tensor, sigma: Tensor, cfg: SurrogateConfig, seed: int
) -> tuple[TopKSurrogate, pl.DataFrame]:
    """Train a surrogate on ``[N, d]`` caches; it lives on ``h_pt``'s device.

    The target is ``delta / s`` with ``s`` the RMS of centred delta, so one learning rate
    suits any model's activation scale; ``s`` is folded into ``D, b_dec`` at the end (exact:
    ``delta_hat`` is linear in them), which leaves ``z`` in model-independent units. The curve
    is in the training units: ``mse`` 1.0 is what predicting the mean achieves.
    """
    if h_pt.dim() != 2 or h_pt.shape != delta.shape or h_pt.shape[0] == 0:
        raise ValueError(f"fit: h_pt and delta must be equal non-empty [N, d], got {tuple(h_pt.shape)}, {tuple(delta.shape)}")
    n, d = h_pt.shape
    device = h_pt.device
    n_features = cfg.expansion * d
    aux_k = min(cfg.aux_k or d // 2, n_features)
    batch = min(cfg.batch_size, n)
    generator = torch.Generator().manual_seed(int(seed))

    var, delta_mean = torch.var_mean(delta.float(), dim=0, correction=0)
    scale = float(var.mean().sqrt())
    if not math.isfinite(scale):
        raise ValueError("fit: delta has non-finite values")
    scale = scale if scale > 0 else 1.0
    module = TopKSurrogate(d, n_features, cfg.k, mu, sigma)
    fixed = cfg.b_dec == "zero"
    _init(module, torch.zeros_like(delta_mean) if fixed else delta_mean / scale, generator)
    module.to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, fused=True)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # overwritten in place every step by loss_gradients

    since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
    order, cursor = torch.randperm(n, generator=generator), 0
    history = torch.zeros(cfg.steps, 3, device=device)
    pre = torch.empty(batch, n_features, device=device)  # one buffer, not a fresh one to fault in per step
    for step in tqdm(range(cfg.steps), desc="fit surrogate", mininterval=2.0):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        rows = order[cursor : cursor + batch].to(device)
        cursor += batch
        target = delta[rows].float() / scale
        x = module.standardise(h_pt[rows])
        torch.addmm(module.b_enc, x, module.W_enc.T, out=pre)
        idx = pre.topk(cfg.k, dim=-1, sorted=False).indices
        vals = pre.gather(1, idx).relu_()
        dead = since_fired >= cfg.dead_steps
        n_dead = int(dead.sum()) if cfg.auxk_coef > 0 else 0
        aux_scale, aux_term = 0.0, None
        if n_dead:
            # AuxK: the largest dead pre-activations try to explain what the live ones
            # missed, which gives dead features' decoders a gradient again. With few dead
            # features the term is scaled down, not padded with live ones. Their encoders
            # get no AuxK gradient (as in sparsify): on bench/topk_vs_sparsify.py passing
            # it left 18% of features dead instead of 4%, at equal R^2 and 30% more time.
            dead_ids = dead.nonzero().squeeze(1)
            z_dead = pre.index_select(1, dead_ids).relu_()
            if n_dead > aux_k:
                kept = z_dead.topk(aux_k, dim=-1, sorted=False)
                z_dead = torch.zeros_like(z_dead).scatter_(1, kept.indices, kept.values)
            aux_scale = min(n_dead / aux_k, 1.0)
            aux_term = (z_dead, dead_ids, cfg.auxk_coef * aux_scale)
        mse, aux = loss_gradients(module, x, target, idx, vals, aux_term)
        if fixed:
            module.b_dec.grad.zero_()  # Adam moves nothing with a zero gradient from the start
        aux = aux_scale * aux
        opt.step()
        fired = torch.zeros(n_features, dtype=torch.bool, device=device)
        fired[idx[vals > 0]] = True
        since_fired.add_(1).masked_fill_(fired, 0)
        history[step] = torch.stack([mse + cfg.auxk_coef * aux, mse, aux])

    module.W_dec.mul_(scale)
    module.b_dec.mul_(scale)
    h = history.cpu()
    curve = pl.DataFrame(
        {"step": pl.Series(range(1, cfg.steps + 1), dtype=pl.Int64), "loss": h[:, 0].tolist(), "mse": h[:, 1].tolist(), "aux": h[:, 2].tolist()}
    )
    return module, curve


@torch.no_grad()
def r2(module: TopKSurrogate, h: Tensor, delta: Tensor, delta_mean_train: Tensor, batch_size: int = 4096) -> float:
    """``1 - SSE/SST`` with SST about the train mean of delta; NaN when SST is zero."""
    if h.shape != delta.shape or h.dim() != 2:
        raise ValueError(f"r2: h and delta must be equal [N, d], got {tuple(h.shape)}, {tuple(delta.shape)}")
    device = module.b_dec.device
    mean = delta_mean_train.to(device, torch.float64)
    sse = sst = 0.0
    for i in range(0, h.shape[0], batch_size):
        target = delta[i : i + batch_size].to(device, torch.float64)
        sse += float((target - module(h[i : i + batch_size].to(device)).double()).pow(2).sum())
        sst += float((target - mean).pow(2).sum())
    if sst == 0:
        log.warning("r2: delta equals its train mean everywhere; R^2 undefined")
        return math.nan
    return 1 - sse / sst


@torch.no_grad()
def firing_counts(module: TopKSurrogate, h: Tensor, batch_size: int = 4096) -> Tensor:
    """``[F]`` int64: on how many rows of ``h`` each feature fires (``z_j > 0``)."""
    device = module.b_dec.device
    counts = torch.zeros(module.n_features, dtype=torch.int64, device=device)
    for i in range(0, h.shape[0], batch_size):
        vals, idx = module.sparse_code(h[i : i + batch_size].to(device))
        fired = idx[vals > 0]
        counts.index_add_(0, fired, torch.ones_like(fired))
    return counts.cpu()


def dead_fraction(module: TopKSurrogate, h: Tensor, batch_size: int = 4096) -> float:
    """Fraction of features that fire (``z_j > 0``) on no row of ``h``."""
    return float((firing_counts(module, h, batch_size) == 0).double().mean())


TENSORS = ("mu", "sigma", "W_enc", "b_enc", "D", "b_dec")


def save(module: TopKSurrogate, path: str | Path, meta: Mapping[str, Any]) -> None:
    tensors = {name: getattr(module, name).detach().float().cpu().contiguous() for name in TENSORS}
    config = {"d": module.d, "n_features": module.n_features, "k": module.k}
    metadata = {"format": FORMAT, "config": json.dumps(config), "meta": json.dumps(dict(meta), default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load(path: str | Path, device: str | torch.device = "cpu") -> tuple[TopKSurrogate, dict[str, Any]]:
    with read_safetensors(path, FORMAT, "TopK surrogate file") as (f, metadata):
        tensors = {name: f.get_tensor(name) for name in TENSORS}
    tensors["W_dec"] = tensors.pop("D").T
    config = json.loads(metadata["config"])
    module = TopKSurrogate(config["d"], config["n_features"], config["k"])
    module.load_state_dict(tensors)
    return module.to(device), json.loads(metadata["meta"])


def draw_curve(curve: pl.DataFrame) -> Figure:
    # seaborn costs a second to import: the model jobs that import this module and never draw
    # (every evaluation and gates job) should not pay it.
    import seaborn as sns

    from postdiff.stats.canvas import new_figure

    long = curve.unpivot(index="step", on=["loss", "mse", "aux"], variable_name="term")
    fig = new_figure(6, 4)
    ax = fig.subplots()
    sns.lineplot(x=long["step"].to_numpy(), y=long["value"].to_numpy(), hue=long["term"].to_list(), ax=ax, linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (units of centred delta variance)")
    return fig


def cache_expect(job: Job, teacher_key: str) -> Expect:
    """The config's view of a cache: its layer list, the pair's fingerprints when the specs are
    given, and the split's teacher rows when that input is given."""
    p = job.params
    known = "pair" in job.input or ("pt" in p and "it" in p)
    teacher = pl.read_parquet(job.input[teacher_key]) if teacher_key in job.input else None
    return Expect(layers=[int(layer) for layer in p["layers"]], fingerprints=fingerprints(job) if known else None, teacher=teacher)


def train_layer(job: Job) -> None:
    """Stage. input: shards (train cache), standardiser, optional teacher; params: layer, layers
    (the cache's), seed, device, the SurrogateConfig keys. output: module, curve, curve_png."""
    p = job.params
    layer, seed = int(p["layer"]), int(p.get("seed", 0))
    cfg = SurrogateConfig.from_params(p)
    std = load_standardiser(job.input["standardiser"], layer)
    h_pt, delta, _ = load_split(list(job.input["shards"]), layer, cache_expect(job, "teacher"))
    device = pick_device(p.get("device", "auto"))
    log.info("layer %d: %d train positions, d=%d, %s on %s", layer, h_pt.shape[0], h_pt.shape[1], cfg, device)
    module, curve = fit(h_pt.to(device), delta.to(device), std.mu.to(device), std.sigma.to(device), cfg, seed)
    log.info("layer %d: trains in %s on cache %s", layer, module.W_enc.dtype, h_pt.dtype)
    train_r2 = r2(module, h_pt, delta, std.delta_mean)
    log.info("layer %d: train R^2 %.4f, dead fraction %.4f", layer, train_r2, dead_fraction(module, h_pt))
    meta = {"layer": layer, "seed": seed, "config": asdict(cfg), "n_train": h_pt.shape[0], "train_r2": train_r2}
    save(module, job.output["module"], meta)
    write_parquet(curve, job.output["curve"])
    with atomic_path(job.output["curve_png"]) as tmp:
        draw_curve(curve).savefig(tmp, format="png", dpi=120)


def layer_metrics(job: Job) -> None:
    """Stage. input: module, standardiser, and one list of cache shards per split (params.splits,
    default train/calib/selector), optional ``{split}_teacher``; output.metrics: one Parquet row
    per split (layer, split, n, r2, dead_fraction)."""
    p = job.params
    layer = int(p["layer"])
    device = pick_device(p.get("device", "auto"))
    module, _ = load(job.input["module"], device)
    delta_mean = load_standardiser(job.input["standardiser"], layer).delta_mean
    records = []
    for split in p.get("splits", ("train", "calib", "selector")):
        h_pt, delta, _ = load_split(list(job.input[split]), layer, cache_expect(job, f"{split}_teacher"))
        records.append(
            {"layer": layer, "split": split, "n": h_pt.shape[0],
             "r2": r2(module, h_pt, delta, delta_mean), "dead_fraction": dead_fraction(module, h_pt)}
        )
        log.info("layer %d %s: %s", layer, split, records[-1])
    write_parquet(pl.DataFrame(records, schema={"layer": pl.Int64, "split": pl.String, "n": pl.Int64, "r2": pl.Float64, "dead_fraction": pl.Float64}), job.output["metrics"])
