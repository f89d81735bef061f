"""Feature scores from per-prompt feature summaries and endpoints, with no model: each endpoint
ridge-regressed on the standardised summaries, the standardised coefficients z-scored across
features (SPEC §7; why the verbosity score is negated: :mod:`postdiff.method.selection.scoring`).
Apart from the model pass so that the scores' plot imports no torch."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import polars as pl

log = logging.getLogger(__name__)

# Endpoint -> (record field, slice where it is defined; None: every prompt).
ENDPOINTS: dict[str, tuple[str, str | None]] = {
    "qa": ("em", "QA"),
    "math": ("em", "Math"),
    "format": ("format_pass", "Format"),
    "brevity": ("brevity_excess", "Brevity"),
    "refusal": ("refusal", None),
}
CAPABILITY = ("qa", "math", "format")
SCORES = {"cap_score": "capability", "verb_score": "verbosity", "refusal_score": "refusal"}
SCORE_SCHEMA = {
    "layer": pl.Int64,
    "feature": pl.Int64,
    "cap_score": pl.Float64,
    "verb_score": pl.Float64,
    "refusal_score": pl.Float64,
    **{f"coef_{e}": pl.Float64 for e in ENDPOINTS},
    "mean_z": pl.Float64,
    "activation_mass": pl.Float64,
}


def standardised_coefficients(X: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge coefficients ``[P]`` of standardised ``y`` on standardised columns of ``X [n, P]``.

    A constant column (a dead feature) or a constant endpoint gets coefficient 0.
    """
    # scikit-learn costs a second or two to import: selection, feature-card and stability jobs
    # import this module for its selector helpers and never regress.
    from sklearn.linear_model import Ridge

    coef = np.zeros(X.shape[1])
    live = np.ptp(X, axis=0) > 0
    if len(y) < 2 or np.ptp(y) == 0 or not live.any():
        return coef
    Xl = X[:, live]
    Xs = (Xl - Xl.mean(0)) / Xl.std(0)
    ys = (y - y.mean()) / y.std()
    coef[live] = Ridge(alpha=alpha, fit_intercept=False).fit(Xs, ys).coef_
    return coef


def zscore(values: np.ndarray) -> np.ndarray:
    """Across features; all-equal values give zeros, not NaN."""
    sd = values.std()
    return np.zeros_like(values) if sd == 0 else (values - values.mean()) / sd


def endpoint_values(records: pl.DataFrame) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Endpoint -> (row indices where defined, values), rows in ``records`` order."""
    out = {}
    for name, (field, slice_name) in ENDPOINTS.items():
        defined = records[field].is_not_null()
        if slice_name is not None:
            defined &= records["slice"] == slice_name
        rows = np.flatnonzero(defined.to_numpy())
        out[name] = (rows, records[field].cast(pl.Float64).to_numpy()[rows])
    return out


def feature_scores(
    summaries: np.ndarray, endpoints: Mapping[str, tuple[np.ndarray, np.ndarray]], ridge_alpha: float
) -> dict[str, np.ndarray]:
    """Raw standardised coefficients ``coef_<endpoint>`` and the three z-scored scores."""
    coefs = {}
    for name in ENDPOINTS:
        rows, y = endpoints[name]
        if len(rows) < 2:
            log.warning("endpoint %s is defined on %d selector prompts: coefficients set to 0", name, len(rows))
        coefs[f"coef_{name}"] = standardised_coefficients(summaries[rows], y, ridge_alpha)
    return {
        **coefs,
        "cap_score": zscore(np.mean([coefs[f"coef_{e}"] for e in CAPABILITY], axis=0)),
        "verb_score": zscore(-coefs["coef_brevity"]),
        "refusal_score": zscore(coefs["coef_refusal"]),
    }
