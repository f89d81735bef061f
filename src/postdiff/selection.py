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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl

from postdiff import bootstrap, metrics
from postdiff import variants as V
from postdiff.evaluate import RECORD_SCHEMA, check_budget, evaluate_masks, load_pt
from postdiff.io import read_json, write_json, write_parquet, write_text
from postdiff.runtime import Job
from postdiff.scoring import aligned_records, selector_inputs
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
    "min_gain": 0.0,
}
# Per-prompt selector records of each accepted step's mask (step 1 is the one-feature mask).
STEP_RECORD_SCHEMA = {"step": pl.Int64, **RECORD_SCHEMA}
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
    """Works on floats and, elementwise, on bootstrap resamples ``[B]``."""
    return metrics.verb_carry(m["Len"], refs["pt"]["Len"], refs["it"]["Len"],
                              m["BrevEx"], refs["pt"]["BrevEx"], refs["it"]["BrevEx"])


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


@dataclass(frozen=True)
class State:
    """Forward selection after ``step`` steps: the ordered ``pool``, the mask ``chosen`` so far,
    its ``objective`` (the base objective while empty) and whether it has ``stopped``."""

    pool: tuple[Pair, ...]
    chosen: Mask = ()
    objective: float = math.nan
    step: int = 0
    stopped: bool = False

    @property
    def remaining(self) -> list[Pair]:
        return [c for c in self.pool if c not in self.chosen]

    def to_json(self) -> dict:
        return {"pool": [list(c) for c in self.pool], "chosen": [list(c) for c in self.chosen],
                "objective": self.objective, "step": self.step, "stopped": self.stopped}

    @classmethod
    def from_json(cls, obj: Mapping) -> State:
        return cls(pool=tuple((int(a), int(b)) for a, b in obj["pool"]),
                   chosen=tuple((int(a), int(b)) for a, b in obj["chosen"]),
                   objective=float(obj["objective"]), step=int(obj["step"]), stopped=bool(obj["stopped"]))


def start(pool: Sequence[Pair], base: float, size_cap: int) -> State:
    if size_cap < 0:
        raise ValueError(f"size_cap must be >= 0, got {size_cap}")
    pool = tuple(dict.fromkeys(pool))
    return State(pool=pool, objective=base, stopped=not pool or size_cap == 0)


def shard_candidates(state: State, shard: int, n_shards: int) -> list[Pair]:
    """This shard's share of the next step's candidates (round robin over the pool's order)."""
    return [] if state.stopped else state.remaining[shard::n_shards]


def advance(
    state: State, tried: Sequence[Pair], values: Sequence[float], size_cap: int, min_gain: float = 0.0
) -> tuple[State, pl.DataFrame]:
    """Take the best of the next step's ``tried`` candidates if it beats the mask so far by more
    than ``min_gain`` (0: any gain, the paper's rule).

    A NaN objective never counts as better; ties go to the candidate earlier in the pool.
    Returns the new state and the step's rows (every tried candidate, the chosen one flagged).
    """
    if state.stopped:
        return state, pl.DataFrame(schema=STEP_SCHEMA)
    step = state.step + 1
    order = {c: i for i, c in enumerate(state.pool)}
    values = [float(v) for v in values]
    if sorted(tried, key=order.__getitem__) != state.remaining:
        raise ValueError(f"step {step}: evaluated candidates {list(tried)} are not the remaining pool {state.remaining}")
    best = max(range(len(tried)), key=lambda i: (-math.inf if math.isnan(values[i]) else values[i], -order[tried[i]]))
    better = not math.isnan(values[best]) and (math.isnan(state.objective) or values[best] > state.objective + min_gain)
    rows = pl.DataFrame(
        [dict(step=step, layer=c[0], feature=c[1], objective=v, chosen=better and i == best)
         for i, (c, v) in sorted(enumerate(zip(tried, values)), key=lambda t: order[t[1][0]])],
        schema=STEP_SCHEMA,
    )
    log.info("step %d: best %s objective %.5f (current %.5f)%s", step, tried[best], values[best], state.objective,
             "" if better else ": stop")
    if not better:
        return State(state.pool, state.chosen, state.objective, step, stopped=True), rows
    chosen = state.chosen + (tried[best],)
    done = len(chosen) >= size_cap or len(chosen) == len(state.pool)
    return State(state.pool, chosen, values[best], step, stopped=done), rows


