"""The rehearsal pair: the embedded pair's trained text weights in Gemma 3 4B's structure.

Gemma 3 4B PT/IT load as ``Gemma3ForConditionalGeneration`` (the text model inside a multimodal
wrapper with a vision tower), in bfloat16, from sharded safetensors with an index, by hub id from
a Hugging Face cache; their tokenizer carries ``<start_of_turn>``/``<end_of_turn>`` and image
tokens, the embedding has more rows than the tokenizer has ids, and IT's generation config stops
on ``<end_of_turn>`` as well as ``<eos>`` while PT's stops on ``<eos>`` alone. The twin has all
of that, so the real-pair path of the workflow runs end to end on a CPU. Its PT-to-IT gap is the
embedded pair's: the trained text weights move over unchanged, except that the row the embedded
pair stops with moves to ``<end_of_turn>``, so both models end an answer the way Gemma IT does.

Run ``python -m postdiff.models.rehearsal --source results/default/pair`` once a default run has put
the embedded pair there (shipped or trained); the cache in ``workflow/resources/hf_home`` was
made that way.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from postdiff.workflow.io import atomic_path, sha256_file

log = logging.getLogger(__name__)

REPO_IDS = {"pt": "postdiff-rehearsal/gemma-3-tiny-pt", "it": "postdiff-rehearsal/gemma-3-tiny-it"}
TURN_TOKENS = ("<start_of_turn>", "<end_of_turn>")
IMAGE_TOKENS = ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
# Gemma's embedding has more rows than its tokenizer has ids (262,208 vs 262,145).
VOCAB_MULTIPLE = 64
# Small enough that even the tiny models are saved in several shards with an index.
SHARD_SIZE = "1MB"
SEED = 0


def twin_tokenizer(tokenizer) -> dict[str, int]:
    """Add Gemma's turn and image tokens to ``tokenizer`` in place; their ids by token."""
    tokenizer.add_special_tokens({"additional_special_tokens": [*TURN_TOKENS, *IMAGE_TOKENS]})
    return {t: tokenizer.convert_tokens_to_ids(t) for t in (*TURN_TOKENS, *IMAGE_TOKENS)}


def padded_rows(n_ids: int, multiple: int = VOCAB_MULTIPLE) -> int:
    return -(-n_ids // multiple) * multiple


def remap_embeddings(embed: Tensor, n_rows: int, unused: int, stop: int, end_of_turn: int) -> Tensor:
    """The twin's embedding rows from the source's ``embed``.

    Rows past the source (new tokens, padding) copy the ``unused`` row, which training pushed
    down as an output; the source's ``stop`` row moves to ``end_of_turn`` and ``stop`` takes the
    ``unused`` row, so the model ends an answer with ``<end_of_turn>`` instead of ``<eos>``.
    """
    if not 0 <= end_of_turn < n_rows or n_rows < embed.shape[0]:
        raise ValueError(f"end_of_turn id {end_of_turn} or {n_rows} rows do not fit a {embed.shape[0]}-row embedding")
    out = embed[unused].expand(n_rows, -1).clone()
    out[: embed.shape[0]] = embed
    out[end_of_turn] = embed[stop]
    out[stop] = embed[unused]
    return out


def twin_config(text_config, ids: Mapping[str, int], n_rows: int):
    """A ``Gemma3Config``: the source's text config with ``n_rows`` embeddings and a tiny vision tower."""
    from transformers import Gemma3Config, SiglipVisionConfig

    text = text_config.to_dict()
    text["vocab_size"] = n_rows
    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=4,  # 2x2 pooled from the 2x2 patches
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
    )


