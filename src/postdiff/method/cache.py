"""Answer-phase activation caches (SPEC §4): ``h_pt`` and ``delta = h_it - h_pt`` per layer.

A shard is one safetensors file: ``h_pt.{l}`` and ``delta.{l}`` ``[N, d]`` for every layer,
``row`` (index into the metadata's ``ids``) and ``position`` ``[N]`` int32 naming each token,
and metadata ``format``, ``layers``, ``ids``, ``fingerprint_pt``, ``fingerprint_it``,
``token_hash`` (sha256 of the shard's ids and token ids), ``shard``, ``n_shards``,
``n_tokens``, ``dtype``. Rows are in teacher-file order, positions ascending within a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from postdiff.models.forward import block_outputs, length_sorted_batches
from postdiff.models.loading import check_layers, load_pair, pick_dtype
from postdiff.models.preflight import fingerprints
from postdiff.models.template import answer_positions, teacher_forced_batch
from postdiff.workflow.io import atomic_path, read_safetensors, write_parquet
from postdiff.workflow.runtime import Job
from postdiff.workflow.shards import shard_rows

log = logging.getLogger(__name__)

FORMAT = "postdiff-cache/1"
COLUMNS = ("id", "prefix_ids", "token_ids")
Caches = dict[int, tuple[Tensor, Tensor]]


def check_rows(rows: pl.DataFrame, source: str = "rows") -> None:
    missing = [c for c in COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"{source}: missing column(s) {missing}; need {list(COLUMNS)}")
    for i, (pid, prefix, answer) in enumerate(rows.select(COLUMNS).iter_rows()):
        if not prefix or not answer:
            raise ValueError(f"{source}: row {i} (id {pid!r}) has empty prefix_ids or token_ids")
    dup = rows["id"].filter(rows["id"].is_duplicated()).unique().to_list()
    if dup:
        raise ValueError(f"{source}: duplicate prompt ids {dup[:5]}")


def token_hash(rows: pl.DataFrame) -> str:
    payload = json.dumps([list(r) for r in rows.select(COLUMNS).iter_rows()], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def answer_index(rows: pl.DataFrame) -> pl.DataFrame:
    """``(id, position)`` of every answer-phase position, rows in order (SPEC §3)."""
    ids, positions = [], []
    for pid, prefix, answer in rows.select(COLUMNS).iter_rows():
        pos = answer_positions(len(prefix), len(answer))
        ids.extend([pid] * len(pos))
        positions.extend(pos)
    return pl.DataFrame({"id": pl.Series(ids, dtype=pl.String), "position": pl.Series(positions, dtype=pl.Int32)})


def _check_finite(layer: int, role: str, h: Tensor, row_of_token: Tensor, ids: Sequence[str]) -> None:
    bad = ~torch.isfinite(h).all(-1)
    if bool(bad.any()):
        pid = ids[int(row_of_token[int(bad.nonzero()[0, 0])])]
        raise ValueError(f"non-finite {role} activations at layer {layer} for prompt id {pid!r}")


@torch.no_grad()
def collect(
    pt: nn.Module,
    it: nn.Module,
    layers: Sequence[int],
    rows: pl.DataFrame,
    batch_size: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[Caches, pl.DataFrame]:
    """``{layer: (h_pt, delta)}`` ``[N, d]`` in ``dtype`` on the CPU, and the ``(id, position)`` index.

    One teacher-forced forward per model per batch serves every layer; delta is formed in
    float32 before the cast.
    """
    check_rows(rows)
    layers = check_layers(pt, layers)
    check_layers(it, layers)
    ids = rows["id"].to_list()
    prefixes, answers = rows["prefix_ids"].to_list(), rows["token_ids"].to_list()
    counts = torch.tensor([len(a) for a in answers])
    # Each row's block of the output, so batches (length-sorted) land in input order.
    offsets = torch.cumsum(counts, 0) - counts
    total = int(counts.sum())
    device = next(pt.parameters()).device
    out: Caches = {}
    batches = length_sorted_batches([len(p) + len(a) for p, a in zip(prefixes, answers)], batch_size)
    for idx in tqdm(batches, desc="cache"):
        # Pads are masked and follow every answer position: their id never matters.
        input_ids, attn, answer_mask = teacher_forced_batch([prefixes[i] for i in idx], [answers[i] for i in idx], pad_id=0)
        input_ids, attn, answer_mask = input_ids.to(device), attn.to(device), answer_mask.to(device)
        h_pt_all = block_outputs(pt, input_ids, attn, layers)
        h_it_all = block_outputs(it, input_ids, attn, layers)
        dest = torch.cat([torch.arange(int(offsets[i]), int(offsets[i] + counts[i])) for i in idx])
        row_of_token = torch.repeat_interleave(torch.tensor(idx), counts[idx])
        for layer in layers:
            h_pt, h_it = h_pt_all[layer][answer_mask].float(), h_it_all[layer][answer_mask].float()
            _check_finite(layer, "PT", h_pt, row_of_token, ids)
            _check_finite(layer, "IT", h_it, row_of_token, ids)
            if layer not in out:
                d = h_pt.shape[-1]
                out[layer] = (torch.empty(total, d, dtype=dtype), torch.empty(total, d, dtype=dtype))
            out[layer][0][dest] = h_pt.to("cpu", dtype)
            out[layer][1][dest] = (h_it - h_pt).to("cpu", dtype)
    return out, answer_index(rows)


def _metadata(path: str | Path) -> dict[str, Any]:
    with read_safetensors(path, FORMAT, "cache shard") as (_, raw):
        meta: dict[str, Any] = dict(raw)
    for key in ("layers", "ids", "shard", "n_shards", "n_tokens"):
        meta[key] = json.loads(raw[key])
    return meta


def check_shard(
    path: str | Path,
    layers: Sequence[int],
    fingerprints: Mapping[str, str] | None = None,
    token_hash: str | None = None,
) -> dict[str, Any]:
    """The shard's metadata; ValueError when its layers, model fingerprints or token ids are not
    the ones expected (None skips that check)."""
    meta = _metadata(path)
    if sorted(meta["layers"]) != sorted(int(layer) for layer in layers):
        raise ValueError(f"{path}: cached layers {meta['layers']} differ from the configured {list(layers)}")
    for role, expected in (fingerprints or {}).items():
        if meta[f"fingerprint_{role}"] != expected:
            raise ValueError(
                f"{path}: {role} model fingerprint {meta[f'fingerprint_{role}']} differs from the current {expected}"
            )
    if token_hash is not None and meta["token_hash"] != token_hash:
        raise ValueError(f"{path}: token ids (sha256 {meta['token_hash']}) differ from the teacher rows' {token_hash}")
    return meta


@dataclass(frozen=True)
class Expect:
    """What the current config says a split's shards must hold; None skips a check.

    ``teacher`` is the split's teacher rows: each shard's token hash is recomputed from its
    own rows of it, and the shards must be exactly 0..n_shards-1.
    """

    layers: Sequence[int]
    fingerprints: Mapping[str, str] | None = None
    teacher: pl.DataFrame | None = None


def read_tensor(path: str | Path, key: str) -> Tensor:
    with safe_open(str(path), framework="pt") as f:
        if key not in f.keys():  # noqa: SIM118 (safe_open has keys(), not __contains__)
            raise ValueError(f"{path}: no tensor {key!r}")
        return f.get_tensor(key)


def load_split(paths: Sequence[str | Path], layer: int, expect: Expect | None = None) -> tuple[Tensor, Tensor, pl.DataFrame]:
    """``h_pt``, ``delta`` ``[N, d]`` of one layer over a split's shards, and their ``(id, position)``."""
    if not paths:
        raise ValueError("load_split: no cache shards given")
    metas = [_metadata(path) for path in paths]
    if expect is not None:
        for path, meta in zip(paths, metas):
            expected_hash = None
            if expect.teacher is not None:
                expected_hash = token_hash(shard_rows(expect.teacher, meta["shard"], meta["n_shards"]))
            check_shard(path, expect.layers, expect.fingerprints, expected_hash)
    if expect is not None and expect.teacher is not None:
        got = sorted(m["shard"] for m in metas)
        if got != list(range(metas[0]["n_shards"])) or len({m["n_shards"] for m in metas}) != 1:
            raise ValueError(f"cache shards {got} of n_shards {[m['n_shards'] for m in metas]} do not cover the split once")
    h_pt, delta, index = [], [], []
    for path, meta in zip(paths, metas):
        if layer not in meta["layers"]:
            raise ValueError(f"{path}: layer {layer} is not cached (has {meta['layers']})")
        h_pt.append(read_tensor(path, f"h_pt.{layer}"))
        delta.append(read_tensor(path, f"delta.{layer}"))
        row = read_tensor(path, "row")
        index.append(
            pl.DataFrame({"id": pl.Series(meta["ids"], dtype=pl.String).gather(row.numpy()), "position": read_tensor(path, "position").numpy()})
        )
    return torch.cat(h_pt), torch.cat(delta), pl.concat(index)


