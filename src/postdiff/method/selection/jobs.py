"""The selection jobs: one whole selection (:func:`select`), or one step sharded over jobs
(:func:`select_shard`, :func:`select_step`, :func:`select_finish`). Each reads the scores, the
selector prompts and the references' records, evaluates masks by batched generation with PT
(every prompt's rows in one batch, so identical edits give identical tokens whatever the batch
size) and hands the objective values to :mod:`postdiff.method.selection.search`. The model and
its code are imported when a job first evaluates a mask: one that copies another sweep point's
selection or merges a sharded step imports no torch.

Evidence (``evidence: split``, the default): the selector prompts are halved, stratified by
slice and seeded; each step picks its best candidate by the gains on the ``choose`` half and
judges whether that step passed by the gain on the ``judge`` half, so the test of a step is not
taken on the prompts that made it the best of many candidates. ``evidence: same`` picks and
judges on every selector prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl

from postdiff.method.records import RECORD_SCHEMA, check_budget
from postdiff.method.selection.inputs import aligned_records, selector_inputs
from postdiff.method.selection.maskfile import layer_mask, read_mask_file
from postdiff.method.selection.search import (
    ROLES,
    RULES,
    Accept,
    Mask,
    Metrics,
    Pair,
    Rule,
    State,
    admitted,
    advance,
    forward_select,
    gain_over,
    gain_interval,
    gain_rule,
    passed_prefix,
    selector_metrics,
    shard_candidates,
    start,
    step_gains,
)
from postdiff.method.spec import Variant
from postdiff.workflow.io import read_json, write_json, write_parquet
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

DEFAULTS = {
    "cap_cutoff": 1.5,
    "verb_exclusion": 1.0,
    "verb_cutoff": 1.5,
    "lambda": 0.5,
    "size_cap": 5,
    "max_candidates": 32,
    "min_gain": 0.0,
    "accept": "gain",
    "fill_to_cap": True,
    "evidence": "split",
    "split_seed": 0,
    "verify": True,
    "verify_margin": 0.001,
}


ACCEPT_RULES = ("gain", "interval")
EVIDENCE = ("split", "same")
HALVES = ("choose", "judge")


def halves(slices: Sequence[str], seed: int) -> np.ndarray:
    """``True`` for the prompts of the ``choose`` half: half of each slice (the odd one to
    ``judge``), drawn with ``seed``."""
    slices = np.asarray(slices)
    choose = np.zeros(len(slices), dtype=bool)
    rng = np.random.default_rng(seed)
    for name in sorted(set(slices.tolist())):
        rows = np.flatnonzero(slices == name)
        choose[rng.permutation(rows)[: len(rows) // 2]] = True
    return choose

STEP_RECORD_SCHEMA = {"step": pl.Int64, "role": pl.String, **RECORD_SCHEMA}


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
    evidence: str
    max_candidates: int | None
    n_admitted: int
    pool: list[Pair]
    rows: pl.DataFrame
    variant: Variant
    references: dict[str, pl.DataFrame]  # the references' selector records, in ``rows`` order
    ids: dict[str, list[str]]  # prompt ids of each half (both every prompt with ``evidence: same``)
    # Records of every mask of each batched call in this job, call by call: a step's incumbent
    # and chosen records come from the same call.
    calls: list[dict[Mask, pl.DataFrame]] = field(default_factory=list)
    # With ``verify``, what verification decided in each call (:class:`~postdiff.models.generation.Verified`).
    verified: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(cls, job: Job, rule: Rule) -> Selection:
        p = job.params
        cutoff, exclusion = _param(p, rule.cutoff_key), _param(p, rule.exclusion_key)
        lam = float(p.get("lambda", DEFAULTS["lambda"]))
        size_cap = int(p.get("size_cap", DEFAULTS["size_cap"]))
        min_gain = float(p.get("min_gain", DEFAULTS["min_gain"]))
        accept_rule = str(p.get("accept", DEFAULTS["accept"]))
        fill_to_cap = bool(p.get("fill_to_cap", DEFAULTS["fill_to_cap"]))
        evidence = str(p.get("evidence", DEFAULTS["evidence"]))
        if evidence not in EVIDENCE:
            raise ValueError(f"selection.evidence must be one of {EVIDENCE}, got {evidence!r}")
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
        everything = admitted(scores, rule, cutoff, exclusion)
        pool = everything[:max_candidates]
        all_ids = rows["id"].to_list()
        if evidence == "split":
            choose = halves(rows["slice"].to_list(), int(p.get("split_seed", DEFAULTS["split_seed"])))
            ids = {"choose": [i for i, c in zip(all_ids, choose) if c],
                   "judge": [i for i, c in zip(all_ids, choose) if not c]}
        else:
            ids = {"choose": all_ids, "judge": all_ids}
        sel = cls(job, rule, cutoff, exclusion, lam, size_cap, min_gain, accept_rule, fill_to_cap, evidence,
                  max_candidates, len(everything), pool, rows,
                  Variant(name=f"select_{rule.name}", mode=rule.mode, gates=full.gates, surrogates=full.surrogates),
                  references, ids)
        log.info("%s: %d features admitted, pool of %d%s, base objective %.5f (%s half of %d prompts)", rule.name,
                 len(everything), len(pool), " (the cap binds)" if len(pool) < len(everything) else "", sel.base,
                 "choose" if evidence == "split" else "every one", len(ids["choose"]))
        return sel

    @cached_property
    def base(self) -> float:
        """The objective of the unmasked reference (the empty mask) on the choose half."""
        return self.score(self.references[self.rule.unmasked], "choose")

    def half(self, records: pl.DataFrame, name: str) -> pl.DataFrame:
        return records.filter(pl.col("id").is_in(self.ids[name]))

    @cached_property
    def _refs(self) -> dict[str, dict[str, Metrics]]:
        return {name: {ref: selector_metrics(self.half(r, name)) for ref, r in self.references.items()} for name in HALVES}

    def score(self, records: pl.DataFrame, name: str) -> float:
        """The objective of one mask's records on one half of the selector prompts."""
        return float(self.rule.objective(selector_metrics(self.half(records, name)), self._refs[name], self.lam))

    def start(self) -> State:
        return start(self.pool, self.base, self.size_cap)

    @cached_property
    def pt(self) -> tuple[Any, Any]:
        """The PT model and tokenizer, loaded on first use (a stopped selection never loads them)."""
        # Imported here: a job that copies another point's selection or merges a sharded step
        # has no model to run, and torch alone takes over a second to import.
        from postdiff.method.evaluate import load_pt

        return load_pt(self.job.params)

    @property
    def _bootstrap(self) -> tuple[int, int, float]:
        p = self.job.params.get("gain_bootstrap", {})
        return int(p.get("B", 10_000)), int(p.get("seed", 0)), float(p.get("level", 0.95))

    def interval(self, incumbent: pl.DataFrame, chosen: pl.DataFrame, name: str = "judge") -> dict[str, float]:
        """The gain of ``chosen`` over ``incumbent`` on one half, with its paired interval."""
        refs = {k: self.half(v, name) for k, v in self.references.items()}
        return gain_interval(self.rule, self.lam, refs, self.half(incumbent, name), self.half(chosen, name),
                             *self._bootstrap)

    def accept(self, records: Callable[[Pair], tuple[pl.DataFrame, pl.DataFrame]]) -> Accept:
        """The configured rule, on the ``judge`` half of the step's incumbent and candidate records
        (``records(candidate)``, both from the call that measured the candidate); ``gain`` reads
        the gain the caller measured when both halves are every prompt."""
        if self.accept_rule == "gain" and self.evidence == "same":
            return gain_rule(self.min_gain)

        def clears(step: int, candidate: Pair, gain: float) -> bool:
            incumbent, chosen = records(candidate)
            if self.accept_rule == "gain":
                judged = gain_over(self.score(chosen, "judge"), self.score(incumbent, "judge"))
                log.info("step %d: %s gain %.5f on the choose half, %.5f on the judge half", step, candidate, gain,
                         judged)
                return judged > self.min_gain
            test = self.interval(incumbent, chosen)
            log.info("step %d: %s gain %.5f [%.5f, %.5f] on the judge half", step, candidate, test["gain"],
                     test["lo"], test["hi"])
            return test["lo"] > 0

        return clears

    def objective(self) -> Callable[[list[Mask]], list[float]]:
        """Scores masks in one batched generation over the selector prompts; every prompt's rows
        share a batch, so identical edits give identical tokens whatever the batch size."""
        from postdiff.method import variants as V
        from postdiff.method.evaluate import evaluate_masks, verify_masks

        p = self.job.params
        model, tokenizer = self.pt
        modules = V.materialise(self.variant, next(model.parameters()).device)[0]

        def objective(masks: list[Mask]) -> list[float]:
            if not masks:
                return []
            args = (model, tokenizer, self.rows, self.variant, modules, [layer_mask(m) for m in masks],
                    int(p["max_new_tokens"]), self.job.batch_size())
            if p.get("verify", DEFAULTS["verify"]):
                records, verified = verify_masks(*args, float(p.get("verify_margin", DEFAULTS["verify_margin"])))
                self.verified.append({"call": len(self.calls) + 1, "masks": len(masks), **asdict(verified)})
                log.info("call %d: of %d candidate rows %d identical (silent features), %d verified, "
                         "%d diverged (first at %s), %d near ties", len(self.calls) + 1, verified.rows,
                         verified.identical, verified.verified, verified.diverged, verified.diverged_at,
                         verified.near_tie)
            else:
                records = evaluate_masks(*args)
            call = {mask: records.filter(pl.col("candidate") == c).drop("candidate") for c, mask in enumerate(masks)}
            self.calls.append(call)
            return [self.score(call[mask], "choose") for mask in masks]

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
        judged = step_gains(self.rule, self.lam, {k: self.half(v, "judge") for k, v in self.references.items()},
                            self.half(records, "judge"), *self._bootstrap)
        chosen = dict(steps.filter("chosen").select("step", "gain").iter_rows())
        passed = dict(steps.filter("chosen").select("step", "passed").iter_rows())
        gains = [{**g, "choose_gain": chosen[g["step"]]} for g in judged]
        prefix = mask[: passed_prefix([passed[g["step"]] for g in gains])]
        for t, (gain, pair) in enumerate(zip(gains, mask)):
            log.info("step %d: %s gain %.5f on the choose half; %.5f [%.5f, %.5f] on the judge half%s", gain["step"],
                     pair, gain["choose_gain"], gain["gain"], gain["lo"], gain["hi"],
                     "" if t < len(prefix) else (" (passes after a failed step: not in passed_mask)"
                                                 if passed[gain["step"]] else " (fills the cap)"))
        write_parquet(steps, out["steps"])
        write_parquet(records, out["records"])
        write_json(
            {
                "step_gains": [{**g, "layer": pair[0], "feature": pair[1], "passed": passed[g["step"]],
                                "in_passed_prefix": t < len(prefix)}
                               for t, (g, pair) in enumerate(zip(gains, mask))],
                "rule": self.rule.name,
                "mask": layer_mask(mask),
                "order": [list(pair) for pair in mask],
                "passed_mask": layer_mask(prefix),
                "passed_order": [list(pair) for pair in prefix],
                "evidence": self.evidence,
                "n_prompts": {name: len(v) for name, v in self.ids.items()},
                "objective": objective,
                "base_objective": self.base,
                "cutoff": self.cutoff,
                "exclusion": self.exclusion,
                # The point whose job selected: itself, or the sweep point whose pool it shares.
                "selected_at": {"cutoff": self.cutoff, "exclusion": self.exclusion},
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
                **({"verified": self.verified} if self.verified else {}),
            },
            out["mask"],
        )


    def reuse(self) -> None:
        """A sweep point's outputs from another point's selection over the same pool (inputs
        ``shared_mask``, ``shared_steps``, ``shared_records``): its mask, steps and records,
        with this point's thresholds and admitted count."""
        shared = read_mask_file(self.job.input["shared_mask"])
        if [tuple(pair) for pair in shared["pool"]] != self.pool:
            raise ValueError(f"{self.job.input['shared_mask']}: its pool is not this point's; it cannot stand for this selection")
        log.info("pool shared with the point at %s: its selection, not another one", shared["selected_at"])
        out = self.job.output
        write_parquet(pl.read_parquet(self.job.input["shared_steps"]), out["steps"])
        write_parquet(pl.read_parquet(self.job.input["shared_records"]), out["records"])
        write_json({**shared, "cutoff": self.cutoff, "exclusion": self.exclusion, "n_admitted": self.n_admitted,
                    "cap_bound": len(self.pool) < self.n_admitted}, out["mask"])


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
    (JSON), ``steps`` and ``records`` (Parquet). With inputs ``shared_*``, another sweep
    point's selection over the same pool, it copies that (:meth:`Selection.reuse`) and loads
    no model."""
    sel = Selection.read(job, _rule(job))
    if "shared_mask" in job.input:
        return sel.reuse()
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


def _verified_so_far(job: Job) -> list[dict[str, Any]]:
    """With ``verify``, what verification decided in each shard's call of every step so far, as
    the state file (input ``state``) carries it to the next step and on to the mask file."""
    path = job.input.get("state")
    return read_json(path).get("verified", []) if path else []


# A shard's records: its candidates' (layer, feature) and its incumbent's (-1, -1), one call.
INCUMBENT = (-1, -1)

SHARD_RECORD_SCHEMA = {**RECORD_SCHEMA, "layer": pl.Int64, "feature": pl.Int64}

VALUES_SCHEMA = {"layer": pl.Int64, "feature": pl.Int64, "objective": pl.Float64, "incumbent": pl.Float64}


def select_shard(job: Job) -> None:
    """Stage: one shard of one selection step: the incumbent and this shard's candidates in one
    batched call. As :func:`select`, plus params ``shard`` and ``n_shards`` and input ``state``
    (the previous step's, absent for step 1); output ``values`` (Parquet: layer, feature, the
    candidate's objective and the incumbent's from the same call), ``records`` and ``verified``
    (JSON: with ``verify``, what verification decided in the call, as :func:`select`'s mask file
    has it per call; else empty). A stopped selection evaluates nothing and loads no model."""
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
    write_json(sel.verified, job.output["verified"])


def _read_all(paths: str | Sequence[str]) -> list[pl.DataFrame]:
    return [pl.read_parquet(p) for p in ([paths] if isinstance(paths, str) else paths)]


def select_step(job: Job) -> None:
    """Stage: merge one step's shards into the next state. Input as :func:`select_shard` plus
    ``values``, ``records`` and ``verified`` (every shard's); output ``state`` (JSON, with the
    verification counts of every step's shards so far), ``steps`` (this step's rows) and
    ``records`` (the taken step's incumbent and chosen records, from one shard's call)."""
    sel = Selection.read(job, _rule(job))
    state = _previous(job, sel)
    calls = [{**call, "call": state.step + 1, "shard": shard}
             for shard, path in enumerate(job.inputs("verified")) for call in read_json(path)]
    verified = [*_verified_so_far(job), *calls]
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
    write_json({**state.to_json(), **({"verified": verified} if verified else {})}, job.output["state"])


def select_finish(job: Job) -> None:
    """Stage: the mask and steps of a sharded selection. Input as :func:`select_step`, with
    ``state`` the last step's and ``steps`` every step's rows; output as :func:`select`."""
    sel = Selection.read(job, _rule(job))
    steps = pl.concat(_read_all(job.input["steps"]))
    state = _previous(job, sel)
    if not state.stopped:
        raise ValueError(f"{job.input['state']}: selection has not finished after step {state.step}")
    records = pl.concat(_read_all(job.input["step_records"]))
    sel.verified = _verified_so_far(job)
    sel.write(state.chosen, state.objective, steps, records.sort("step", maintain_order=True))
