"""Atomic writers (a stage that fails or is killed never leaves a file that looks finished) and a
checked safetensors reader."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl


@contextmanager
def read_safetensors(path: str | os.PathLike, fmt: str, kind: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """An open safetensors file and its metadata, refused unless it exists and says ``fmt``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: not a {kind} (format {meta.get('format')!r}, want {fmt!r})")
        yield f, meta


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; it is renamed onto ``path`` only on success."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        # A failed stage may leave a temporary file or a whole temporary model directory.
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


def _atomic(write: Callable[[Path], None], path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def write_parquet(df: pl.DataFrame, path: str | os.PathLike) -> None:
    _atomic(lambda p: df.write_parquet(p), path)


def write_json(obj: Any, path: str | os.PathLike) -> None:
    _atomic(lambda p: p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"), path)


def write_text(text: str, path: str | os.PathLike) -> None:
    _atomic(lambda p: p.write_text(text), path)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())
