"""Stage: the IT model's greedy completions of a split, with their exact token ids (SPEC §3)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import polars as pl

from postdiff.models.generation import generate
from postdiff.models.loading import load_model
from postdiff.models.template import encode_prefixes
from postdiff.workflow.io import write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

SCHEMA = {
    "id": pl.String,
    "slice": pl.String,
    "prefix_ids": pl.List(pl.Int64),
    "token_ids": pl.List(pl.Int64),
    "text": pl.String,
    "eos": pl.Boolean,
    "n_tokens": pl.Int64,
}
_NEEDED = ("id", "slice", "prompt")


def completions_frame(
    split: pl.DataFrame,
    prefixes: Sequence[list[int]],
    outputs: Sequence[tuple[list[int], bool]],
    texts: Sequence[str],
) -> pl.DataFrame:
    """Rows of the teacher contract; ``n_tokens`` excludes the EOS."""
    return pl.DataFrame(
        {
            "id": split["id"],
            "slice": split["slice"],
            "prefix_ids": list(prefixes),
            "token_ids": [ids for ids, _ in outputs],
            "text": list(texts),
            "eos": [eos for _, eos in outputs],
            "n_tokens": [len(ids) - int(eos) for ids, eos in outputs],
        },
        schema=SCHEMA,
    )


def _positive_int(params: dict, key: str) -> int:
    value = int(params[key])
    if value < 1:
        raise ValueError(f"teacher param {key} must be >= 1, got {params[key]!r}")
    return value


def teacher(job: Job) -> None:
    split_path = job.input["split"]
    split = pl.read_parquet(split_path)
    missing = [c for c in _NEEDED if c not in split.columns]
    if missing:
        raise ValueError(f"{split_path}: missing columns {missing}")
    max_new_tokens = _positive_int(job.params, "max_new_tokens")
    batch_size = job.batch_size()
    # PT names the other half of the stop set: the teacher stops where every variant stops.
    model, tokenizer = load_model(
        job.params["it"], job.params.get("dtype", "auto"), job.params.get("device", "auto"), partner=job.params["pt"]
    )
    prefixes = encode_prefixes(tokenizer, split["prompt"].to_list())
    log.info("teacher: %d prompts from %s, max_new_tokens %d", len(prefixes), split_path, max_new_tokens)
    outputs = generate(model, tokenizer, prefixes, max_new_tokens, batch_size)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids, _ in outputs]
    write_parquet(completions_frame(split, prefixes, outputs, texts), job.output["completions"])