def forward_select(
    pool: Sequence[Pair],
    objective: Callable[[list[Mask]], list[float]],
    base: float,
    size_cap: int,
    min_gain: float = 0.0,
) -> tuple[Mask, float, pl.DataFrame]:
    """Add, one at a time, the candidate whose mask scores highest, while that beats the mask
    so far (``base`` for the empty one) by more than ``min_gain`` and the mask is below ``size_cap``.

    ``objective`` scores a list of masks at once (one call per step). Returns the mask, its
    objective and every evaluated candidate per step.
    """
    state, steps = start(pool, base, size_cap), []
    while not state.stopped:
        tried = state.remaining
        state, rows = advance(state, tried, objective([state.chosen + (c,) for c in tried]), size_cap, min_gain)
        steps.append(rows)
    return state.chosen, state.objective, pl.concat(steps) if steps else pl.DataFrame(schema=STEP_SCHEMA)


def step_gains(
    rule: Rule, lam: float, references: Mapping[str, pl.DataFrame], unmasked: pl.DataFrame,
    steps: Sequence[pl.DataFrame], B: int, seed: int, level: float,
) -> list[dict[str, float]]:
    """Each accepted step's gain in the selection objective over the mask before it (the
    ``unmasked`` variant's records before step 1), with a paired, slice-stratified bootstrap
    interval over the selector prompts: every resample redraws the prompts of all masks and
    references alike, and recomputes both objectives."""
    if not steps:
        return []
    # KL is not measured during selection; the objective never reads it.
    frames = {f"ref:{k}": v for k, v in references.items()} | {f"step{t}": f for t, f in enumerate([unmasked, *steps])}
    arrays = metrics.align({k: f.with_columns(pl.col("kl").fill_null(0.0)) for k, f in frames.items()})
    counts = bootstrap.resample_counts(bootstrap.stratified_indices(arrays.codes, B, np.random.default_rng(seed)))
    point = metrics.summary(arrays, "ref:pt", "ref:it")
    samples = bootstrap.resampled_metrics(arrays, list(frames), counts, "ref:pt", "ref:it")

    def objective(by_variant: Mapping[str, Mapping], t: int):
        refs = {k.removeprefix("ref:"): v for k, v in by_variant.items() if k.startswith("ref:")}
        return rule.objective(by_variant[f"step{t}"], refs, lam)

    out = []
    for t in range(1, len(steps) + 1):
        lo, hi = bootstrap.percentile_interval(objective(samples, t) - objective(samples, t - 1), level)
        out.append({"step": t, "objective": float(objective(point, t)),
                    "gain": float(objective(point, t) - objective(point, t - 1)), "lo": lo, "hi": hi})
    return out


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


