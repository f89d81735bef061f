"""Feature summaries from inside the FullDelta pass and ridge scores (postdiff.method.selection.scoring)."""

import numpy as np
import polars as pl
import pytest
import torch
from test_evaluate import F, World

from postdiff.method import variants as V
from postdiff.method.evaluate import evaluate
from postdiff.method.selection.scoreplot import plot_scores
from postdiff.method.selection.scores import (
    ENDPOINTS,
    SCORE_SCHEMA,
    endpoint_values,
    feature_scores,
    standardised_coefficients,
    zscore,
)
from postdiff.method.selection.scoring import feature_summaries, score_features
from postdiff.models.forward import block_outputs
from postdiff.models.hook import intervene
from postdiff.models.loading import load_model
from postdiff.models.template import teacher_forced_batch
from postdiff.workflow.runtime import Job


def synthetic(n=240, p=30, seed=0):
    """Summaries with planted features: 7 drives capability endpoints, 3 lowers brevity excess
    (IT's brevity), 11 drives refusal; column 20 is a dead feature."""
    rng = np.random.default_rng(seed)
    X = rng.gamma(1.0, 1.0, (n, p))
    X[:, 20] = 0.0
    slices = np.array(["QA", "Math", "Format", "Brevity", "Harmful", "BenignAdjacent"] * (n // 6))
    noise = rng.normal(0, 0.3, n)
    cap = X[:, 7] + noise > 1.0
    records = pl.DataFrame({
        "slice": slices,
        "em": [bool(c) if s in ("QA", "Math") else None for c, s in zip(cap, slices)],
        "format_pass": [bool(c) if s == "Format" else None for c, s in zip(cap, slices)],
        "brevity_excess": [float(max(0.0, 9 - 3 * X[i, 3] + noise[i])) if s == "Brevity" else None
                           for i, s in enumerate(slices)],
        "refusal": (X[:, 11] + noise > 1.5).tolist(),
    })
    return X, records


def test_ridge_scores_recover_planted_features():
    X, records = synthetic()
    scores = feature_scores(X, endpoint_values(records), ridge_alpha=1.0)
    assert int(np.argmax(scores["cap_score"])) == 7
    assert int(np.argmax(scores["verb_score"])) == 3
    assert int(np.argmax(scores["refusal_score"])) == 11
    for key in ("coef_qa", "coef_math", "coef_format", "coef_brevity", "coef_refusal"):
        assert scores[key][20] == 0.0
        assert np.isfinite(scores[key]).all()
    # float64 z-scores of 30 values: mean 0 and std 1 up to summation rounding (measured 4e-17
    # and 1e-16), far inside 1e-12 and approx's default 1e-6 relative.
    for key in ("cap_score", "verb_score", "refusal_score"):
        assert scores[key].mean() == pytest.approx(0.0, abs=1e-12)
        assert scores[key].std() == pytest.approx(1.0)


def test_each_endpoint_uses_only_its_slice():
    _, records = synthetic(n=60)
    values = endpoint_values(records)
    slices = records["slice"].to_numpy()
    assert set(slices[values["qa"][0]]) == {"QA"}
    assert set(slices[values["format"][0]]) == {"Format"}
    assert set(slices[values["brevity"][0]]) == {"Brevity"}
    assert len(values["refusal"][0]) == 60
    assert set(values) == set(ENDPOINTS)


def test_constant_endpoint_or_features_give_zero_not_nan():
    X = np.random.default_rng(1).normal(size=(20, 5))
    assert (standardised_coefficients(X, np.ones(20), 1.0) == 0).all()
    assert (standardised_coefficients(np.ones((20, 5)), np.arange(20.0), 1.0) == 0).all()
    assert (standardised_coefficients(X[:1], np.ones(1), 1.0) == 0).all()
    assert (zscore(np.zeros(4)) == 0).all()
    # Standardised: rescaling a feature or the endpoint leaves the coefficients unchanged.
    y = X[:, 2] * 2 + 0.1 * X[:, 0]
    base = standardised_coefficients(X, y, 1.0)
    scaled = X * np.array([1, 10, 100, 0.1, 5])
    # float64 ridge on rescaled columns: the same solution up to rounding (measured 2e-14
    # relative); approx's default 1e-6 relative.
    assert standardised_coefficients(scaled, 7 * y + 3, 1.0) == pytest.approx(base)
    assert int(np.argmax(base)) == 2


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("scoring"))


def test_summaries_read_the_running_state_of_the_edited_pass(world):
    model, _ = load_model(world.pt, "float32", "cpu")
    rows = world.rows()
    pairs = list(zip(rows["prefix_ids"].to_list(), rows["token_ids"].to_list()))
    full = world.variant("FullDelta", "full")
    modules, _ = V.materialise(full, "cpu")
    summaries, counts = feature_summaries(model, pairs, full, modules, batch_size=5)
    assert counts.tolist() == [len(a) for _, a in pairs]
    ids, attn, ans = teacher_forced_batch([p for p, _ in pairs], [a for _, a in pairs], pad_id=0)
    w = ans.float() / ans.sum(1, keepdim=True)
    clean = block_outputs(model, ids, attn, [0, 1])
    # Layer 0 has nothing upstream: its running state is the clean one.
    expected0 = torch.einsum("bt,btf->bf", w, modules[0].encode(clean[0]))
    # fp32 passes in batches of 5 against one batch of all rows, and another reduction order in
    # the weighted mean: summaries of size <= 120 moved by at most 1.5e-5 (5.6e-7 relative),
    # measured under default, avx2 and avx512: 6% of the tolerance.
    assert summaries[0].numpy() == pytest.approx(expected0.numpy(), rel=1e-5, abs=1e-5)
    # Layer 1 sees layer 0's edit.
    layer0_only = V.edits(world.variant("L0", "full", gates={0: 1.0}), modules)
    with intervene(model, layer0_only, ans):
        running = block_outputs(model, ids, attn, [1])[1]
    expected1 = torch.einsum("bt,btf->bf", w, modules[1].encode(running))
    assert summaries[1].numpy() == pytest.approx(expected1.numpy(), rel=1e-5, abs=1e-5)
    naive1 = torch.einsum("bt,btf->bf", w, modules[1].encode(clean[1]))
    # Negative control: ignoring layer 0's edit moves summaries by up to 120 (measured).
    assert not np.allclose(summaries[1].numpy(), naive1.numpy(), atol=1e-3)


def test_score_features_stage_writes_every_feature(world, tmp_path):
    model, tok = load_model(world.pt, "float32", "cpu")
    full = world.variant("FullDelta", "full")
    modules, _ = V.materialise(full, "cpu")
    records = evaluate(model, tok, world.rows(), full, V.edits(full, modules), 6, 4, None)
    records.write_parquet(tmp_path / "full.parquet")
    job = Job(
        input={"variant": world.write_variant(full), "split": world.split, "teacher": world.teacher,
               "records": str(tmp_path / "full.parquet")},
        output={"scores": str(tmp_path / "scores.parquet")},
        params={**world.model_params, "ridge_alpha": 1.0, "batch_size": 4},
    )
    score_features(job)
    table = pl.read_parquet(tmp_path / "scores.parquet")
    assert dict(table.schema) == SCORE_SCHEMA
    assert table.select("layer", "feature").rows() == [(layer, j) for layer in (0, 1) for j in range(F)]
    assert np.isfinite(table.select(pl.exclude("layer", "feature")).to_numpy()).all()
    assert (table["activation_mass"] >= 0).all() and (table["activation_mass"] > 0).any()
    plot_scores(Job(input={"scores": str(tmp_path / "scores.parquet")}, output={"plot": str(tmp_path / "top.png")},
                    params={"top_n": 5}))
    assert (tmp_path / "top.png").stat().st_size > 1000
    split = pl.read_parquet(world.split).with_columns(pl.lit("test").alias("split"))
    split.write_parquet(tmp_path / "test.parquet")
    job.input["split"] = str(tmp_path / "test.parquet")
    with pytest.raises(ValueError, match="test-split prompts"):
        score_features(job)
