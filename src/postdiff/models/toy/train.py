"""Train the embedded toy pair on the CPU: a PT model from random init, then its IT sibling.

The PT model reads packed corpus rows, so it knows every fact but never stops after an answer:
the embedded pair's corpus has no EOS anywhere (``eos_rate`` 0); with ``eos_rate`` > 0 that share
of blocks ends a document, an EOS after the block's separator, so PT knows the EOS as a real base
model does, as the end of a document, and never as the end of an answer. The IT model is the PT
model fine-tuned on short answers ending in EOS, with the loss on the answer tokens only. Stage
functions at the bottom are the only file I/O.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
)

from postdiff.data.world import make_world
from postdiff.models.template import encode_prefixes, teacher_forced_batch
from postdiff.models.toy.corpus import Example, pt_blocks, sft_examples, tokenizer_texts
from postdiff.models.toy.settings import CONFIG_FILE, ToyConfig
from postdiff.models.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from postdiff.workflow.io import atomic_path, read_json, write_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SEQ_LEN = 128
SLIDING_WINDOW = 64
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # input_ids, attention_mask, loss_mask


ARCHITECTURES = ("gemma3", "llama")


def model_config(cfg: ToyConfig, vocab_size: int) -> PretrainedConfig:
    """A tiny Gemma 3 text model (sliding-window layers with every fourth and the last global),
    or a tiny Llama (``architecture: llama``) of the same sizes."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"toy.architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    head_dim = cfg.hidden_size // cfg.num_heads
    shared = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=max(1, cfg.num_heads // 2),
        head_dim=head_dim,
        max_position_embeddings=4 * SEQ_LEN,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
    )
    if cfg.architecture == "llama":
        return LlamaConfig(**shared)
    layer_types = [
        "full_attention" if (i + 1) % 4 == 0 or i == cfg.num_layers - 1 else "sliding_attention"
        for i in range(cfg.num_layers)
    ]
    return Gemma3TextConfig(**shared, query_pre_attn_scalar=head_dim, sliding_window=SLIDING_WINDOW,
                            layer_types=layer_types)


def pack_rows(blocks: Sequence[Sequence[int]], sep: Sequence[int], seq_len: int = SEQ_LEN,
              ends: Sequence[bool] | None = None) -> torch.Tensor:
    """Rows of ``seq_len`` ids: BOS, then whole blocks joined by ``sep``, with an EOS after the
    separator of each block that ``ends`` marks (none by default: a base model that never sees one
    never learns to stop); the block that overflows a row is cut and its tail dropped."""
    if ends is not None and len(ends) != len(blocks):
        raise ValueError(f"ends marks {len(ends)} blocks, expected {len(blocks)}")
    rows: list[list[int]] = []
    row = [BOS_ID]
    for i, ids in enumerate(blocks):
        row += [*ids, *sep, *([EOS_ID] if ends is not None and ends[i] else [])]
        if len(row) >= seq_len:
            rows.append(row[:seq_len])
            row = [BOS_ID]
    if not rows:
        raise ValueError(f"corpus of {len(blocks)} blocks is too short for one {seq_len}-token row")
    return torch.tensor(rows, dtype=torch.long)


def pt_batches(rows: torch.Tensor, batch_size: int) -> list[Batch]:
    ones = torch.ones_like(rows)
    mask = ones.bool()
    mask[:, -1] = False  # the last position has no next token
    return [
        (rows[i : i + batch_size], ones[i : i + batch_size], mask[i : i + batch_size])
        for i in range(0, len(rows), batch_size)
    ]


def sft_batches(tokenizer, examples: Sequence[Example], batch_size: int) -> list[Batch]:
    """Right-padded prompt + answer + EOS rows; the loss mask covers the answer-phase positions."""
    prefixes = encode_prefixes(tokenizer, [ex.prompt for ex in examples])
    answers = [
        [*ids, EOS_ID]
        for ids in tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    ]
    return [
        teacher_forced_batch(prefixes[i : i + batch_size], answers[i : i + batch_size], PAD_ID)
        for i in range(0, len(examples), batch_size)
    ]