@dataclass
class Selection:
    """One selection job's inputs, read and checked: the candidate pool, the base objective,
    and (on demand) the PT model and surrogates that evaluate candidate masks."""

    job: Job
    rule: Rule
    cutoff: float | None
    exclusion: float | None
    lam: float
    size_cap: int
    min_gain: float
    max_candidates: int | None
    pool: list[Pair]
    base: float
    score_of: Callable[[Metrics], float]
    rows: pl.DataFrame
    variant: Variant
    references: dict[str, pl.DataFrame]  # the references' selector records, in ``rows`` order
    # Records of every mask evaluated in this job, so accepted steps' records can be saved.
    evaluated: dict[Mask, pl.DataFrame] = field(default_factory=dict)

    @classmethod
    def read(cls, job: Job, rule: Rule) -> Selection:
        p = job.params
        cutoff, exclusion = _param(p, rule.cutoff_key), _param(p, rule.exclusion_key)
        lam = float(p.get("lambda", DEFAULTS["lambda"]))
        size_cap = int(p.get("size_cap", DEFAULTS["size_cap"]))
        min_gain = float(p.get("min_gain", DEFAULTS["min_gain"]))
        max_candidates = p.get("max_candidates", DEFAULTS["max_candidates"])
        max_candidates = None if max_candidates is None else int(max_candidates)
        max_new_tokens = int(p["max_new_tokens"])
        if size_cap < 0 or (max_candidates is not None and max_candidates < 1) or not min_gain >= 0:
            raise ValueError(f"selection: need size_cap >= 0, max_candidates >= 1 and min_gain >= 0, "
                             f"got {size_cap}, {max_candidates}, {min_gain}")
        scores = pl.read_parquet(job.input["scores"])
        needed = ["layer", "feature", rule.score, *([rule.exclude_by] if rule.exclude_by else [])]
        if missing := [c for c in needed if c not in scores.columns]:
            raise ValueError(f"{job.input['scores']}: missing columns {missing}")
        full, rows = selector_inputs(job, "selection")
        check_budget(rows, max_new_tokens, job.input["teacher"])
        references = {}
        for ref in rule.references:
            path = job.input[f"{ref}_records"]
            references[ref] = aligned_records(pl.read_parquet(path), rows["id"].to_list(), path)
            if int(references[ref]["n_tokens"].max()) > max_new_tokens:
                raise ValueError(f"{path}: records run past max_new_tokens={max_new_tokens}; use the same budget")
        refs = {ref: selector_metrics(records) for ref, records in references.items()}

        def score_of(m: Metrics) -> float:
            return float(rule.objective(m, refs, lam))

        pool = candidates(scores, rule, cutoff, exclusion, max_candidates)
        log.info("%s: %d candidates, base objective %.5f", rule.name, len(pool), score_of(refs[rule.unmasked]))
        return cls(job, rule, cutoff, exclusion, lam, size_cap, min_gain, max_candidates, pool, score_of(refs[rule.unmasked]),
                   score_of, rows,
                   Variant(name=f"select_{rule.name}", mode=rule.mode, gates=full.gates, surrogates=full.surrogates),
                   references)

    def start(self) -> State:
        return start(self.pool, self.base, self.size_cap)

    @cached_property
    def pt(self) -> tuple[Any, Any]:
        """The PT model and tokenizer, loaded on first use (a stopped selection never loads them)."""
        return load_pt(self.job.params)

    def objective(self) -> Callable[[list[Mask]], list[float]]:
        """Scores masks in one batched generation over the selector prompts."""
        p = self.job.params
        model, tokenizer = self.pt
        modules = V.materialise(self.variant, next(model.parameters()).device)[0]

        def objective(masks: list[Mask]) -> list[float]:
            if not masks:
                return []
            records = evaluate_masks(model, tokenizer, self.rows, self.variant, modules, [layer_mask(m) for m in masks],
                                     int(p["max_new_tokens"]), self.job.batch_size())
            for c, mask in enumerate(masks):
                self.evaluated[mask] = records.filter(pl.col("candidate") == c).drop("candidate")
            return [self.score_of(selector_metrics(self.evaluated[mask])) for mask in masks]

        return objective

    def step_records(self, mask: Mask) -> pl.DataFrame:
        """Selector records of the masks ``mask[:1], mask[:2], ...``, evaluated in this job."""
        frames = [self.evaluated[mask[:t]].with_columns(pl.lit(t, dtype=pl.Int64).alias("step")) for t in range(1, len(mask) + 1)]
        return pl.concat([f.select(list(STEP_RECORD_SCHEMA)) for f in frames]) if frames else pl.DataFrame(schema=STEP_RECORD_SCHEMA)

    def write(self, mask: Mask, objective: float, steps: pl.DataFrame, records: pl.DataFrame) -> None:
        """The mask JSON (with each accepted step's gain and its interval), the steps' rows and
        the accepted steps' per-prompt records."""
        out, p = self.job.output, self.job.params.get("gain_bootstrap", {})
        by_step = [records.filter(pl.col("step") == t).drop("step") for t in range(1, len(mask) + 1)]
        gains = step_gains(self.rule, self.lam, self.references, self.references[self.rule.unmasked], by_step,
                           int(p.get("B", 10_000)), int(p.get("seed", 0)), float(p.get("level", 0.95)))
        for gain, pair in zip(gains, mask):
            log.info("step %d: %s gain %.5f [%.5f, %.5f]", gain["step"], pair, gain["gain"], gain["lo"], gain["hi"])
        write_parquet(steps, out["steps"])
        write_parquet(records, out["records"])
        write_json(
            {
                "step_gains": [{**g, "layer": pair[0], "feature": pair[1]} for g, pair in zip(gains, mask)],
                "rule": self.rule.name,
                "mask": layer_mask(mask),
                "order": [list(pair) for pair in mask],
                "objective": objective,
                "base_objective": self.base,
                "cutoff": self.cutoff,
                "exclusion": self.exclusion,
                "lambda": self.lam,
                "size_cap": self.size_cap,
                "min_gain": self.min_gain,
                "max_candidates": self.max_candidates,
                "n_candidates": len(self.pool),
            },
            out["mask"],
        )


def _rule(job: Job) -> Rule:
    name = job.params.get("selection")
    if name not in RULES:
        raise ValueError(f"selection: params.selection must be one of {sorted(RULES)}, got {name!r}")
    return RULES[name]


