"""Feature cards, page side: one static HTML page from the Parquet of :mod:`postdiff.outputs.features`.

Self-contained (inline CSS and JS, no network), one section per set of data files (one per
surrogate seed once runs have several), rendered from ``templates/features.html.j2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
from jinja2 import Environment, FileSystemLoader, StrictUndefined

from postdiff.workflow.io import write_text
from postdiff.workflow.runtime import Job

TEMPLATES = Path(__file__).with_name("templates")
FILES = ("cards", "masks", "activity", "contexts", "lens", "layer_lens", "steering")
SPLITS = ("selector", "test")
# Whitespace and control characters would vanish or break a line; show them as marks instead.
VISIBLE = {" ": "␣", "\n": "↵", "\t": "⇥", "\r": "␍"}


def visible_token(piece: str | None) -> str:
    """A token as text that shows every character: whitespace as marks, other non-printing
    characters as ``\\xNN``, the empty string as ``∅``. HTML escaping is the template's job."""
    if piece is None:
        return "∅"
    shown = "".join(VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in piece)
    return shown or "∅"


# How the page names each export layout (workflow/rules/export.smk).
LAYOUTS = {"saelens": "SAELens", "sparsify": "sparsify"}


@dataclass(frozen=True)
class SeedData:
    label: str
    frames: Mapping[str, pl.DataFrame]
    # layout -> layer -> the exported weights file, relative to the page
    exports: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


def read_seed(label: str, paths: Mapping[str, str], exports: Mapping[str, Mapping[int, str]] | None = None) -> SeedData:
    unknown = sorted(set(exports or {}) - set(LAYOUTS))
    if unknown:
        raise ValueError(f"feature_page: unknown export layouts {unknown} (known: {', '.join(LAYOUTS)})")
    return SeedData(label, {name: pl.read_parquet(paths[name]) for name in FILES}, exports or {})


def _by_card(df: pl.DataFrame) -> dict[tuple[int, int], pl.DataFrame]:
    return {(k[0], k[1]): g for k, g in df.partition_by("layer", "feature", as_dict=True, maintain_order=True).items()}


def _tokens(df: pl.DataFrame) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"promoted": [], "suppressed": []}
    for row in df.sort("rank").iter_rows(named=True):
        out[row["direction"]].append({"token": visible_token(row["token"]), "raw": repr(row["token"]), "logit": row["logit"]})
    return out


def _context(row: Mapping) -> dict:
    pieces = [{"text": visible_token(t), "raw": repr(t), "hit": i == row["highlight"]} for i, t in enumerate(row["tokens"])]
    return {"id": row["id"], "activation": row["activation"], "prompt": row["prompt"], "pieces": pieces,
            "next_token": visible_token(row["next_token"])}


def _steering(rows: pl.DataFrame, own: Mapping[str, str]) -> list[dict]:
    return [{"id": r["id"], "prompt": r["prompt"], "pt": own.get(r["id"], ""), "steered": r["text"], "alpha": r["alpha"], "z": r["z"]}
            for r in rows.iter_rows(named=True)]


SCORE_ORDER = ("cap_score", "verb_score", "refusal_score", "coef_qa", "coef_math", "coef_format", "coef_brevity",
               "coef_refusal", "mean_z", "activation_mass", "decoder_norm")


def card_views(data: SeedData) -> list[dict]:
    f = data.frames
    activity, contexts, lens = _by_card(f["activity"]), _by_card(f["contexts"]), _by_card(f["lens"])
    steering = f["steering"]
    own = dict(steering.filter(pl.col("feature").is_null()).select("id", "text").iter_rows())
    steered = _by_card(steering.filter(pl.col("feature").is_not_null()))
    empty = pl.DataFrame()
    views = []
    for card in f["cards"].iter_rows(named=True):
        key = (card["layer"], card["feature"])
        act = activity.get(key, empty)
        ctx = contexts.get(key, empty)
        views.append({
            "layer": card["layer"], "feature": card["feature"], "reasons": card["reasons"],
            "scores": [(name, card.get(name)) for name in SCORE_ORDER if name in card],
            "activity": list(act.iter_rows(named=True)) if act.height else [],
            "contexts": {s: [_context(r) for r in ctx.filter(pl.col("split") == s).sort("rank").iter_rows(named=True)]
                         if ctx.height else [] for s in SPLITS},
            "lens": _tokens(lens.get(key, empty)) if key in lens else {"promoted": [], "suppressed": []},
            "steering": _steering(steered[key], own) if key in steered else [],
            "exports": [{"layout": LAYOUTS[layout], "href": files[card["layer"]]}
                        for layout, files in data.exports.items() if card["layer"] in files],
        })
    return views


def layer_views(df: pl.DataFrame) -> list[dict]:
    return [{"layer": k[0], "vector": k[1], "norm": g["norm"][0], "tokens": _tokens(g)}
            for k, g in df.partition_by("layer", "vector", as_dict=True, maintain_order=True).items()]


def mask_views(df: pl.DataFrame) -> list[dict]:
    return [{"mask": r["mask"], "features": [f"L{l}#{j}" for l, j in zip(r["layer"], r["feature"])]} for r in df.iter_rows(named=True)]


def render(seeds: Sequence[SeedData], steer: bool, title: str = "Feature cards") -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v: "—" if v is None or v != v else f"{v:.3g}"
    sections = [{"label": s.label, "masks": mask_views(s.frames["masks"]), "layers": layer_views(s.frames["layer_lens"]),
                 "cards": card_views(s)} for s in seeds]
    return env.get_template("features.html.j2").render(title=title, sections=sections, steer=steer, splits=SPLITS)


def feature_page(job: Job) -> None:
    """Stage. input: one list per name in FILES, one Parquet per seed; params: labels (one per seed),
    steer, optional exports (one ``{layout: {layer: path}}`` per seed, the files each card links
    to). output.html: the page."""
    labels = list(job.params["labels"])
    lists = {name: job.inputs(name) for name in FILES}
    if any(len(v) != len(labels) for v in lists.values()):
        raise ValueError(f"feature_page: {len(labels)} labels but {[len(v) for v in lists.values()]} files per name")
    exports = job.params.get("exports") or [{}] * len(labels)
    if len(exports) != len(labels):
        raise ValueError(f"feature_page: {len(labels)} labels but export links for {len(exports)} seeds")
    seeds = [read_seed(label, {name: lists[name][i] for name in FILES}, {k: {int(layer): path for layer, path in v.items()}
                                                                            for k, v in exports[i].items()})
             for i, label in enumerate(labels)]
    write_text(render(seeds, bool(job.params["steer"])), job.output["html"])