def write_shard(
    path: str | Path,
    caches: Caches,
    rows: pl.DataFrame,
    fingerprints: Mapping[str, str],
    shard: int,
    n_shards: int,
) -> None:
    """Write one shard file (layout in the module docstring) for the output of :func:`collect`."""
    layers = sorted(caches)
    tensors = {f"{name}.{layer}": t.contiguous() for layer in layers for name, t in zip(("h_pt", "delta"), caches[layer])}
    index = answer_index(rows)
    counts = rows["token_ids"].list.len().to_torch()
    tensors["row"] = torch.repeat_interleave(torch.arange(rows.height, dtype=torch.int32), counts)
    tensors["position"] = index["position"].to_torch().to(torch.int32)
    metadata = {
        "format": FORMAT,
        "layers": json.dumps(layers),
        "ids": json.dumps(rows["id"].to_list()),
        "fingerprint_pt": fingerprints["pt"],
        "fingerprint_it": fingerprints["it"],
        "token_hash": token_hash(rows),
        "shard": json.dumps(shard),
        "n_shards": json.dumps(n_shards),
        "n_tokens": json.dumps(index.height),
        "dtype": str(caches[layers[0]][0].dtype).removeprefix("torch."),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def cache_shard(job: Job) -> None:
    """Stage. input.teacher: a split's teacher Parquet; params: pt, it, layers, shard, n_shards,
    batch_size, dtype (models), device, cache_dtype (stored; auto: bf16 on GPU, fp32 on CPU).
    output: tensors (safetensors), index (Parquet: id, position)."""
    p = job.params
    teacher_path = job.input["teacher"]
    teacher = pl.read_parquet(teacher_path)
    check_rows(teacher, teacher_path)
    shard, n_shards = int(p["shard"]), int(p["n_shards"])
    rows = shard_rows(teacher, shard, n_shards)
    if rows.height == 0:
        raise ValueError(f"{teacher_path}: shard {shard} of {n_shards} is empty ({teacher.height} rows); lower n_shards")
    layers = [int(layer) for layer in p["layers"]]
    pair = load_pair(p["pt"], p["it"], p.get("dtype", "auto"), p.get("device", "auto"))
    check_layers(pair.pt, layers)
    store = pick_dtype(p.get("cache_dtype", "auto"), next(pair.pt.parameters()).device)
    caches, index = collect(pair.pt, pair.it, layers, rows, job.batch_size(), store)
    log.info("shard %d/%d: %d prompts, %d answer positions, layers %s", shard, n_shards, rows.height, index.height, layers)
    write_shard(job.output["tensors"], caches, rows, fingerprints(job), shard, n_shards)
    write_parquet(index, job.output["index"])