def select(job: Job) -> None:
    """Stage: a whole forward selection in one job. params: ``selection`` (``cap`` or ``vmask``),
    ``lambda``, ``size_cap``, ``max_candidates``, ``max_new_tokens``, ``batch_size``, ``pt``,
    ``dtype``, ``device`` and the rule's thresholds (``cap_cutoff`` and ``verb_exclusion``, or
    ``verb_cutoff``); input: ``variant`` (FullDelta spec), ``split``, ``teacher`` (selector),
    ``scores`` and the references' records (``pt_records``, ``it_records``, and for VMask
    ``full_records``); output: ``mask`` (JSON), ``steps`` (Parquet)."""
    sel = Selection.read(job, _rule(job))
    objective = sel.objective() if sel.pool else None
    mask, value, steps = forward_select(sel.pool, objective, sel.base, sel.size_cap, sel.min_gain)
    sel.write(mask, value, steps, sel.step_records(mask))


def _previous(job: Job, sel: Selection) -> State:
    """The state after the previous step: input ``state`` (absent for the first step)."""
    path = job.input.get("state")
    if not path:
        return sel.start()
    state = State.from_json(read_json(path))
    if list(state.pool) != sel.pool:
        raise ValueError(f"{path}: its candidate pool differs from the one these inputs give; rerun its step")
    return state


def select_shard(job: Job) -> None:
    """Stage: one shard of one selection step. As :func:`select`, plus params ``shard`` and
    ``n_shards`` and input ``state`` (the previous step's, absent for step 1); output
    ``values`` (Parquet: layer, feature, objective of this shard's candidates). A stopped
    selection evaluates nothing and loads no model."""
    sel = Selection.read(job, _rule(job))
    state = _previous(job, sel)
    tried = shard_candidates(state, int(job.params["shard"]), int(job.params["n_shards"]))
    values = sel.objective()([state.chosen + (c,) for c in tried]) if tried else []
    write_parquet(pl.DataFrame({"layer": [c[0] for c in tried], "feature": [c[1] for c in tried], "objective": values},
                               schema={"layer": pl.Int64, "feature": pl.Int64, "objective": pl.Float64}),
                  job.output["values"])
    # Every tried mask's records: the step's merge keeps the accepted one's.
    candidate = {"layer": pl.Int64, "feature": pl.Int64}
    records = [sel.evaluated[state.chosen + (c,)].with_columns(pl.lit(c[0]).alias("layer"), pl.lit(c[1]).alias("feature"))
               for c in tried]
    write_parquet(pl.concat([r.select(*RECORD_SCHEMA, *candidate) for r in records]) if records
                  else pl.DataFrame(schema={**RECORD_SCHEMA, **candidate}), job.output["records"])


def select_step(job: Job) -> None:
    """Stage: merge one step's shards into the next state. Input as :func:`select_shard` plus
    ``values`` (every shard's); output ``state`` (JSON) and ``steps`` (this step's rows)."""
    sel = Selection.read(job, _rule(job))
    state = _previous(job, sel)
    paths = job.input["values"]
    values = pl.concat([pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)])
    tried = [(int(a), int(b)) for a, b in values.select("layer", "feature").iter_rows()]
    before = len(state.chosen)
    state, steps = advance(state, tried, values["objective"].to_list(), sel.size_cap, sel.min_gain)
    records = pl.DataFrame(schema=STEP_RECORD_SCHEMA)
    if len(state.chosen) > before:
        layer, feature = state.chosen[-1]
        paths = job.input["records"]
        shards = pl.concat([pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)])
        accepted = shards.filter((pl.col("layer") == layer) & (pl.col("feature") == feature))
        records = accepted.with_columns(pl.lit(len(state.chosen), dtype=pl.Int64).alias("step")).select(list(STEP_RECORD_SCHEMA))
    write_parquet(steps, job.output["steps"])
    write_parquet(records, job.output["records"])
    write_json(state.to_json(), job.output["state"])


def select_finish(job: Job) -> None:
    """Stage: the mask and steps of a sharded selection. Input as :func:`select_step`, with
    ``state`` the last step's and ``steps`` every step's rows; output as :func:`select`."""
    sel = Selection.read(job, _rule(job))
    paths = job.input["steps"]
    steps = pl.concat([pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)])
    state = _previous(job, sel)
    if not state.stopped:
        raise ValueError(f"{job.input['state']}: selection has not finished after step {state.step}")
    paths = job.input["step_records"]
    records = pl.concat([pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)])
    sel.write(state.chosen, state.objective, steps, records.sort("step", maintain_order=True))


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
