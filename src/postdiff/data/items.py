"""A suite's rows: the item that both built-in generators produce (the made-up world's,
:mod:`postdiff.data.suite`, and the real-world one, :mod:`postdiff.data.realworld`), the frame
they become, and the phrasings both ask in."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import polars as pl

from postdiff.data.checkers import SLICES

SCHEMA: dict[str, pl.DataType] = {
    "id": pl.Utf8(),
    "slice": pl.Utf8(),
    "prompt": pl.Utf8(),
    "gold": pl.List(pl.Utf8()),
    "checker": pl.Utf8(),
}
ID_PREFIX: dict[str, str] = {
    "QA": "qa", "Math": "math", "Format": "format", "Brevity": "brevity", "Harmful": "harmful",
    "BenignAdjacent": "benign",
}
FORMAT_PHRASES = {
    "json": 'as JSON with the key "answer"',
    "brackets": "in square brackets",
    "quotes": "in double quotes",
}
WORD_LIMITS = (1, 2, 3, 5)


@dataclass(frozen=True)
class Item:
    group: str  # the fact asked about: the sampler spreads a slice over distinct groups first
    prompt: str
    gold: tuple[str, ...]
    checker: str


def items_frame(picked: Mapping[str, Sequence[Item]]) -> pl.DataFrame:
    """The suite frame of each slice's items in order, with ids ``<prefix>-0000`` per slice."""
    rows = [
        {"id": f"{ID_PREFIX[s]}-{i:04d}", "slice": s, "prompt": item.prompt, "gold": list(item.gold),
         "checker": item.checker}
        for s in SLICES
        for i, item in enumerate(picked.get(s, ()))
    ]
    return pl.DataFrame(rows, schema=SCHEMA)
