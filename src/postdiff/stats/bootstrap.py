"""Prompt-level paired bootstrap, stratified by slice (SPEC §9).

One index matrix ``[B, n]`` resamples prompts within their slice; every variant, PT and IT
included, is resampled with the same rows, and each statistic (ratios too) is recomputed per
resample. A resample's means are ``counts @ contributions`` (``counts[b, j]`` = how often
prompt ``j`` was drawn), which equals gathering ``x[idx]`` and averaging, in one matrix product.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple, Union

import numpy as np
import polars as pl

from postdiff.stats import metrics
from postdiff.stats.metrics import PromptArrays

log = logging.getLogger(__name__)


ComparisonSpec = Union["Comparison", Mapping, Sequence]


class Comparison(NamedTuple):
    a: str
    b: str
    metric: str
    label: str

    @classmethod
    def parse(cls, raw: ComparisonSpec) -> Comparison:
        """From ``{"a", "b", "metric", "label"?}`` or ``[a, b, metric(, label)]`` (config YAML)."""
        if isinstance(raw, Mapping):
            unknown = set(raw) - {"a", "b", "metric", "label"}
            if unknown or not {"a", "b", "metric"} <= set(raw):
                raise ValueError(f"comparison {dict(raw)}: needs keys a, b, metric "
                                 "(label optional)")
            a, b, metric, label = raw["a"], raw["b"], raw["metric"], raw.get("label")
        elif not isinstance(raw, str) and len(raw) in (3, 4):
            a, b, metric, label = (*raw, None)[:4]
        else:
            raise ValueError(f"comparison {raw!r}: expected (a, b, metric[, label])")
        if metric not in metrics.METRICS:
            raise ValueError(f"comparison {raw!r}: unknown metric {metric!r}; "
                             f"expected one of {metrics.METRICS}")
        return cls(str(a), str(b), str(metric), str(label or f"{a} vs {b}"))


# The paper's Table 2.
DEFAULT_COMPARISONS = tuple(Comparison.parse(c) for c in [
    ("FullDelta", "PT", "Cap"),
    ("FullDelta", "PT", "Len"),
    ("CapMask", "PT", "Cap"),
    ("FullDelta - VMask", "FullDelta", "Cap", "VMask subtraction vs FullDelta"),
    ("FullDelta - VMask", "FullDelta", "Len", "VMask subtraction vs FullDelta"),
    ("FullDelta - VMask", "FullDelta", "VerbCarry", "VMask subtraction vs FullDelta"),
    ("MeanDiff", "FullDelta", "Cap"),
])


def stratified_indices(codes: np.ndarray, B: int, rng: np.random.Generator) -> np.ndarray:
    """``[B, n]`` resampled prompt positions; column ``j`` only draws from the slice of ``j``."""
    idx = np.empty((B, len(codes)), np.int64)
    for s in np.unique(codes):
        members = np.flatnonzero(codes == s)
        idx[:, members] = members[rng.integers(0, len(members), size=(B, len(members)))]
    return idx


def resample_counts(idx: np.ndarray) -> np.ndarray:
    """``[B, n]`` multiplicity of each prompt in each resample."""
    B, n = idx.shape
    flat = (idx + n * np.arange(B)[:, None]).ravel()
    return np.bincount(flat, minlength=B * n).reshape(B, n).astype(np.float64)


def resampled_metrics(arrays: PromptArrays, variants: Iterable[str], counts: np.ndarray,
                      pt: str | None, it: str | None) -> dict[str, dict[str, np.ndarray]]:
    """Every metric ``[B]`` of ``variants`` (plus the references) under each resample."""
    names = list(dict.fromkeys([*variants, *(r for r in (pt, it) if r in arrays.prompts)]))
    terms = np.concatenate([metrics.contributions(arrays.prompts[v], arrays.codes)
                            for v in names], axis=1)
    sums = (counts @ terms).reshape(len(counts), len(names), len(metrics.BASE))
    base = {v: metrics.from_sums(sums[:, i]) for i, v in enumerate(names)}
    return metrics.with_relative(base, pt, it)


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval, skipping resamples where a ratio metric is undefined."""
    bad = np.isnan(samples)
    if bad.all():
        return float("nan"), float("nan")
    if bad.any():
        warnings.warn(f"{int(bad.sum())} of {bad.size} resamples undefined (NaN); interval "
                      "from the rest", RuntimeWarning, stacklevel=2)
    lo, hi = np.quantile(samples[~bad], [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def _check(arrays: PromptArrays, variants: Iterable[str], needs_refs: bool, pt: str | None,
           it: str | None, B: int, level: float) -> None:
    for v in variants:
        if v not in arrays.prompts:
            raise ValueError(f"variant {v!r} has no evaluation records; have {arrays.variants}")
    if needs_refs and (pt not in arrays.prompts or it not in arrays.prompts):
        raise ValueError(f"CapRec/VerbCarry need both references {pt!r} and {it!r}; "
                         f"have {arrays.variants}")
    if B < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs B >= 1 and 0 < level < 1, got B={B}, level={level}")


def _as_arrays(records: PromptArrays | Mapping[str, pl.DataFrame]) -> PromptArrays:
    return records if isinstance(records, PromptArrays) else metrics.align(records)


def _counts(arrays: PromptArrays, B: int, seed: int) -> np.ndarray:
    idx = stratified_indices(arrays.codes, B, np.random.default_rng(seed))
    return resample_counts(idx)


def bootstrap_comparisons(records: PromptArrays | Mapping[str, pl.DataFrame],
                          comparisons: Sequence[ComparisonSpec] = DEFAULT_COMPARISONS,
                          B: int = 10_000, seed: int = 0, level: float = 0.95,
                          pt: str = "PT", it: str = "IT") -> pl.DataFrame:
    """Delta ``metric(a) - metric(b)`` and its percentile interval for each comparison; all share
    one index matrix, so each row equals :func:`paired_bootstrap` with the same seed."""
    arrays = _as_arrays(records)
    comps = [Comparison.parse(c) for c in comparisons]
    variants = [v for c in comps for v in (c.a, c.b)]
    _check(arrays, variants, any(c.metric in metrics.RELATIVE for c in comps), pt, it, B, level)
    log.info("paired bootstrap: %d comparisons, %d prompts, B=%d, seed %d",
             len(comps), len(arrays.ids), B, seed)
    point = metrics.summary(arrays, pt, it)
    resampled = resampled_metrics(arrays, variants, _counts(arrays, B, seed), pt, it)
    rows = []
    for c in comps:
        diff = resampled[c.a][c.metric] - resampled[c.b][c.metric]
        lo, hi = percentile_interval(diff, level)
        rows.append({"comparison": c.label, "variant_a": c.a, "variant_b": c.b,
                     "metric": c.metric, "delta": point[c.a][c.metric] - point[c.b][c.metric],
                     "lo": lo, "hi": hi, "level": level, "B": B, "seed": seed})
    return pl.DataFrame(rows)


def paired_bootstrap(records: PromptArrays | Mapping[str, pl.DataFrame], a: str, b: str,
                     metric: str, B: int = 10_000, seed: int = 0, level: float = 0.95,
                     pt: str = "PT", it: str = "IT") -> tuple[float, float, float]:
    """``(delta, lo, hi)`` of ``metric(a) - metric(b)``."""
    table = bootstrap_comparisons(records, [(a, b, metric)], B, seed, level, pt, it)
    row = table.row(0, named=True)
    return row["delta"], row["lo"], row["hi"]


def bootstrap_estimates(records: PromptArrays | Mapping[str, pl.DataFrame],
                        variants: Sequence[str], metric_names: Sequence[str], B: int = 10_000,
                        seed: int = 0, level: float = 0.95, pt: str = "PT",
                        it: str = "IT") -> pl.DataFrame:
    """Per-variant estimate and percentile interval of each metric (figure error bars)."""
    arrays = _as_arrays(records)
    unknown = [m for m in metric_names if m not in metrics.METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {metrics.METRICS}")
    _check(arrays, variants, bool(set(metric_names) & set(metrics.RELATIVE)), pt, it, B, level)
    point = metrics.summary(arrays, pt, it)
    resampled = resampled_metrics(arrays, variants, _counts(arrays, B, seed), pt, it)
    rows = [{"variant": v, "metric": m, "estimate": point[v][m],
             **dict(zip(("lo", "hi"), percentile_interval(resampled[v][m], level)))}
            for v in variants for m in metric_names]
    return pl.DataFrame(rows)