def twin_model(source: torch.nn.Module, tokenizer, ids: Mapping[str, int]):
    """``Gemma3ForConditionalGeneration`` with ``source``'s text weights (fp32, eval mode)."""
    from transformers import Gemma3ForConditionalGeneration

    n_rows = padded_rows(len(tokenizer))
    torch.manual_seed(SEED)  # the vision tower's random init
    model = Gemma3ForConditionalGeneration(twin_config(source.config, ids, n_rows))
    state = {f"model.language_model.{k.removeprefix('model.')}": v for k, v in source.state_dict().items() if k.startswith("model.")}
    embed = "model.language_model.embed_tokens.weight"
    state[embed] = remap_embeddings(
        state[embed], n_rows, tokenizer.unk_token_id, tokenizer.eos_token_id, ids["<end_of_turn>"]
    )
    missing, unexpected = model.load_state_dict(state, strict=False)
    text_missing = [k for k in missing if "language_model" in k]
    if text_missing or unexpected:
        raise ValueError(f"source text weights do not fit the wrapper: missing {text_missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval()


def generation_config(role: str, tokenizer, ids: Mapping[str, int]):
    """Gemma 3's: IT stops on ``[<eos>, <end_of_turn>]`` and samples by default, PT stops on ``<eos>``."""
    from transformers import GenerationConfig

    common = dict(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    if role == "it":
        return GenerationConfig(
            **common, eos_token_id=[tokenizer.eos_token_id, ids["<end_of_turn>"]], do_sample=True, top_k=64, top_p=0.95
        )
    return GenerationConfig(**common, eos_token_id=tokenizer.eos_token_id)


def snapshot_commit(blobs: Mapping[str, str]) -> str:
    """The snapshot's commit id: a hash of its ``{file name: blob sha256}``, so the same files
    give the same commit on every machine (and a checksum of the whole snapshot)."""
    return hashlib.sha1("".join(f"{n}\0{b}\n" for n, b in sorted(blobs.items())).encode()).hexdigest()


def place_in_cache(files: Path, hf_home: Path, repo_id: str) -> Path:
    """Lay the files of ``files`` out as the hub client caches a download of ``repo_id``.

    ``$HF_HOME/hub/models--org--name/`` with ``blobs/<sha256>``, ``snapshots/<commit>/<file>``
    as relative symlinks to the blobs, and ``refs/main`` naming the :func:`snapshot_commit`.
    """
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    names = sorted(p.name for p in files.iterdir() if p.is_file())
    blobs = {name: sha256_file(files / name) for name in names}
    commit = snapshot_commit(blobs)
    if repo.exists():
        shutil.rmtree(repo)  # a rebuild replaces the repo whole, as a fresh download would
    with atomic_path(repo) as tmp:
        (tmp / "blobs").mkdir(parents=True)
        snapshot = tmp / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, blob in blobs.items():
            shutil.copyfile(files / name, tmp / "blobs" / blob)
            os.symlink(Path("..", "..", "blobs", blob), snapshot / name)
        (tmp / "refs").mkdir()
        (tmp / "refs" / "main").write_text(commit)
    return repo / "snapshots" / commit


def build_twin(source_dir: Path, role: str, hf_home: Path, shard_size: str = SHARD_SIZE) -> Path:
    """Convert the embedded ``role`` model in ``source_dir`` into the cache; its snapshot path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    ids = twin_tokenizer(tokenizer)
    model = twin_model(source, tokenizer, ids)
    model.generation_config = generation_config(role, tokenizer, ids)
    with tempfile.TemporaryDirectory() as tmp:
        model.to(torch.bfloat16).save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
        snapshot = place_in_cache(Path(tmp), hf_home, REPO_IDS[role])
    log.info("%s: %s (%d shards)", REPO_IDS[role], snapshot, len(list(snapshot.glob("model-*.safetensors"))))
    return snapshot


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("results/default/pair"),
                        help="directory holding the embedded pair's pt/ and it/ (default: %(default)s)")
    parser.add_argument("--hf-home", type=Path, default=Path("workflow/resources/hf_home"),
                        help="HF_HOME to place the twin pair in (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for role in ("pt", "it"):
        build_twin(args.source / role, role, args.hf_home)


if __name__ == "__main__":
    main()
