"""Tiny feature masks chosen by forward selection on the selector split (SPEC §6, §7).

CapMask (``PT + M``) maximises ``Cap - lambda * VerbCarry``; VMask (``FullDelta - M``)
maximises ``(VerbCarry(FullDelta) - VerbCarry(FullDelta - M)) - lambda * (Cap(FullDelta) -
Cap(FullDelta - M))``. Both use one forward-selection loop; each step evaluates all remaining
candidates in one batched generation (rows = candidates x prompts, a mask per row).
Baseline masks (random, activation mass) and the threshold-sweep summary are here too.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import polars as pl

from postdiff import metrics
from postdiff import variants as V
from postdiff.evaluate import check_budget, evaluate_masks, join_teacher, load_pt
from postdiff.io import read_json, write_json, write_parquet, write_text
from postdiff.runtime import Job
from postdiff.scoring import aligned_records, check_selector
from postdiff.spec import Variant

log = logging.getLogger(__name__)

Pair = tuple[int, int]  # (layer, feature)
Mask = tuple[Pair, ...]  # in the order chosen
Metrics = Mapping[str, float]

DEFAULTS = {
    "cap_cutoff": 1.5,
    "verb_exclusion": 1.0,
    "verb_cutoff": 1.5,
    "lambda": 0.5,
    "size_cap": 5,
    "max_candidates": 32,
}
STEP_SCHEMA = {
    "step": pl.Int64,
    "layer": pl.Int64,
    "feature": pl.Int64,
    "objective": pl.Float64,
    "chosen": pl.Boolean,
}


@dataclass(frozen=True)
class Rule:
    """One selection target: which variant a mask makes (``mode``; with the empty mask it is
    the reference ``unmasked``), which score ranks candidates, the thresholds that admit them
    (``cutoff`` on ``score``, optional ``exclusion`` ceiling on ``exclude_by``) and which
    records are the objective's references."""

    name: str
    mode: str
    unmasked: str
    score: str
    cutoff_key: str
    exclusion_key: str | None
    exclude_by: str | None
    references: tuple[str, ...]
    objective: Callable[[Metrics, Mapping[str, Metrics], float], float]


def verb_carry(m: Metrics, refs: Mapping[str, Metrics]) -> float:
    return float(metrics.verb_carry(m["Len"], refs["pt"]["Len"], refs["it"]["Len"],
                                    m["BrevEx"], refs["pt"]["BrevEx"], refs["it"]["BrevEx"]))


def cap_objective(m: Metrics, refs: Mapping[str, Metrics], lam: float) -> float:
    return m["Cap"] - lam * verb_carry(m, refs)


def vmask_objective(m: Metrics, refs: Mapping[str, Metrics], lam: float) -> float:
    full = refs["full"]
    return (verb_carry(full, refs) - verb_carry(m, refs)) - lam * (full["Cap"] - m["Cap"])


RULES = {
    "cap": Rule("cap", "add_mask", "pt", "cap_score", "cap_cutoff", "verb_exclusion", "verb_score", ("pt", "it"), cap_objective),
    "vmask": Rule("vmask", "minus_mask", "full", "verb_score", "verb_cutoff", None, None, ("pt", "it", "full"), vmask_objective),
}


def candidates(scores: pl.DataFrame, rule: Rule, cutoff: float, exclusion: float | None, max_candidates: int | None) -> list[Pair]:
    """Admitted features, best score first (ties by layer, feature), at most ``max_candidates``."""
    admitted = scores.filter(pl.col(rule.score) >= cutoff)
    if rule.exclude_by is not None and exclusion is not None:
        admitted = admitted.filter(pl.col(rule.exclude_by) <= exclusion)
    admitted = admitted.sort([rule.score, "layer", "feature"], descending=[True, False, False])
    if max_candidates is not None:
        admitted = admitted.head(max_candidates)
    return [(int(layer), int(feature)) for layer, feature in admitted.select("layer", "feature").iter_rows()]


def forward_select(
    pool: Sequence[Pair], objective: Callable[[list[Mask]], list[float]], base: float, size_cap: int
) -> tuple[Mask, float, pl.DataFrame]:
    """Add, one at a time, the candidate whose mask scores highest, while that beats the mask
    so far (``base`` for the empty one) and the mask is below ``size_cap``.

    ``objective`` scores a list of masks at once. A NaN objective never counts as better;
    ties go to the earlier candidate in ``pool``. Returns the mask, its objective and every
    evaluated candidate per step.
    """
    if size_cap < 0:
        raise ValueError(f"size_cap must be >= 0, got {size_cap}")
    chosen: Mask = ()
    current = base
    steps: list[dict] = []
    remaining = list(dict.fromkeys(pool))
    for step in range(1, size_cap + 1):
        if not remaining:
            break
        values = [float(v) for v in objective([chosen + (c,) for c in remaining])]
        ranked = [(-math.inf if math.isnan(v) else v, -i) for i, v in enumerate(values)]
        best = max(range(len(remaining)), key=lambda i: ranked[i])
        better = not math.isnan(values[best]) and (math.isnan(current) or values[best] > current)
        steps += [
            dict(step=step, layer=c[0], feature=c[1], objective=v, chosen=better and i == best)
            for i, (c, v) in enumerate(zip(remaining, values))
        ]
        log.info("step %d: best %s objective %.5f (current %.5f)%s", step, remaining[best], values[best], current,
                 "" if better else ": stop")
        if not better:
            break
        chosen, current = chosen + (remaining[best],), values[best]
        remaining.pop(best)
    return chosen, current, pl.DataFrame(steps, schema=STEP_SCHEMA)


