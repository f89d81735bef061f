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
from typing import Any

import polars as pl
import seaborn as sns
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from postdiff.cache import Expect, load_split
from postdiff.io import atomic_path, read_safetensors, write_parquet
from postdiff.models import fingerprint, pick_device
from postdiff.runtime import Job
from postdiff.standardise import load_standardiser

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

    def __post_init__(self) -> None:
        for name in ("expansion", "k", "batch_size", "steps", "dead_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"surrogate config: {name} must be >= 1, got {getattr(self, name)}")
        if self.aux_k is not None and self.aux_k < 1:
            raise ValueError(f"surrogate config: aux_k must be >= 1 or null, got {self.aux_k}")
        if not self.lr > 0 or self.auxk_coef < 0:
            raise ValueError(f"surrogate config: need lr > 0 and auxk_coef >= 0, got {self.lr}, {self.auxk_coef}")

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> SurrogateConfig:
        """The config keys present in ``params``; other keys (layer, seed, ...) are ignored."""
        return cls(**{f.name: params[f.name] for f in fields(cls) if f.name in params})


# Sparse products over a narrow [N, k] selection (k <= NARROW, the TopK one) are summed slot by
# slot: an [N, k, d] temporary would be a large fresh allocation every step. A wide one (AuxK)
# goes through one matmul over just the features it uses.
NARROW = 32


def _narrow(k: int) -> int:
    return k if k <= NARROW else 0


def _compact(idx: Tensor, n_features: int) -> tuple[Tensor, Tensor]:
    """The features ``idx`` uses (ascending) and each entry's position among them; a sort-free
    ``torch.unique(idx, return_inverse=True)``."""
    used = torch.zeros(n_features, dtype=torch.bool, device=idx.device)
    used[idx] = True
    return used.nonzero().squeeze(1), (used.cumsum(0) - 1)[idx]


def _add_rank_one(out: Tensor, idx: Tensor, weights: Tensor, vectors: Tensor, narrow: int) -> None:
    """Add ``weights[n, j] * vectors[n]`` to row ``idx[n, j]`` of ``out`` for every (n, j)."""
    for j in range(narrow):
        out.index_add_(0, idx[:, j], weights[:, j : j + 1] * vectors)
    if idx.shape[1] > narrow:
        used, local = _compact(idx[:, narrow:], out.shape[0])
        per_row = vectors.new_zeros(idx.shape[0], used.numel()).scatter_add_(1, local, weights[:, narrow:])
        out.index_add_(0, used, per_row.T @ vectors)


def _row_dots(table: Tensor, idx: Tensor, vectors: Tensor, narrow: int) -> Tensor:
    """``[N, k]`` with entry ``(n, j)`` = ``table[idx[n, j]] . vectors[n]``."""
    parts = [(table[idx[:, j]] * vectors).sum(1, keepdim=True) for j in range(narrow)]
    if idx.shape[1] > narrow:
        used, local = _compact(idx[:, narrow:], table.shape[0])
        parts.append((vectors @ table[used].T).gather(1, local))
    return torch.cat(parts, 1)


class _Selected(torch.autograd.Function):
    """``ReLU(pre)`` at the chosen ``[N, k]`` indices, ``pre = x W^T + b`` computed once by
    the caller; only the chosen entries get a gradient, never a dense ``[N, F]`` one."""

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor, idx: Tensor, pre: Tensor, narrow: int) -> Tensor:
        vals = pre.gather(-1, idx).relu()
        ctx.save_for_backward(x, W, idx, vals)
        ctx.narrow = narrow
        return vals

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, W, idx, vals = ctx.saved_tensors
        g = grad * (vals > 0)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W, per_sample_weights=g, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_W = torch.zeros_like(W)
            _add_rank_one(grad_W, idx, g, x, ctx.narrow)
        if ctx.needs_input_grad[2]:
            grad_b = W.new_zeros(W.shape[0]).index_add_(0, idx.reshape(-1), g.reshape(-1))
        return grad_x, grad_W, grad_b, None, None, None


