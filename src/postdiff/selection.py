"""Tiny feature masks chosen by forward selection on the selector split (SPEC §6, §7).

CapMask (``PT + M``) maximises ``Cap - lambda * VerbCarry``; VMask (``FullDelta - M``)
maximises ``(VerbCarry(FullDelta) - VerbCarry(FullDelta - M)) - lambda * (Cap(FullDelta) -
Cap(FullDelta - M))``. Both use one forward-selection loop; each step evaluates the incumbent
mask and all remaining candidates in one batched generation (rows = masks x prompts, a mask per
row, every prompt's rows in one batch), and a candidate's gain is its objective minus the
incumbent's from that same call: batch layout moves greedy tokens in bf16, and a gain measured
against another job's incumbent could be that noise.

A step takes the best candidate when it clears the acceptance rule (``gain``: more than
``min_gain``; ``interval``: the lower end of the paired bootstrap interval of the gain over
selector prompts is above 0); with ``fill_to_cap`` it takes the best candidate regardless,
up to ``size_cap``, which gives the paper's locked-size masks. Baseline masks (random,
activation mass) and the threshold-sweep summary are here too.
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
    "accept": "gain",
    "fill_to_cap": False,
}
ACCEPT_RULES = ("gain", "interval")
# Per-prompt selector records of each taken step: its incumbent's and its chosen mask's, both
# from that step's one batched call (step 1's incumbent is the empty mask).
ROLES = ("incumbent", "chosen")
STEP_RECORD_SCHEMA = {"step": pl.Int64, "role": pl.String, **RECORD_SCHEMA}
STEP_SCHEMA = {
    "step": pl.Int64,
    "layer": pl.Int64,
    "feature": pl.Int64,
    "objective": pl.Float64,
    "gain": pl.Float64,
    "chosen": pl.Boolean,
    "passed": pl.Boolean,
}
# A step's rule: (step, candidate, gain) -> whether the gain clears it.
Accept = Callable[[int, "Pair", float], bool]


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


def admitted(scores: pl.DataFrame, rule: Rule, cutoff: float, exclusion: float | None) -> list[Pair]:
    """Every feature the thresholds admit, best score first (ties by layer, feature)."""
    kept = scores.filter(pl.col(rule.score) >= cutoff)
    if rule.exclude_by is not None and exclusion is not None:
        kept = kept.filter(pl.col(rule.exclude_by) <= exclusion)
    kept = kept.sort([rule.score, "layer", "feature"], descending=[True, False, False])
    return [(int(layer), int(feature)) for layer, feature in kept.select("layer", "feature").iter_rows()]


def candidates(scores: pl.DataFrame, rule: Rule, cutoff: float, exclusion: float | None, max_candidates: int | None) -> list[Pair]:
    """The candidate pool: the admitted features, at most ``max_candidates`` of them."""
    return admitted(scores, rule, cutoff, exclusion)[:max_candidates]


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


def gain_rule(min_gain: float = 0.0) -> Accept:
    """The ``gain`` rule: a step passes when it gains more than ``min_gain`` (0: any gain)."""
    return lambda step, candidate, gain: gain > min_gain


def shard_candidates(state: State, shard: int, n_shards: int) -> list[Pair]:
    """This shard's share of the next step's candidates (round robin over the pool's order)."""
    return [] if state.stopped else state.remaining[shard::n_shards]


def gains_of(values: Sequence[float], incumbents: Sequence[float]) -> list[float]:
    """Each candidate's objective minus its incumbent's from the same call. Against an undefined
    incumbent (NaN: a zero reference gap) any defined objective gains; an undefined one never does."""
    out = []
    for v, inc in zip(values, incumbents, strict=True):
        out.append(math.nan if math.isnan(v) else math.inf if math.isnan(inc) else float(v) - float(inc))
    return out


def advance(
    state: State, tried: Sequence[Pair], values: Sequence[float], incumbents: Sequence[float], size_cap: int,
    accept: Accept = gain_rule(), fill_to_cap: bool = False,
) -> tuple[State, pl.DataFrame]:
    """Take the candidate of the next step with the largest gain over the incumbent (each gain
    from the batched call that measured both) if the gain clears ``accept``, or regardless with
    ``fill_to_cap``.

    NaN gains never win; ties go to the candidate earlier in the pool. Returns the new state and
    the step's rows (every tried candidate; the chosen one flagged, and whether it passed).
    """
    if state.stopped:
        return state, pl.DataFrame(schema=STEP_SCHEMA)
    step = state.step + 1
    order = {c: i for i, c in enumerate(state.pool)}
    values = [float(v) for v in values]
    if sorted(tried, key=order.__getitem__) != state.remaining:
        raise ValueError(f"step {step}: evaluated candidates {list(tried)} are not the remaining pool {state.remaining}")
    gains = gains_of(values, incumbents)
    best = max(range(len(tried)), key=lambda i: (-math.inf if math.isnan(gains[i]) else gains[i], -order[tried[i]]))
    defined = not math.isnan(gains[best])
    passed = defined and accept(step, tried[best], gains[best])
    take = passed or (fill_to_cap and defined)
    rows = pl.DataFrame(
        [dict(step=step, layer=c[0], feature=c[1], objective=v, gain=g, chosen=take and i == best,
              passed=passed and i == best)
         for i, (c, v, g) in sorted(enumerate(zip(tried, values, gains)), key=lambda t: order[t[1][0]])],
        schema=STEP_SCHEMA,
    )
    log.info("step %d: best %s objective %.5f, gain %.5f over the incumbent%s", step, tried[best], values[best],
             gains[best], "" if passed else (": fills the cap" if take else ": stop"))
    if not take:
        return State(state.pool, state.chosen, state.objective, step, stopped=True), rows
    chosen = state.chosen + (tried[best],)
    done = len(chosen) >= size_cap or len(chosen) == len(state.pool)
    return State(state.pool, chosen, values[best], step, stopped=done), rows


def forward_select(
    pool: Sequence[Pair],
    objective: Callable[[list[Mask]], list[float]],
    base: float,
    size_cap: int,
    accept: Accept = gain_rule(),
    fill_to_cap: bool = False,
) -> tuple[Mask, float, pl.DataFrame]:
    """Add, one at a time, the candidate with the largest gain over the mask so far, while that
    gain clears ``accept`` (or, with ``fill_to_cap``, regardless) and the mask is below ``size_cap``.

    ``objective`` scores a list of masks in one call; every step's call has the incumbent first,
    then the candidates. ``base`` is the empty mask's reference objective, kept while nothing is
    taken. Returns the mask, its objective and every evaluated candidate per step.
    """
    state, steps = start(pool, base, size_cap), []
    while not state.stopped:
        tried = state.remaining
        incumbent, *values = objective([state.chosen, *(state.chosen + (c,) for c in tried)])
        state, rows = advance(state, tried, values, [incumbent] * len(tried), size_cap, accept, fill_to_cap)
        steps.append(rows)
    return state.chosen, state.objective, pl.concat(steps) if steps else pl.DataFrame(schema=STEP_SCHEMA)


def gain_interval(
    rule: Rule, lam: float, references: Mapping[str, pl.DataFrame], incumbent: pl.DataFrame, chosen: pl.DataFrame,
    B: int, seed: int, level: float,
) -> dict[str, float]:
    """The objective of ``chosen`` and its gain over ``incumbent`` (records of one step's call),
    with a paired, slice-stratified bootstrap interval over the selector prompts: every resample
    redraws the prompts of both masks and of the references alike, and recomputes both objectives."""
    # KL is not measured during selection; the objective never reads it.
    frames = {f"ref:{k}": v for k, v in references.items()} | {"incumbent": incumbent, "chosen": chosen}
    arrays = metrics.align({k: f.with_columns(pl.col("kl").fill_null(0.0)) for k, f in frames.items()})
    counts = bootstrap.resample_counts(bootstrap.stratified_indices(arrays.codes, B, np.random.default_rng(seed)))
    point = metrics.summary(arrays, "ref:pt", "ref:it")
    samples = bootstrap.resampled_metrics(arrays, list(frames), counts, "ref:pt", "ref:it")

    def objective(by_variant: Mapping[str, Mapping], name: str):
        refs = {k.removeprefix("ref:"): v for k, v in by_variant.items() if k.startswith("ref:")}
        return rule.objective(by_variant[name], refs, lam)

    lo, hi = bootstrap.percentile_interval(objective(samples, "chosen") - objective(samples, "incumbent"), level)
    return {"objective": float(objective(point, "chosen")),
            "gain": float(objective(point, "chosen") - objective(point, "incumbent")), "lo": lo, "hi": hi}


def step_gains(
    rule: Rule, lam: float, references: Mapping[str, pl.DataFrame], records: pl.DataFrame, B: int, seed: int,
    level: float,
) -> list[dict[str, float]]:
    """:func:`gain_interval` of every step in ``records`` (``STEP_RECORD_SCHEMA``)."""
    out = []
    for step in sorted(set(records["step"].to_list())):
        at = records.filter(pl.col("step") == step)
        incumbent, chosen = (at.filter(pl.col("role") == role).drop("step", "role") for role in ROLES)
        out.append({"step": step, **gain_interval(rule, lam, references, incumbent, chosen, B, seed, level)})
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
    the acceptance rule, and (on demand) the PT model and surrogates that evaluate masks."""

    job: Job
    rule: Rule
    cutoff: float | None
    exclusion: float | None
    lam: float
    size_cap: int
    min_gain: float
    accept_rule: str
    fill_to_cap: bool
    max_candidates: int | None
    n_admitted: int
    pool: list[Pair]
    base: float
    score_of: Callable[[Metrics], float]
    rows: pl.DataFrame
    variant: Variant
    references: dict[str, pl.DataFrame]  # the references' selector records, in ``rows`` order
    # Records of every mask of each batched call in this job, call by call: a step's incumbent
    # and chosen records come from the same call.
    calls: list[dict[Mask, pl.DataFrame]] = field(default_factory=list)

    @classmethod
    def read(cls, job: Job, rule: Rule) -> Selection:
        p = job.params
        cutoff, exclusion = _param(p, rule.cutoff_key), _param(p, rule.exclusion_key)
        lam = float(p.get("lambda", DEFAULTS["lambda"]))
        size_cap = int(p.get("size_cap", DEFAULTS["size_cap"]))
        min_gain = float(p.get("min_gain", DEFAULTS["min_gain"]))
        accept_rule = str(p.get("accept", DEFAULTS["accept"]))
        fill_to_cap = bool(p.get("fill_to_cap", DEFAULTS["fill_to_cap"]))
        max_candidates = p.get("max_candidates", DEFAULTS["max_candidates"])
        max_candidates = None if max_candidates is None else int(max_candidates)
        max_new_tokens = int(p["max_new_tokens"])
        if size_cap < 0 or (max_candidates is not None and max_candidates < 1) or not min_gain >= 0:
            raise ValueError(f"selection: need size_cap >= 0, max_candidates >= 1 and min_gain >= 0, "
                             f"got {size_cap}, {max_candidates}, {min_gain}")
        if accept_rule not in ACCEPT_RULES:
            raise ValueError(f"selection.accept must be one of {ACCEPT_RULES}, got {accept_rule!r}")
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

        everything = admitted(scores, rule, cutoff, exclusion)
        pool = everything[:max_candidates]
        log.info("%s: %d features admitted, pool of %d%s, base objective %.5f", rule.name, len(everything), len(pool),
                 " (the cap binds)" if len(pool) < len(everything) else "", score_of(refs[rule.unmasked]))
        return cls(job, rule, cutoff, exclusion, lam, size_cap, min_gain, accept_rule, fill_to_cap, max_candidates,
                   len(everything), pool, score_of(refs[rule.unmasked]), score_of, rows,
                   Variant(name=f"select_{rule.name}", mode=rule.mode, gates=full.gates, surrogates=full.surrogates),
                   references)

    def start(self) -> State:
        return start(self.pool, self.base, self.size_cap)

    @cached_property
    def pt(self) -> tuple[Any, Any]:
        """The PT model and tokenizer, loaded on first use (a stopped selection never loads them)."""
        return load_pt(self.job.params)

    @property
    def _bootstrap(self) -> tuple[int, int, float]:
        p = self.job.params.get("gain_bootstrap", {})
        return int(p.get("B", 10_000)), int(p.get("seed", 0)), float(p.get("level", 0.95))

    def interval(self, incumbent: pl.DataFrame, chosen: pl.DataFrame) -> dict[str, float]:
        return gain_interval(self.rule, self.lam, self.references, incumbent, chosen, *self._bootstrap)

    def accept(self, records: Callable[[Pair], tuple[pl.DataFrame, pl.DataFrame]]) -> Accept:
        """The configured rule. ``interval`` reads the step's incumbent and candidate records
        (``records(candidate)``, both from the call that measured the candidate)."""
        if self.accept_rule == "gain":
            return gain_rule(self.min_gain)

        def clears(step: int, candidate: Pair, gain: float) -> bool:
            test = self.interval(*records(candidate))
            log.info("step %d: %s gain %.5f [%.5f, %.5f]", step, candidate, test["gain"], test["lo"], test["hi"])
            return test["lo"] > 0

        return clears

    def objective(self) -> Callable[[list[Mask]], list[float]]:
        """Scores masks in one batched generation over the selector prompts; every prompt's rows
        share a batch, so identical edits give identical tokens whatever the batch size."""
        p = self.job.params
        model, tokenizer = self.pt
        modules = V.materialise(self.variant, next(model.parameters()).device)[0]

        def objective(masks: list[Mask]) -> list[float]:
            if not masks:
                return []
            records = evaluate_masks(model, tokenizer, self.rows, self.variant, modules, [layer_mask(m) for m in masks],
                                     int(p["max_new_tokens"]), self.job.batch_size())
            call = {mask: records.filter(pl.col("candidate") == c).drop("candidate") for c, mask in enumerate(masks)}
            self.calls.append(call)
            return [self.score_of(selector_metrics(call[mask])) for mask in masks]

        return objective

    def latest(self, candidate: Pair) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The incumbent's and ``candidate``'s records from the last call (its first mask is the incumbent)."""
        call = self.calls[-1]
        incumbent = next(iter(call))
        return call[incumbent], call[incumbent + (candidate,)]

    def step_records(self, mask: Mask) -> pl.DataFrame:
        """Per taken step, the incumbent's and the chosen mask's records from that step's call."""
        frames = [self.calls[t - 1][m].with_columns(pl.lit(t, dtype=pl.Int64).alias("step"), pl.lit(role).alias("role"))
                  for t in range(1, len(mask) + 1) for role, m in zip(ROLES, (mask[: t - 1], mask[:t]))]
        return pl.concat([f.select(list(STEP_RECORD_SCHEMA)) for f in frames]) if frames else pl.DataFrame(schema=STEP_RECORD_SCHEMA)

    def write(self, mask: Mask, objective: float, steps: pl.DataFrame, records: pl.DataFrame) -> None:
        """The mask JSON (with each taken step's gain, its interval and whether it passed the
        rule), the steps' rows and the taken steps' per-prompt records."""
        out = self.job.output
        gains = step_gains(self.rule, self.lam, self.references, records, *self._bootstrap)
        passed = dict(steps.filter("chosen").select("step", "passed").iter_rows())
        for gain, pair in zip(gains, mask):
            log.info("step %d: %s gain %.5f [%.5f, %.5f]%s", gain["step"], pair, gain["gain"], gain["lo"], gain["hi"],
                     "" if passed[gain["step"]] else " (fills the cap)")
        write_parquet(steps, out["steps"])
        write_parquet(records, out["records"])
        write_json(
            {
                "step_gains": [{**g, "layer": pair[0], "feature": pair[1], "passed": passed[g["step"]]}
                               for g, pair in zip(gains, mask)],
                "rule": self.rule.name,
                "mask": layer_mask(mask),
                "order": [list(pair) for pair in mask],
                "objective": objective,
                "base_objective": self.base,
                "cutoff": self.cutoff,
                "exclusion": self.exclusion,
                "lambda": self.lam,
                "size_cap": self.size_cap,
                "accept": self.accept_rule,
                "min_gain": self.min_gain,
                "fill_to_cap": self.fill_to_cap,
                "max_candidates": self.max_candidates,
                "n_admitted": self.n_admitted,
                "n_candidates": len(self.pool),
                "cap_bound": len(self.pool) < self.n_admitted,
                "pool": [list(pair) for pair in self.pool],
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
    ``lambda``, ``size_cap``, ``accept``, ``min_gain``, ``fill_to_cap``, ``max_candidates``,
    ``max_new_tokens``, ``batch_size``, ``pt``, ``dtype``, ``device``, ``gain_bootstrap`` and the
    rule's thresholds (``cap_cutoff`` and ``verb_exclusion``, or ``verb_cutoff``); input:
    ``variant`` (FullDelta spec), ``split``, ``teacher`` (selector), ``scores`` and the references'
    records (``pt_records``, ``it_records``, and for VMask ``full_records``); output: ``mask``
    (JSON), ``steps`` and ``records`` (Parquet)."""
    sel = Selection.read(job, _rule(job))
    objective = sel.objective() if sel.pool else None
    mask, value, steps = forward_select(sel.pool, objective, sel.base, sel.size_cap, sel.accept(sel.latest), sel.fill_to_cap)
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


# A shard's records: its candidates' (layer, feature) and its incumbent's (-1, -1), one call.
INCUMBENT = (-1, -1)
SHARD_RECORD_SCHEMA = {**RECORD_SCHEMA, "layer": pl.Int64, "feature": pl.Int64}
VALUES_SCHEMA = {"layer": pl.Int64, "feature": pl.Int64, "objective": pl.Float64, "incumbent": pl.Float64}


def select_shard(job: Job) -> None:
    """Stage: one shard of one selection step: the incumbent and this shard's candidates in one
    batched call. As :func:`select`, plus params ``shard`` and ``n_shards`` and input ``state``
    (the previous step's, absent for step 1); output ``values`` (Parquet: layer, feature, the
    candidate's objective and the incumbent's from the same call) and ``records``. A stopped
    selection evaluates nothing and loads no model."""
    sel = Selection.read(job, _rule(job))
    state = _previous(job, sel)
    tried = shard_candidates(state, int(job.params["shard"]), int(job.params["n_shards"]))
    incumbent, *values = sel.objective()([state.chosen, *(state.chosen + (c,) for c in tried)]) if tried else [math.nan]
    write_parquet(pl.DataFrame({"layer": [c[0] for c in tried], "feature": [c[1] for c in tried], "objective": values,
                                "incumbent": [incumbent] * len(tried)}, schema=VALUES_SCHEMA), job.output["values"])
    call = sel.calls[-1] if tried else {}
    records = [call[state.chosen + (c,) if c != INCUMBENT else state.chosen].with_columns(
        pl.lit(c[0]).alias("layer"), pl.lit(c[1]).alias("feature")) for c in ([INCUMBENT, *tried] if tried else [])]
    write_parquet(pl.concat([r.select(*SHARD_RECORD_SCHEMA) for r in records]) if records
                  else pl.DataFrame(schema=SHARD_RECORD_SCHEMA), job.output["records"])


def _read_all(paths: str | Sequence[str]) -> list[pl.DataFrame]:
    return [pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)]


def select_step(job: Job) -> None:
    """Stage: merge one step's shards into the next state. Input as :func:`select_shard` plus
    ``values`` and ``records`` (every shard's); output ``state`` (JSON), ``steps`` (this step's
    rows) and ``records`` (the taken step's incumbent and chosen records, from one shard's call)."""
    sel = Selection.read(job, _rule(job))
    state = _previous(job, sel)
    shards = list(zip(_read_all(job.input["values"]), _read_all(job.input["records"]), strict=True))
    values = pl.concat([v for v, _ in shards])
    tried = [(int(a), int(b)) for a, b in values.select("layer", "feature").iter_rows()]
    shard_of = {c: r for v, r in shards for c in v.select("layer", "feature").iter_rows()}

    def records(candidate: Pair) -> tuple[pl.DataFrame, pl.DataFrame]:
        frame = shard_of[candidate]
        return tuple(frame.filter((pl.col("layer") == c[0]) & (pl.col("feature") == c[1])).drop("layer", "feature")
                     for c in (INCUMBENT, candidate))

    before = len(state.chosen)
    state, steps = advance(state, tried, values["objective"].to_list(), values["incumbent"].to_list(), sel.size_cap,
                           sel.accept(records), sel.fill_to_cap)
    taken = pl.DataFrame(schema=STEP_RECORD_SCHEMA)
    if len(state.chosen) > before:
        taken = pl.concat([f.with_columns(pl.lit(state.step, dtype=pl.Int64).alias("step"), pl.lit(role).alias("role"))
                           .select(list(STEP_RECORD_SCHEMA)) for role, f in zip(ROLES, records(state.chosen[-1]))])
    write_parquet(steps, job.output["steps"])
    write_parquet(taken, job.output["records"])
    write_json(state.to_json(), job.output["state"])


def select_finish(job: Job) -> None:
    """Stage: the mask and steps of a sharded selection. Input as :func:`select_step`, with
    ``state`` the last step's and ``steps`` every step's rows; output as :func:`select`."""
    sel = Selection.read(job, _rule(job))
    steps = pl.concat(_read_all(job.input["steps"]))
    state = _previous(job, sel)
    if not state.stopped:
        raise ValueError(f"{job.input['state']}: selection has not finished after step {state.step}")
    records = pl.concat(_read_all(job.input["step_records"]))
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


def jaccard(a: Sequence[Pair], b: Sequence[Pair]) -> float:
    """|a & b| / |a | b|; two empty sets are the same set (1)."""
    a, b = set(map(tuple, a)), set(map(tuple, b))
    return 1.0 if not a | b else len(a & b) / len(a | b)


SWEEP_SCHEMA = {"rule": pl.String, "cutoff": pl.Float64, "exclusion": pl.Float64, "strict": pl.Boolean,
                "n_admitted": pl.Int64, "n_pool": pl.Int64, "cap_bound": pl.Boolean, "pool_jaccard": pl.Float64,
                "n_features": pl.Int64, "mask": pl.String, "mask_jaccard": pl.Float64, "same_as_locked": pl.Boolean,
                "objective": pl.Float64, "pools_differ": pl.Boolean}


def sweep_table(masks: Sequence[Mapping], locked: Mapping) -> pl.DataFrame:
    """One row per sweep point: its thresholds (``strict``: another exclusion than the locked
    mask's), the features admitted before the candidate cap and the pool after it, whether the
    cap bound, the Jaccard index of its pool and mask with the locked ones, its objective, and
    ``pools_differ``: whether any two points had different pools. When no pools differ, every
    point selects from the same candidates and agreeing with the locked mask says nothing."""
    locked_pairs = [tuple(p) for p in locked.get("pool", [])]
    locked_mask = [(layer, f) for layer, fs in mask_of(locked).items() for f in fs]
    pools = [sorted(tuple(p) for p in obj.get("pool", [])) for obj in masks]
    rows = []
    for obj, pool in zip(masks, pools):
        mask = mask_of(obj)
        pairs = [(layer, f) for layer, fs in mask.items() for f in fs]
        rows.append({
            "rule": obj.get("rule"),
            "cutoff": obj.get("cutoff"),
            "exclusion": obj.get("exclusion"),
            "strict": obj.get("exclusion") != locked.get("exclusion"),
            "n_admitted": obj.get("n_admitted"),
            "n_pool": len(pool),
            "cap_bound": obj.get("cap_bound"),
            "pool_jaccard": jaccard(pool, locked_pairs),
            "n_features": len(pairs),
            "mask": json.dumps({str(k): v for k, v in mask.items()}),
            "mask_jaccard": jaccard(pairs, locked_mask),
            "same_as_locked": mask == mask_of(locked),
            "objective": obj.get("objective"),
            "pools_differ": len({tuple(p) for p in pools}) > 1,
        })
    return pl.DataFrame(rows, schema=SWEEP_SCHEMA).sort(["rule", "strict", "cutoff"], nulls_last=True)


def sweep_summary(job: Job) -> None:
    """Stage: input ``masks`` (per-cutoff mask JSONs), ``locked`` (the locked mask JSON);
    output ``summary`` (Parquet) and, when named, ``csv``."""
    paths = job.input["masks"]
    paths = [paths] if isinstance(paths, str) else list(paths)
    table = sweep_table([read_mask_file(path) for path in paths], read_mask_file(job.input["locked"]))
    if not table["pools_differ"].any():
        log.warning("every sweep point selected from the same candidate pool: the sweep cannot tell its "
                    "cutoffs apart (pool of %d; cap bound at %d of %d points)", table["n_pool"][0],
                    int(table["cap_bound"].sum()), table.height)
    write_parquet(table, job.output["summary"])
    if "csv" in job.output:
        write_text(table.write_csv(), job.output["csv"])