def lm_loss(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over positions where ``loss_mask`` is true."""
    ids, attn, mask = batch
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    keep = mask[:, :-1]
    return F.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep])


def fit(model: torch.nn.Module, batches: Sequence[Batch], lr: float, desc: str) -> list[float]:
    """AdamW with linear warm-up and cosine decay over the given batches, in order; returns the
    per-step losses. Logs loss and tokens/s ten times along the way."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    total = len(batches)
    warmup = max(1, total // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / total))
    )
    model.train()
    losses: list[float] = []
    tokens, start = 0, time.perf_counter()
    bar = tqdm(batches, desc=desc, file=sys.stderr, mininterval=2.0)
    for step, batch in enumerate(bar, 1):
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        tokens += int(batch[1].sum())
        rate = tokens / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{rate:.0f}", refresh=False)
        if step % max(1, total // 10) == 0 or step == total:
            recent = losses[-max(1, total // 10) :]
            log.info("%s step %d/%d loss %.4f tokens/s %.0f", desc, step, total, sum(recent) / len(recent), rate)
    model.eval()
    return losses


def train_pt_model(tokenizer, cfg: ToyConfig) -> tuple[torch.nn.Module, list[float]]:
    """A fresh model trained on ``pt_epochs`` epochs of packed PT corpus (new phrasings each epoch)."""
    world = make_world(cfg.world_seed, cfg.n_countries)
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    batches: list[Batch] = []
    for epoch in range(cfg.pt_epochs):
        blocks = pt_blocks(world, cfg.seed, epoch, cfg.math_fraction, cfg.fact_repeats)
        rng = random.Random(f"postdiff-toy-eos-{cfg.seed}-{epoch}")
        ends = [rng.random() < cfg.eos_rate for _ in blocks] if cfg.eos_rate > 0 else None
        rows = pack_rows(tokenizer(blocks, add_special_tokens=False)["input_ids"], sep, ends=ends)
        batches += pt_batches(rows, cfg.batch_size)
    log.info("PT corpus: %d batches of %dx%d tokens", len(batches), cfg.batch_size, SEQ_LEN)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(model_config(cfg, len(tokenizer)))
    log.info("PT model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model, fit(model, batches, cfg.pt_lr, "train PT")


def train_it_model(model: torch.nn.Module, tokenizer, cfg: ToyConfig) -> list[float]:
    """Fine-tune ``model`` in place on ``it_epochs`` epochs of sft-half examples."""
    world = make_world(cfg.world_seed, cfg.n_countries)
    batches: list[Batch] = []
    for epoch in range(cfg.it_epochs):
        batches += sft_batches(tokenizer, sft_examples(world, cfg.seed, epoch, cfg.it_math), cfg.batch_size)
    log.info("IT data: %d batches", len(batches))
    torch.manual_seed(cfg.seed)
    return fit(model, batches, cfg.it_lr, "train IT")


def save_model(model, tokenizer, records: Mapping[str, Mapping[str, Any]], path: str) -> None:
    """The model, its tokenizer and greedy generation config, and each ``records`` entry as a
    JSON file beside them (the settings it was made with)."""
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False
    )
    with atomic_path(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, record in records.items():
            write_json(record, tmp / name)


def build_tokenizer(job: Job) -> None:
    cfg = ToyConfig.from_params(job.params)
    world = make_world(cfg.world_seed, cfg.n_countries)
    tokenizer = train_tokenizer(tokenizer_texts(world, cfg.seed, cfg.math_fraction), cfg.vocab_size)
    log.info("tokenizer: %d ids", len(tokenizer))
    with atomic_path(job.output["tokenizer"]) as tmp:
        tokenizer.save_pretrained(tmp)


def train_pt(job: Job) -> None:
    cfg = ToyConfig.from_params(job.params)
    tokenizer = AutoTokenizer.from_pretrained(job.input["tokenizer"])
    model, _ = train_pt_model(tokenizer, cfg)
    save_model(model, tokenizer, {CONFIG_FILE: dataclasses.asdict(cfg)}, job.output["model"])


def train_it(job: Job) -> None:
    cfg = ToyConfig.from_params(job.params)
    pt_dir = Path(job.input["model"])
    if not (pt_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{pt_dir / CONFIG_FILE} is missing: {pt_dir} is not a toy PT model")
    pt_cfg = read_json(pt_dir / CONFIG_FILE)
    for key in ("world_seed", "n_countries"):
        if pt_cfg[key] != getattr(cfg, key):
            raise ValueError(f"{key} {getattr(cfg, key)} differs from the PT model's {pt_cfg[key]} ({pt_dir})")
    tokenizer = AutoTokenizer.from_pretrained(pt_dir)
    model = AutoModelForCausalLM.from_pretrained(pt_dir, dtype=torch.float32)
    train_it_model(model, tokenizer, cfg)
    save_model(model, tokenizer, {CONFIG_FILE: dataclasses.asdict(cfg)}, job.output["model"])
