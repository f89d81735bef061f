"""The paper's claims as checks: each sentence a run can test, its interval and a verdict.

A claim about a comparison is judged by its paired bootstrap interval, stratified by slice and
recomputed from per-prompt records (:func:`postdiff.stats.bootstrap.bootstrap_comparisons`, the
resamples of Table 2), never by its point estimate. A claim about a selected mask is ``forced``
when the mask was not selected at all: every step was a tie, so it is the top of its candidate pool
by score and the check would come out the same without forward selection
(:func:`postdiff.method.selection.maskfile.forced`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import polars as pl

from postdiff.method.selection.maskfile import forced as mask_forced
from postdiff.stats import bootstrap, metrics, tables
from postdiff.workflow.io import read_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

CONTAINS_ZERO = "CI contains 0"
ABOVE_ZERO = "CI above 0"
EVERY_POINT = "every locked-exclusion point reproduces the locked mask"


@dataclass(frozen=True)
class Claim:
    """One sentence of the paper read as ``metric(a) - metric(b)`` passing ``test``. ``a``, ``b``
    and ``mask`` are roles (pt, full, cap, vmask, late) that the caller maps to variant labels
    and mask files; ``mask`` is the selected mask whose forcing voids the check."""

    paper: str
    label: str
    a: str
    b: str
    metric: str
    test: str
    mask: str | None


CLAIMS = (
    Claim("A frozen 5-feature capability mask recovers no capability at all (Abstract)",
          "CapMask vs PT", "cap", "pt", "Cap", CONTAINS_ZERO, "cap"),
    Claim("Subtracting a learned verbosity mask preserves recovered capability (Abstract)",
          "VMask subtraction vs FullDelta", "vmask", "full", "Cap", CONTAINS_ZERO, "vmask"),
    Claim("Subtracting a learned verbosity mask lengthens outputs (Abstract)",
          "VMask subtraction vs FullDelta", "vmask", "full", "Len", ABOVE_ZERO, "vmask"),
    # §5 gives no margin for "nearly", so the testable reading is that dropping the mid layer
    # costs no capability the interval can detect (0.067 vs 0.070 in the paper).
    Claim("A late-only one-layer ablation nearly matches the two-layer surrogate (Abstract; §5: "
          "0.067 vs 0.070 capability)", "OneLayer-late vs FullDelta", "late", "full", "Cap", CONTAINS_ZERO, None),
)
# An equal mask is the same intervention on the same selector prompts: the mask is what is checked.
SWEEP_CLAIM = "Three nearby cutoff choices reproduce the locked 5-feature capability mask (§5)"

CLAIM_SCHEMA = {"claim": pl.String, "comparison": pl.String, "variant_a": pl.String, "variant_b": pl.String,
                "metric": pl.String, "test": pl.String, "estimate": pl.Float64, "lo": pl.Float64,
                "hi": pl.Float64, "level": pl.Float64, "holds": pl.Boolean, "forced": pl.Boolean,
                "verdict": pl.String}


def interval_holds(test: str, lo: float, hi: float) -> bool:
    """Whether a paired interval ``[lo, hi]`` passes ``test``; an undefined (NaN) one never does."""
    if test == CONTAINS_ZERO:
        return lo <= 0 <= hi
    if test == ABOVE_ZERO:
        return lo > 0
    raise ValueError(f"unknown test {test!r}; expected {CONTAINS_ZERO!r} or {ABOVE_ZERO!r}")


def verdict(holds: bool, forced: bool) -> str:
    """``forced`` wins: a mask that selection did not choose says nothing about selection,
    whichever way its interval falls (``holds`` keeps what the interval said)."""
    return "forced" if forced else "holds" if holds else "fails"


def comparison_claims(records: metrics.PromptArrays | Mapping[str, pl.DataFrame], variants: Mapping[str, str],
                      masks: Mapping[str, Mapping], B: int = 10_000, seed: int = 0,
                      level: float = 0.95) -> pl.DataFrame:
    """One row per claim of :data:`CLAIMS` whose roles ``variants`` (role -> variant label) and
    ``masks`` (role -> mask JSON) provide; all intervals share one resample matrix."""
    testable = []
    for c in CLAIMS:
        missing = [r for r in (c.a, c.b) if r not in variants]
        if c.mask is not None and c.mask not in masks:
            missing.append(c.mask)
        if missing:
            log.info("untestable here (no %s): %s", ", ".join(missing), c.paper)
        else:
            testable.append(c)
    if not testable:
        return pl.DataFrame(schema=CLAIM_SCHEMA)
    intervals = bootstrap.bootstrap_comparisons(
        records, [(variants[c.a], variants[c.b], c.metric, c.label) for c in testable], B=B, seed=seed, level=level)
    rows = []
    for c, row in zip(testable, intervals.iter_rows(named=True)):
        holds = interval_holds(c.test, row["lo"], row["hi"])
        forced = c.mask is not None and mask_forced(masks[c.mask])
        rows.append({"claim": c.paper, "comparison": c.label, "variant_a": row["variant_a"],
                     "variant_b": row["variant_b"], "metric": c.metric, "test": c.test, "estimate": row["delta"],
                     "lo": row["lo"], "hi": row["hi"], "level": level, "holds": holds, "forced": forced,
                     "verdict": verdict(holds, forced)})
    return pl.DataFrame(rows, schema=CLAIM_SCHEMA)


def sweep_claim(summary: pl.DataFrame) -> pl.DataFrame:
    """The sweep's claim, from the sweep summary: it holds when every point under the locked
    verbosity exclusion selected the locked mask (the strict exclusion is meant to differ), and
    is forced when any of those points was forced. ``estimate``: the share that reproduce it."""
    points = summary.filter(~pl.col("strict"))
    if points.height == 0:
        log.info("untestable here (no sweep point under the locked exclusion): %s", SWEEP_CLAIM)
        return pl.DataFrame(schema=CLAIM_SCHEMA)
    holds, forced = bool(points["same_as_locked"].all()), bool(points["forced"].any())
    return pl.DataFrame([{"claim": SWEEP_CLAIM, "comparison": "threshold sweep vs locked mask", "variant_a": None,
                          "variant_b": None, "metric": "same_as_locked", "test": EVERY_POINT,
                          "estimate": float(points["same_as_locked"].mean()), "lo": None, "hi": None,
                          "level": None, "holds": holds, "forced": forced, "verdict": verdict(holds, forced)}],
                        schema=CLAIM_SCHEMA)


def claims_display(frame: pl.DataFrame) -> pl.DataFrame:
    """Claim, Comparison, Metric, Estimate, CI, Test, Verdict (the sweep's CI is n/a)."""
    ci = ["n/a" if lo is None else f"[{lo:.3f}, {hi:.3f}]" for lo, hi in zip(frame["lo"], frame["hi"])]
    return pl.DataFrame({"Claim": frame["claim"], "Comparison": frame["comparison"], "Metric": frame["metric"],
                         "Estimate": frame["estimate"], "CI": ci, "Test": frame["test"], "Verdict": frame["verdict"]})


def claims(job: Job) -> None:
    """Stage: input.evals (test records of the claims' variants), cap_mask and vmask (mask JSONs),
    sweep (summary Parquet); params.variants (role ->
    variant label), B, seed, level; output.csv/md/tex."""
    arrays = metrics.align(metrics.read_eval(job.inputs("evals")))
    masks = {role: read_json(job.input[key]) for role, key in (("cap", "cap_mask"), ("vmask", "vmask"))}
    frame = pl.concat([
        comparison_claims(arrays, job.params["variants"], masks, B=int(job.params.get("B", 10_000)),
                          seed=int(job.params.get("seed", 0)), level=float(job.params.get("level", 0.95))),
        sweep_claim(pl.read_parquet(job.input["sweep"])),
    ])
    tables.write_all(frame, claims_display(frame), None, job.output)
    for row in frame.iter_rows(named=True):
        log.info("%s: %s on %s, %s", row["verdict"], row["comparison"], row["metric"], row["claim"])