class _Decoded(torch.autograd.Function):
    """``sum_j vals[n, j] * table[idx[n, j]]`` for groups of ``[N, k_i]`` values and indices
    into one ``[F, d]`` table (arguments: table, vals_0, idx_0, vals_1, idx_1, ...): one
    output per group, one gradient buffer for the table, sparse backward as in
    :class:`_Selected`."""

    @staticmethod
    def forward(ctx, table: Tensor, *groups: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(table, *groups)
        return tuple(F.embedding_bag(i, table, per_sample_weights=v, mode="sum") for v, i in zip(groups[::2], groups[1::2]))

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        table, *groups = ctx.saved_tensors
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[0] else None
        grad_groups: list[Tensor | None] = []
        for n, (vals, idx, grad) in enumerate(zip(groups[::2], groups[1::2], grads)):
            narrow = _narrow(idx.shape[1])
            grad_groups += [_row_dots(table, idx, grad, narrow) if ctx.needs_input_grad[1 + 2 * n] else None, None]
            if grad_table is not None:
                _add_rank_one(grad_table, idx, vals, grad, narrow)
        return (grad_table, *grad_groups)


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
        # Stored feature-major ([d, F] with strides (1, d)) so that D.T, one row per feature, is
        # the contiguous table embedding_bag needs without a copy each step.
        self.D = nn.Parameter(torch.zeros(n_features, d).T)
        self.b_dec = nn.Parameter(torch.zeros(d))

    @property
    def d(self) -> int:
        return self.D.shape[0]

    @property
    def n_features(self) -> int:
        return self.D.shape[1]

    def standardise(self, h: Tensor) -> Tensor:
        return (h.to(self.mu.dtype) - self.mu) / self.sigma

    def top(self, x: Tensor, pre: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        """Values and indices of the ``k`` largest ReLU activations of standardised ``x``,
        given its pre-activations ``pre``; gradients reach ``W_enc, b_enc`` through the values."""
        with torch.no_grad():
            idx = pre.topk(k or self.k, dim=-1, sorted=False).indices
        return self.select(x, pre, idx), idx

    def select(self, x: Tensor, pre: Tensor, idx: Tensor) -> Tensor:
        """``ReLU(pre)`` at ``idx``, differentiable in ``W_enc, b_enc`` (and ``x``)."""
        k = idx.shape[-1]
        flat = (x.reshape(-1, self.d), self.W_enc, self.b_enc, idx.reshape(-1, k), pre.detach().reshape(-1, self.n_features))
        return _Selected.apply(*flat, _narrow(k)).reshape(idx.shape)

    def sparse_decode(self, vals: Tensor, idx: Tensor) -> Tensor:
        """``sum_j D[:, idx_j] vals_j`` (no ``b_dec``) for ``[..., k]`` values and indices."""
        k = idx.shape[-1]
        return self.sparse_decode_groups([(vals.reshape(-1, k), idx.reshape(-1, k))])[0].reshape(*vals.shape[:-1], self.d)

    def sparse_decode_groups(self, groups: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
        """:meth:`sparse_decode` of several ``[N, k_i]`` (values, indices) groups at once."""
        return list(_Decoded.apply(self.D.T, *(t for group in groups for t in group)))

    def sparse_code(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``z`` of raw ``h`` as its k (value, feature index) pairs per row."""
        x = self.standardise(h)
        return self.top(x, F.linear(x, self.W_enc, self.b_enc))

    def encode(self, h: Tensor) -> Tensor:
        vals, idx = self.sparse_code(h)
        return torch.zeros(*vals.shape[:-1], self.n_features, dtype=vals.dtype, device=vals.device).scatter(-1, idx, vals)

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.D.T + self.b_dec

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
        return (z * mask) @ self.D.T


def _init(module: TopKSurrogate, b_dec: Tensor, generator: torch.Generator) -> None:
    d, n = module.d, module.n_features
    bound = 1 / math.sqrt(d)  # nn.Linear's default scale, so pre-activations start at O(1)
    with torch.no_grad():
        module.W_enc.copy_(torch.empty(n, d).uniform_(-bound, bound, generator=generator))
        module.b_enc.zero_()
        D = torch.randn(d, n, generator=generator)
        module.D.copy_(D / D.norm(dim=0, keepdim=True))
        module.b_dec.copy_(b_dec)


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
    _init(module, delta_mean / scale, generator)
    module.to(device)
    opt = torch.optim.Adam(module.parameters(), lr=cfg.lr, fused=True)

    since_fired = torch.zeros(n_features, dtype=torch.long, device=device)
    order, cursor = torch.randperm(n, generator=generator), 0
    history = torch.zeros(cfg.steps, 3, device=device)
    for step in tqdm(range(cfg.steps), desc="fit surrogate", mininterval=2.0):
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        rows = order[cursor : cursor + batch].to(device)
        cursor += batch
        target = delta[rows].float() / scale
        x = module.standardise(h_pt[rows])
        pre = F.linear(x, module.W_enc, module.b_enc)
        with torch.no_grad():
            idx = pre.topk(cfg.k, dim=-1, sorted=False).indices
            dead = since_fired >= cfg.dead_steps
            n_dead = int(dead.sum()) if cfg.auxk_coef > 0 else 0
            if n_dead:
                # AuxK: the largest dead pre-activations try to explain what the live ones
                # missed, which gives dead features' decoders a gradient again. With few dead
                # features the term is scaled down, not padded with live ones. Their encoders
                # get no AuxK gradient (as in sparsify): on bench/topk_vs_sparsify.py passing
                # it left 18% of features dead instead of 4%, at equal R^2 and 30% more time.
                dead_ids = dead.nonzero().squeeze(1)
                aux_idx = dead_ids[pre[:, dead_ids].topk(min(aux_k, n_dead), dim=-1, sorted=False).indices]
        vals = module.select(x, pre, idx)
        # One decode serves both terms: a single gradient buffer for D.
        groups = [(vals, idx)] + ([(pre.detach().gather(1, aux_idx).relu(), aux_idx)] if n_dead else [])
        decoded = module.sparse_decode_groups(groups)
        err = target - (decoded[0] + module.b_dec)
        mse = err.pow(2).mean()
        aux = torch.zeros((), device=device)
        if n_dead:
            aux = min(n_dead / aux_k, 1.0) * (decoded[1] - err.detach()).pow(2).mean()
        loss = mse + cfg.auxk_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            fired = torch.zeros(n_features, dtype=torch.bool, device=device)
            fired[idx[vals > 0]] = True
            since_fired.add_(1).masked_fill_(fired, 0)
            history[step] = torch.stack([loss.detach(), mse.detach(), aux.detach()])

    with torch.no_grad():
        module.D.mul_(scale)
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
def dead_fraction(module: TopKSurrogate, h: Tensor, batch_size: int = 4096) -> float:
    """Fraction of features that fire (``z_j > 0``) on no row of ``h``."""
    device = module.b_dec.device
    fired = torch.zeros(module.n_features, dtype=torch.bool, device=device)
    for i in range(0, h.shape[0], batch_size):
        vals, idx = module.sparse_code(h[i : i + batch_size].to(device))
        fired[idx[vals > 0]] = True
    return 1 - float(fired.float().mean())


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
    config = json.loads(metadata["config"])
    module = TopKSurrogate(config["d"], config["n_features"], config["k"])
    module.load_state_dict(tensors)
    return module.to(device), json.loads(metadata["meta"])


def draw_curve(curve: pl.DataFrame) -> Figure:
    long = curve.unpivot(index="step", on=["loss", "mse", "aux"], variable_name="term")
    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    sns.lineplot(x=long["step"].to_numpy(), y=long["value"].to_numpy(), hue=long["term"].to_list(), ax=ax, linewidth=0.8)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (units of centred delta variance)")
    return fig


def _expect(job: Job, teacher_key: str) -> Expect:
    """The config's view of a cache: its layer list, the pair's fingerprints when the specs are
    given, and the split's teacher rows when that input is given."""
    p = job.params
    fingerprints = {role: fingerprint(p[role]) for role in ("pt", "it")} if "pt" in p and "it" in p else None
    teacher = pl.read_parquet(job.input[teacher_key]) if teacher_key in job.input else None
    return Expect(layers=[int(layer) for layer in p["layers"]], fingerprints=fingerprints, teacher=teacher)


def train_layer(job: Job) -> None:
    """Stage. input: shards (train cache), standardiser, optional teacher; params: layer, layers
    (the cache's), seed, device, the SurrogateConfig keys. output: module, curve, curve_png."""
    p = job.params
    layer, seed = int(p["layer"]), int(p.get("seed", 0))
    cfg = SurrogateConfig.from_params(p)
    std = load_standardiser(job.input["standardiser"], layer)
    h_pt, delta, _ = load_split(list(job.input["shards"]), layer, _expect(job, "teacher"))
    device = pick_device(p.get("device", "auto"))
    log.info("layer %d: %d train positions, d=%d, %s on %s", layer, h_pt.shape[0], h_pt.shape[1], cfg, device)
    module, curve = fit(h_pt.to(device), delta.to(device), std.mu.to(device), std.sigma.to(device), cfg, seed)
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
        h_pt, delta, _ = load_split(list(job.input[split]), layer, _expect(job, f"{split}_teacher"))
        records.append(
            {"layer": layer, "split": split, "n": h_pt.shape[0],
             "r2": r2(module, h_pt, delta, delta_mean), "dead_fraction": dead_fraction(module, h_pt)}
        )
        log.info("layer %d %s: %s", layer, split, records[-1])
    write_parquet(pl.DataFrame(records, schema={"layer": pl.Int64, "split": pl.String, "n": pl.Int64, "r2": pl.Float64, "dead_fraction": pl.Float64}), job.output["metrics"])
