"""Feature cards, data side: what each selected or top-scoring feature does, as tidy Parquet.

For every card feature (any feature of a selected mask, plus the top features by capability and
verbosity score): how often it fires and how strongly on the selector and test caches, its
top-activating answer-phase contexts, its decoder direction read through IT's unembedding
(a logit lens that ignores RMS normalisation), and optionally PT's generation with that feature
alone added. The same lens reads each layer's mean delta and ``b_dec``.

Activity and contexts come from one streaming pass over each split's cache shards per layer:
running counts, sums and a running top-k per card feature, never the dense ``z`` of a split.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import polars as pl
import torch
from torch import Tensor, nn

from postdiff.method import surrogate
from postdiff.method.cache import check_shard, read_tensor
from postdiff.method.records import read_rows
from postdiff.method.selection.maskfile import mask_of, read_mask_file
from postdiff.method.standardise import load_standardiser
from postdiff.method.surrogate import TopKSurrogate
from postdiff.models.forward import EditFactory
from postdiff.models.generation import generate
from postdiff.models.hook import LayerEdit
from postdiff.models.loading import final_norm, load_model, load_tokenizer, pick_device
from postdiff.workflow.io import read_json, write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

ENCODE_BATCH = 4096
# Splits whose caches the cards read (the selector also gives the steering prompts).
SPLITS = ("selector", "test")


# ---------------------------------------------------------------- the streaming pass


@dataclass
class Running:
    """Running statistics of one layer's surrogate over a split: per feature, how many rows it
    fires on (``z > 0``) and the sum of its activation there; per card feature (``features``,
    column order), its ``n_top`` largest activations and their global row numbers."""

    count: Tensor  # [F] int64
    total: Tensor  # [F] float64
    n_rows: int
    top_vals: Tensor  # [n_top, S]
    top_rows: Tensor  # [n_top, S] int64, -1 where no row yet

    @classmethod
    def empty(cls, n_features: int, n_cards: int, n_top: int) -> Running:
        return cls(
            torch.zeros(n_features, dtype=torch.int64),
            torch.zeros(n_features, dtype=torch.float64),
            0,
            torch.zeros(n_top, n_cards),
            torch.full((n_top, n_cards), -1, dtype=torch.int64),
        )

    def add(self, vals: Tensor, idx: Tensor, column: Tensor) -> None:
        """Fold in one batch's TopK code ``[B, k]``; ``column[f]`` is feature ``f``'s card column or -1."""
        vals, idx = vals.float().cpu(), idx.cpu()
        fired = vals > 0
        self.count.index_add_(0, idx[fired], torch.ones(int(fired.sum()), dtype=torch.int64))
        self.total.index_add_(0, idx[fired], vals[fired].double())
        b = vals.shape[0]
        if self.top_vals.shape[0] and self.top_vals.shape[1]:
            col = column[idx]
            keep = fired & (col >= 0)
            rows = torch.arange(b).unsqueeze(1).expand_as(idx)
            z = torch.zeros(b, self.top_vals.shape[1])
            z[rows[keep], col[keep]] = vals[keep]
            cand_vals = torch.cat([self.top_vals, z])
            cand_rows = torch.cat([self.top_rows, (self.n_rows + torch.arange(b)).unsqueeze(1).expand_as(z)])
            best = cand_vals.topk(self.top_vals.shape[0], dim=0).indices
            self.top_vals, self.top_rows = cand_vals.gather(0, best), cand_rows.gather(0, best)
        self.n_rows += b


@torch.no_grad()
def stream(module: TopKSurrogate, chunks: Iterable[Tensor], features: Sequence[int], n_top: int) -> Running:
    """:class:`Running` of ``module`` over ``chunks`` of raw ``h [N, d]`` (rows numbered across chunks)."""
    device = module.b_dec.device
    column = torch.full((module.n_features,), -1, dtype=torch.int64)
    column[torch.as_tensor(list(features), dtype=torch.int64)] = torch.arange(len(features))
    run = Running.empty(module.n_features, len(features), n_top)
    for h in chunks:
        for i in range(0, h.shape[0], ENCODE_BATCH):
            vals, idx = module.sparse_code(h[i : i + ENCODE_BATCH].to(device))
            run.add(vals, idx, column)
    return run


@dataclass(frozen=True)
class ShardIndex:
    """The ``(id, position)`` of each row of one split's shards, in the order they were read."""

    ids: list[str]
    positions: list[int]