def layer_mask(mask: Sequence[Pair]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, feature in mask:
        out.setdefault(int(layer), []).append(int(feature))
    return {layer: sorted(features) for layer, features in sorted(out.items())}


def selector_metrics(records: pl.DataFrame) -> dict[str, float]:
    """Cap, Len, BrevEx (and the other base metrics) of one variant's selector records.
    KL is not measured during selection: its nulls count as 0 and it is never read."""
    codes = records["slice"].replace_strict(list(metrics.SLICES), list(range(len(metrics.SLICES)))).to_numpy()
    prompts = {f: records[f].cast(pl.Float64).fill_null(0.0).fill_nan(0.0).to_numpy() for f in metrics.FIELDS}
    return {k: float(v) for k, v in metrics.variant_metrics(prompts, codes).items()}


def _param(params: Mapping, key: str | None) -> float | None:
    if key is None:
        return None
    value = params.get(key, DEFAULTS.get(key))
    return None if value is None else float(value)


def select(job: Job, rule: Rule) -> None:
    p = job.params
    cutoff, exclusion = _param(p, rule.cutoff_key), _param(p, rule.exclusion_key)
    lam = float(p.get("lambda", DEFAULTS["lambda"]))
    size_cap = int(p.get("size_cap", DEFAULTS["size_cap"]))
    max_candidates = p.get("max_candidates", DEFAULTS["max_candidates"])
    max_candidates = None if max_candidates is None else int(max_candidates)
    max_new_tokens, batch_size = int(p["max_new_tokens"]), int(p["batch_size"])
    if size_cap < 0 or (max_candidates is not None and max_candidates < 1):
        raise ValueError(f"selection: need size_cap >= 0 and max_candidates >= 1, got {size_cap}, {max_candidates}")
    scores = pl.read_parquet(job.input["scores"])
    needed = ["layer", "feature", rule.score, *([rule.exclude_by] if rule.exclude_by else [])]
    if missing := [c for c in needed if c not in scores.columns]:
        raise ValueError(f"{job.input['scores']}: missing columns {missing}")

    full = Variant.read(job.input["variant"])
    if full.mode != "full":
        raise ValueError(f"{job.input['variant']}: selection needs the FullDelta spec, got mode {full.mode!r}")
    variant = Variant(name=f"select_{rule.name}", mode=rule.mode, gates=full.gates, surrogates=full.surrogates)
    split = pl.read_parquet(job.input["split"])
    check_selector(split, job.input["split"])
    rows = join_teacher(split, pl.read_parquet(job.input["teacher"]), job.input["split"], job.input["teacher"])
    check_budget(rows, max_new_tokens, job.input["teacher"])
    refs = {}
    for ref in rule.references:
        path = job.input[f"{ref}_records"]
        records = aligned_records(pl.read_parquet(path), rows["id"].to_list(), path)
        if int(records["n_tokens"].max()) > max_new_tokens:
            raise ValueError(f"{path}: records run past max_new_tokens={max_new_tokens}; use the same budget")
        refs[ref] = selector_metrics(records)
    objective_of = partial(rule.objective, refs=refs, lam=lam)
    base = objective_of(refs[rule.unmasked])

    pool = candidates(scores, rule, cutoff, exclusion, max_candidates)
    log.info("%s: %d candidates, base objective %.5f", rule.name, len(pool), base)
    model, tokenizer = load_pt(p) if pool else (None, None)
    modules = V.materialise(variant, next(model.parameters()).device)[0] if pool else {}

    def objective(masks: list[Mask]) -> list[float]:
        records = evaluate_masks(model, tokenizer, rows, variant, modules, [layer_mask(m) for m in masks],
                                 max_new_tokens, batch_size)
        return [objective_of(selector_metrics(records.filter(pl.col("candidate") == c))) for c in range(len(masks))]

    mask, value, steps = forward_select(pool, objective, base, size_cap)
    write_parquet(steps, job.output["steps"])
    write_json(
        {
            "rule": rule.name,
            "mask": layer_mask(mask),
            "order": [list(pair) for pair in mask],
            "objective": value,
            "base_objective": base,
            "cutoff": cutoff,
            "exclusion": exclusion,
            "lambda": lam,
            "size_cap": size_cap,
            "max_candidates": max_candidates,
            "n_candidates": len(pool),
        },
        job.output["mask"],
    )


def select_cap(job: Job) -> None:
    """Stage: CapMask. input: ``variant`` (FullDelta spec), ``split``, ``teacher`` (selector),
    ``scores``, ``pt_records``, ``it_records`` (selector); params: ``cap_cutoff``,
    ``verb_exclusion``, ``lambda``, ``size_cap``, ``max_candidates``, ``max_new_tokens``,
    ``batch_size``, ``pt``, ``dtype``, ``device``; output: ``mask`` (JSON), ``steps`` (Parquet)."""
    select(job, RULES["cap"])


def select_vmask(job: Job) -> None:
    """Stage: VMask. As :func:`select_cap`, plus input ``full_records``; params ``verb_cutoff``
    instead of ``cap_cutoff``/``verb_exclusion``."""
    select(job, RULES["vmask"])


def read_mask_file(path: str) -> dict:
    obj = read_json(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("mask"), dict):
        raise ValueError(f"{path}: not a mask file (needs an object with a 'mask' object)")
    return obj


def mask_of(obj: Mapping) -> dict[int, list[int]]:
    """``{layer: sorted features}`` of a mask file's object, empty layers dropped."""
    return {int(layer): sorted(int(j) for j in f) for layer, f in sorted(obj["mask"].items(), key=lambda kv: int(kv[0])) if f}


def random_mask(sizes: Mapping[int, int], n_features: Mapping[int, int], seed: int) -> dict[int, list[int]]:
    """Uniformly random features, ``sizes[l]`` of them at layer ``l``, without replacement."""
    rng = np.random.default_rng(seed)
    out = {}
    for layer in sorted(sizes):
        if sizes[layer] > n_features[layer]:
            raise ValueError(f"layer {layer}: cannot draw {sizes[layer]} of {n_features[layer]} features")
        out[layer] = sorted(int(j) for j in rng.choice(n_features[layer], size=sizes[layer], replace=False))
    return out


def mass_mask(sizes: Mapping[int, int], scores: pl.DataFrame) -> dict[int, list[int]]:
    """The ``sizes[l]`` features of layer ``l`` with the largest activation mass (ties: lower id)."""
    out = {}
    for layer in sorted(sizes):
        top = scores.filter(pl.col("layer") == layer).sort(["activation_mass", "feature"], descending=[True, False])
        out[layer] = sorted(int(j) for j in top["feature"].head(sizes[layer]))
    return out


def baseline_masks(job: Job) -> None:
    """Stage: size-matched baselines of CapMask. input: ``cap_mask`` (JSON), ``scores``;
    params: ``seed``; output: ``random``, ``mass`` (mask JSONs)."""
    cap = mask_of(read_mask_file(job.input["cap_mask"]))
    scores = pl.read_parquet(job.input["scores"])
    n_features = {int(k): int(v) for k, v in scores.group_by("layer").agg(pl.len()).iter_rows()}
    unknown = sorted(set(cap) - set(n_features))
    if unknown:
        raise ValueError(f"{job.input['cap_mask']}: layers {unknown} are not in {job.input['scores']}")
    sizes = {layer: len(features) for layer, features in cap.items()}
    seed = int(job.params.get("seed", 0))
    write_json({"rule": "random", "mask": random_mask(sizes, n_features, seed), "seed": seed}, job.output["random"])
    write_json({"rule": "activation_mass", "mask": mass_mask(sizes, scores)}, job.output["mass"])


def sweep_table(masks: Sequence[Mapping], locked: Mapping[int, list[int]]) -> pl.DataFrame:
    """One row per cutoff's selection: its thresholds, objective, mask and whether it is the locked one."""
    rows = []
    for obj in masks:
        mask = mask_of(obj)
        rows.append({
            "rule": obj.get("rule"),
            "cutoff": obj.get("cutoff"),
            "exclusion": obj.get("exclusion"),
            "objective": obj.get("objective"),
            "n_features": sum(len(f) for f in mask.values()),
            "mask": json.dumps({str(k): v for k, v in mask.items()}),
            "same_as_locked": mask == locked,
        })
    schema = {"rule": pl.String, "cutoff": pl.Float64, "exclusion": pl.Float64, "objective": pl.Float64,
              "n_features": pl.Int64, "mask": pl.String, "same_as_locked": pl.Boolean}
    return pl.DataFrame(rows, schema=schema).sort(["rule", "cutoff", "exclusion"], nulls_last=True)


def sweep_summary(job: Job) -> None:
    """Stage: input ``masks`` (per-cutoff mask JSONs), ``locked`` (the locked mask JSON);
    output ``summary`` (Parquet) and, when named, ``csv``."""
    paths = job.input["masks"]
    paths = [paths] if isinstance(paths, str) else list(paths)
    table = sweep_table([read_mask_file(path) for path in paths], mask_of(read_mask_file(job.input["locked"])))
    write_parquet(table, job.output["summary"])
    if "csv" in job.output:
        write_text(table.write_csv(), job.output["csv"])
