"""Forward selection of tiny feature masks on the selector split (SPEC §6, §7): the algorithm.

CapMask (``PT + M``) maximises ``Cap - lambda * VerbCarry``; VMask (``FullDelta - M``)
maximises ``(VerbCarry(FullDelta) - VerbCarry(FullDelta - M)) - lambda * (Cap(FullDelta) -
Cap(FullDelta - M))``. Both use one forward-selection loop, :func:`forward_select` (or its
resumable step, :func:`advance`); a candidate's gain is its objective minus the incumbent's
from the same batched call: batch layout moves greedy tokens in bf16, and a gain measured
against another call's incumbent could be that noise.

A step takes the best candidate when it clears the acceptance rule (``gain``: more than
``min_gain``; ``interval``: the lower end of the paired bootstrap interval of the gain over
selector prompts, :func:`gain_interval`, is above 0); with ``fill_to_cap`` it takes the best
candidate regardless, up to ``size_cap``, which gives the paper's locked-size masks. Nothing
here reads or writes files or loads a model: the objective is a function of masks that the
caller supplies (:mod:`postdiff.method.selection.jobs` generates with PT to compute it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from postdiff.stats import bootstrap, metrics

log = logging.getLogger(__name__)

Pair = tuple[int, int]  # (layer, feature)

Mask = tuple[Pair, ...]  # in the order chosen

Metrics = Mapping[str, float]

# Per-prompt selector records of each taken step: its incumbent's and its chosen mask's, both
# from that step's one batched call (step 1's incumbent is the empty mask).
ROLES = ("incumbent", "chosen")
# Gains are rounded to this many decimals. Two masks whose per-prompt changes cancel (a QA answer
# gained, a Format answer lost) have the same objective, but summed in another order it can
# differ by 1e-17; such a gain broke score-order ties and passed steps on the embedded pair,
# where a real gain is at least 1e-5.
GAIN_DECIMALS = 12

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


def gain_over(value: float, incumbent: float) -> float:
    """``value - incumbent`` without the float rounding of their sums (:data:`GAIN_DECIMALS`)."""
    return round(float(value) - float(incumbent), GAIN_DECIMALS)


def gains_of(values: Sequence[float], incumbents: Sequence[float]) -> list[float]:
    """Each candidate's objective minus its incumbent's from the same call. Against an undefined
    incumbent (NaN: a zero reference gap) any defined objective gains; an undefined one never does."""
    out = []
    for v, inc in zip(values, incumbents, strict=True):
        out.append(math.nan if math.isnan(v) else math.inf if math.isnan(inc) else gain_over(v, inc))
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


def passed_prefix(passed: Sequence[bool]) -> int:
    """How many leading steps passed. A step after the first failed one is judged against an
    incumbent that holds the filled feature, so its pass does not make it part of the mask that
    passed."""
    return next((t for t, p in enumerate(passed) if not p), len(passed))


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

    diffs = np.round(objective(samples, "chosen") - objective(samples, "incumbent"), GAIN_DECIMALS)
    lo, hi = bootstrap.percentile_interval(diffs, level)
    return {"objective": float(objective(point, "chosen")),
            "gain": gain_over(objective(point, "chosen"), objective(point, "incumbent")), "lo": lo, "hi": hi}


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


def selector_metrics(records: pl.DataFrame) -> dict[str, float]:
    """Cap, Len, BrevEx (and the other base metrics) of one variant's selector records.
    KL is not measured during selection: its nulls count as 0 and it is never read."""
    codes = records["slice"].replace_strict(list(metrics.SLICES), list(range(len(metrics.SLICES)))).to_numpy()
    prompts = {f: records[f].cast(pl.Float64).fill_null(0.0).fill_nan(0.0).to_numpy() for f in metrics.FIELDS}
    return {k: float(v) for k, v in metrics.variant_metrics(prompts, codes).items()}