def shard_chunks(paths: Sequence[str], layer: int, layers: Sequence[int], index: ShardIndex) -> Iterable[Tensor]:
    """``h_pt`` of one layer, shard by shard; fills ``index`` as it goes (one tensor in memory at a time)."""
    for path in paths:
        meta = check_shard(path, layers)
        row = read_tensor(path, "row").tolist()
        index.ids.extend(meta["ids"][r] for r in row)
        index.positions.extend(read_tensor(path, "position").tolist())
        yield read_tensor(path, f"h_pt.{layer}")


# ---------------------------------------------------------------- the lens


def norm_scale(norm: nn.Module, d: int) -> Tensor:
    """The elementwise scale that an RMS norm applies, read off its forward pass.

    Gemma's norms store ``gamma`` and multiply by ``1 + gamma``, Llama's multiply by the weight;
    asking the module avoids guessing by class. Two unit-RMS probes (all ones; alternating
    signs) must give the same scale, which refuses a mean-subtracting LayerNorm.
    """
    param = next(norm.parameters(), None)
    device = param.device if param is not None else "cpu"
    ones = torch.ones(1, d, device=device)
    signs = torch.tensor([1.0, -1.0], device=device).repeat((d + 1) // 2)[:d].unsqueeze(0)
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
    with torch.no_grad():
        scale = norm(ones).float()[0] * math.sqrt(1 + eps)
        check = norm(signs).float()[0] * signs[0] * math.sqrt(1 + eps)
    if not torch.allclose(scale, check, rtol=1e-2, atol=1e-4):
        raise ValueError(f"{type(norm).__name__} is not an elementwise RMS norm; the logit lens needs one")
    return scale


@dataclass(frozen=True)
class Lens:
    """``logits = W_U (w ⊙ v)`` over the tokenizer's vocabulary (rows of a padded embedding beyond
    it are no token and are left out), soft-capped to ``cap * tanh(logits / cap)`` when the model
    caps its final logits (Gemma 2), so a lens logit is on the scale of the model's own."""

    unembed: Tensor  # [V, d]
    scale: Tensor  # [d]
    cap: float | None = None

    @classmethod
    def of(cls, model: nn.Module, vocab_size: int) -> Lens:
        unembed = model.get_output_embeddings().weight.detach()
        cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        return cls(unembed[:vocab_size].float(), norm_scale(final_norm(model), unembed.shape[1]).to(unembed.device),
                   None if cap is None else float(cap))

    def top(self, vectors: Tensor, n: int) -> list[dict[str, list]]:
        """Per vector: the ``n`` most promoted and most suppressed token ids with their logits."""
        logits = (vectors.to(self.unembed.device, torch.float32) * self.scale) @ self.unembed.T
        if self.cap is not None:
            logits = self.cap * torch.tanh(logits / self.cap)
        n = min(n, logits.shape[1])
        up, down = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        return [
            {"promoted": list(zip(up.indices[i].tolist(), up.values[i].tolist())),
             "suppressed": list(zip(down.indices[i].tolist(), down.values[i].tolist()))}
            for i in range(logits.shape[0])
        ]


LENS_SCHEMA = {"direction": pl.String, "rank": pl.Int64, "token_id": pl.Int64, "token": pl.String, "logit": pl.Float64}


def lens_rows(tops: Sequence[Mapping[str, list]], keys: Sequence[Mapping], tokenizer) -> list[dict]:
    rows = []
    for key, top in zip(keys, tops, strict=True):
        for direction, pairs in top.items():
            pieces = tokenizer.convert_ids_to_tokens([t for t, _ in pairs])
            for rank, ((token_id, logit), piece) in enumerate(zip(pairs, pieces)):
                rows.append({**key, "direction": direction, "rank": rank, "token_id": token_id, "token": str(piece), "logit": logit})
    return rows


# ---------------------------------------------------------------- which features get a card


MASK_SCHEMA = {"mask": pl.String, "layer": pl.List(pl.Int64), "feature": pl.List(pl.Int64)}


def masks_frame(masks: Mapping[str, Mapping[int, Sequence[int]]]) -> pl.DataFrame:
    """One row per mask, its (layer, feature) pairs as two equal-length lists (empty: an empty mask)."""
    rows = []
    for name, mask in masks.items():
        pairs = [(layer, j) for layer in sorted(mask) for j in mask[layer]]
        rows.append({"mask": name, "layer": [p[0] for p in pairs], "feature": [p[1] for p in pairs]})
    return pl.DataFrame(rows, schema=MASK_SCHEMA)


def card_features(masks: Mapping[str, Mapping[int, Sequence[int]]], scores: pl.DataFrame, top_n: int) -> pl.DataFrame:
    """``layer, feature, reasons`` of every card: each mask holding it, and ``top cap_score`` /
    ``top verb_score`` for the ``top_n`` highest of each score over all layers. Ties (all scores
    are 0 when an endpoint never varies) go to the larger activation mass: a feature that
    carries more of the delta says more than the lowest index."""
    reasons: dict[tuple[int, int], list[str]] = {}
    for name, mask in masks.items():
        for layer, features in mask.items():
            for j in features:
                reasons.setdefault((int(layer), int(j)), []).append(name)
    for score in ("cap_score", "verb_score"):
        top = scores.drop_nans(score).sort([score, "activation_mass", "layer", "feature"], descending=[True, True, False, False])
        for layer, j in top.head(top_n).select("layer", "feature").iter_rows():
            reasons.setdefault((layer, j), []).append(f"top {score}")
    keys = sorted(reasons)
    return pl.DataFrame(
        {"layer": [k[0] for k in keys], "feature": [k[1] for k in keys], "reasons": [reasons[k] for k in keys]},
        schema={"layer": pl.Int64, "feature": pl.Int64, "reasons": pl.List(pl.String)},
    )


# ---------------------------------------------------------------- contexts and activity


ACTIVITY_SCHEMA = {"layer": pl.Int64, "feature": pl.Int64, "split": pl.String, "n_positions": pl.Int64,
                   "n_active": pl.Int64, "frequency": pl.Float64, "mean_active": pl.Float64}
CONTEXT_SCHEMA = {"layer": pl.Int64, "feature": pl.Int64, "split": pl.String, "rank": pl.Int64, "id": pl.String,
                  "position": pl.Int64, "activation": pl.Float64, "prompt": pl.String,
                  "tokens": pl.List(pl.String), "highlight": pl.Int64, "next_token": pl.String}


def activity_rows(layer: int, features: Sequence[int], split: str, run: Running) -> list[dict]:
    rows = []
    for j in features:
        n_active = int(run.count[j])
        rows.append({
            "layer": layer, "feature": int(j), "split": split, "n_positions": run.n_rows, "n_active": n_active,
            "frequency": n_active / run.n_rows if run.n_rows else 0.0,
            "mean_active": float(run.total[j]) / n_active if n_active else None,
        })
    return rows


@dataclass(frozen=True)
class Texts:
    """A split's prompts and token ids, and a tokenizer to show them."""

    prompts: Mapping[str, str]
    prefixes: Mapping[str, list[int]]
    answers: Mapping[str, list[int]]
    tokenizer: object

    def piece(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def context(self, pid: str, position: int) -> dict:
        """The last prompt token and the answer tokens, which answer-phase positions index (SPEC §3);
        ``highlight`` is the position's own token, ``next_token`` the one it predicts."""
        m, answer = len(self.prefixes[pid]), self.answers[pid]
        ids = [self.prefixes[pid][-1], *answer[:-1]]
        at = position - (m - 1)
        return {"prompt": self.prompts[pid], "tokens": [self.piece(t) for t in ids], "highlight": at,
                "next_token": self.piece(answer[at])}


def context_rows(layer: int, features: Sequence[int], split: str, run: Running, index: ShardIndex, texts: Texts) -> list[dict]:
    rows = []
    for col, j in enumerate(features):
        rank = 0
        for val, row in zip(run.top_vals[:, col].tolist(), run.top_rows[:, col].tolist()):
            if val <= 0 or row < 0:
                continue  # fewer firing positions than contexts asked for
            pid, position = index.ids[row], index.positions[row]
            rows.append({"layer": layer, "feature": int(j), "split": split, "rank": rank, "id": pid, "position": position,
                         "activation": val, **texts.context(pid, position)})
            rank += 1
    return rows


# ---------------------------------------------------------------- steering


STEERING_SCHEMA = {"layer": pl.Int64, "feature": pl.Int64, "id": pl.String, "prompt": pl.String, "alpha": pl.Float64,
                   "z": pl.Float64, "text": pl.String, "n_tokens": pl.Int64, "eos": pl.Boolean}


def steering_prompts(split: pl.DataFrame, n: int) -> pl.DataFrame:
    """``n`` prompts that cycle through the slices (first ids of each), the same for every card."""
    ranked = split.sort("slice", "id").with_columns(pl.int_range(pl.len()).over("slice").alias("_k"))
    return ranked.sort("_k", "slice").head(n).drop("_k")


def steering_factory(vectors: Tensor, layer_of_row: Sequence[int | None]) -> EditFactory:
    """Per-row edits: row ``r`` adds ``vectors[r]`` at layer ``layer_of_row[r]`` (None: nothing, PT
    itself). The vector already carries ``alpha_l * z_j``, so alpha is 1."""

    def factory(idx: list[int]) -> dict[int, LayerEdit]:
        edits = {}
        for layer in sorted({layer_of_row[i] for i in idx} - {None}):
            chosen = torch.stack([vectors[i] if layer_of_row[i] == layer else torch.zeros_like(vectors[i]) for i in idx])
            edits[layer] = LayerEdit(1.0, lambda h, v=chosen: v.to(h.device, h.dtype).unsqueeze(1).expand_as(h))
        return edits

    return factory


def steer(
    model: nn.Module, tokenizer, prompts: pl.DataFrame, cards: Sequence[tuple[int, int, float, float, Tensor]],
    max_new_tokens: int, batch_size: int,
) -> pl.DataFrame:
    """PT's own generation and, per card ``(layer, feature, alpha, z, D_j)``, PT's with
    ``alpha * z * D_j`` added at the answer-phase positions of that layer."""
    plan = [(None, None, None, None, None)] + list(cards)
    rows, layer_of_row, vectors = [], [], []
    d = model.get_output_embeddings().weight.shape[1]
    for layer, j, alpha, z, direction in plan:
        vec = torch.zeros(d) if direction is None else alpha * z * direction.float().cpu()
        for pid, prompt, prefix in prompts.select("id", "prompt", "prefix_ids").iter_rows():
            rows.append({"layer": layer, "feature": j, "id": pid, "prompt": prompt, "alpha": alpha, "z": z, "prefix": prefix})
            layer_of_row.append(layer)
            vectors.append(vec)
    outputs = generate(model, tokenizer, [r.pop("prefix") for r in rows], max_new_tokens, batch_size,
                       edit_factory=steering_factory(torch.stack(vectors) if vectors else torch.zeros(0, d), layer_of_row))
    for row, (ids, eos) in zip(rows, outputs, strict=True):
        row.update(text=tokenizer.decode(ids, skip_special_tokens=True), n_tokens=len(ids) - int(eos), eos=eos)
    return pl.DataFrame(rows, schema=STEERING_SCHEMA)


def activity_and_contexts(cards: pl.DataFrame, modules: Mapping[int, TopKSurrogate], layers: Sequence[int],
                          shards: Mapping[str, Sequence[str]], texts: Mapping[str, Texts],
                          n_contexts: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Activity and top contexts of every card feature on each split (``shards[split]``, the
    cache of ``layers``), from one streaming pass per split and layer."""
    activity, contexts = [], []
    for split, paths in shards.items():
        for layer in layers:
            features = cards.filter(pl.col("layer") == layer)["feature"].to_list()
            index = ShardIndex([], [])
            run = stream(modules[layer], shard_chunks(paths, layer, layers, index), features, n_contexts)
            activity += activity_rows(layer, features, split, run)
            contexts += context_rows(layer, features, split, run, index, texts[split])
            log.info("layer %d %s: %d positions, %d card features", layer, split, run.n_rows, len(features))
    return pl.DataFrame(activity, schema=ACTIVITY_SCHEMA), pl.DataFrame(contexts, schema=CONTEXT_SCHEMA)


def lenses(lens: Lens, cards: pl.DataFrame, modules: Mapping[int, TopKSurrogate], delta_means: Mapping[int, Tensor],
           tokenizer, n: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Each card's ``D_j``, and each layer's mean delta and ``b_dec``, through ``lens`` (top ``n`` tokens)."""
    keys = list(cards.select("layer", "feature").iter_rows(named=True))
    directions = [modules[k["layer"]].W_dec[k["feature"]].detach().cpu() for k in keys]
    card_lens = pl.DataFrame(lens_rows(lens.top(torch.stack(directions), n), keys, tokenizer) if keys else [],
                             schema={"layer": pl.Int64, "feature": pl.Int64, **LENS_SCHEMA})
    layer_keys, vectors = [], []
    for layer in modules:
        for name, vector in (("delta_mean", delta_means[layer]), ("b_dec", modules[layer].b_dec.detach())):
            layer_keys.append({"layer": layer, "vector": name, "norm": float(vector.norm())})
            vectors.append(vector.float().cpu())
    layer_lens = pl.DataFrame(lens_rows(lens.top(torch.stack(vectors), n), layer_keys, tokenizer),
                              schema={"layer": pl.Int64, "vector": pl.String, "norm": pl.Float64, **LENS_SCHEMA})
    return card_lens, layer_lens


def steering_cards(cards: pl.DataFrame, activity: pl.DataFrame, modules: Mapping[int, TopKSurrogate],
                   gates: Mapping[int, float]) -> list[tuple[int, int, float, float, Tensor]]:
    """:func:`steer`'s cards: every card feature that fires on the selector split (a silent one has
    no mean activation), with its layer's gate, its mean activation there and its decoder row."""
    z = activity.filter(pl.col("split") == "selector").select("layer", "feature", "mean_active")
    return [(layer, j, gates[layer], zbar, modules[layer].W_dec[j].detach())
            for layer, j, zbar in cards.join(z, on=["layer", "feature"], how="left").select("layer", "feature", "mean_active").iter_rows()
            if zbar is not None]


# ---------------------------------------------------------------- the stage


def _texts(rows: pl.DataFrame, tokenizer) -> Texts:
    return Texts(dict(zip(rows["id"], rows["prompt"])), dict(zip(rows["id"], rows["prefix_ids"].to_list())),
                 dict(zip(rows["id"], rows["token_ids"].to_list())), tokenizer)


def feature_data(job: Job) -> None:
    """Stage. input: scores, gates, standardiser, surrogates (one per layer, in params.layers order),
    masks (params.mask_labels order), ``{split}`` shards, ``{split}_suite``, ``{split}_teacher`` for
    selector and test, the pair. params: layers, top_n, n_contexts, n_lens_tokens, steer, n_prompts,
    max_new_tokens, batch_size, model params. output: cards, masks, activity, contexts, lens,
    layer_lens, steering (Parquet)."""
    p = job.params
    layers = [int(layer) for layer in p["layers"]]
    masks = {label: mask_of(read_mask_file(path)) for label, path in zip(p["mask_labels"], job.inputs("masks"), strict=True)}
    device = pick_device(p.get("device", "auto"))
    modules = {layer: surrogate.load(path, device)[0].eval().requires_grad_(False) for layer, path in zip(layers, job.inputs("surrogates"), strict=True)}
    scores = pl.read_parquet(job.input["scores"])
    cards = card_features(masks, scores, int(p["top_n"])).join(scores, on=["layer", "feature"], how="left", maintain_order="left")
    norms = [float(modules[layer].W_dec[j].norm()) for layer, j in cards.select("layer", "feature").iter_rows()]
    cards = cards.with_columns(pl.Series("decoder_norm", norms, dtype=pl.Float64))
    tokenizer = load_tokenizer(p["it"])
    rows = {split: read_rows(job.input[f"{split}_suite"], job.input[f"{split}_teacher"]) for split in SPLITS}

    start = time.perf_counter()
    texts = {split: _texts(split_rows, tokenizer) for split, split_rows in rows.items()}
    activity, contexts = activity_and_contexts(cards, modules, layers, {split: job.inputs(split) for split in rows}, texts,
                                               int(p["n_contexts"]))
    log.info("streaming pass: %.2f s", time.perf_counter() - start)
    start = time.perf_counter()
    it, _ = load_model(p["it"], p.get("dtype", "auto"), p.get("device", "auto"))
    delta_means = {layer: load_standardiser(job.input["standardiser"], layer).delta_mean for layer in modules}
    card_lens, layer_lens = lenses(Lens.of(it, len(tokenizer)), cards, modules, delta_means, tokenizer, int(p["n_lens_tokens"]))
    log.info("lens (IT loaded): %.2f s", time.perf_counter() - start)
    steering = pl.DataFrame(schema=STEERING_SCHEMA)
    if p["steer"]:
        start = time.perf_counter()
        gates = {int(k): float(v) for k, v in read_json(job.input["gates"]).items()}
        pt, pt_tokenizer = load_model(p["pt"], p.get("dtype", "auto"), p.get("device", "auto"), partner=p["it"])
        steering = steer(pt, pt_tokenizer, steering_prompts(rows["selector"], int(p["n_prompts"])),
                         steering_cards(cards, activity, modules, gates), int(p["max_new_tokens"]), job.batch_size())
        log.info("steering (PT loaded, %d generations): %.2f s", steering.height, time.perf_counter() - start)

    outputs = dict(cards=cards, masks=masks_frame(masks), activity=activity, contexts=contexts, lens=card_lens,
                   layer_lens=layer_lens, steering=steering)
    for name, frame in outputs.items():
        write_parquet(frame, job.output[name])
