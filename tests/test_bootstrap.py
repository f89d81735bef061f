import numpy as np
import pytest

from postdiff.stats import bootstrap, metrics
from postdiff.stats.metrics import PromptArrays

LEVELS = {"PT": 0.0, "IT": 1.0, "FullDelta": 0.3, "CapMask": 0.0, "FullDelta - VMask": 0.25,
          "MeanDiff": 0.02}


@pytest.fixture(scope="module")
def arrays():
    return metrics.align(metrics.synthetic_records(LEVELS, n_per_slice=20, seed=11))


@pytest.mark.parametrize("metric", metrics.METRICS)
def test_variant_against_itself_is_exactly_zero(arrays, metric):
    assert bootstrap.paired_bootstrap(arrays, "FullDelta", "FullDelta", metric, B=500,
                                      seed=1) == (0.0, 0.0, 0.0)


def test_stratification_keeps_slices_and_counts(arrays):
    idx = bootstrap.stratified_indices(arrays.codes, 400, np.random.default_rng(0))
    assert idx.shape == (400, len(arrays.codes))
    np.testing.assert_array_equal(arrays.codes[idx], np.broadcast_to(arrays.codes, idx.shape))
    counts = bootstrap.resample_counts(idx)
    for s in np.unique(arrays.codes):
        size = (arrays.codes == s).sum()
        np.testing.assert_array_equal(counts[:, arrays.codes == s].sum(1), size)
    assert counts[0].tolist() == np.bincount(idx[0], minlength=idx.shape[1]).tolist()
    # Each prompt is drawn with probability 1/n_s per slot: about once per resample on average.
    # Statistical: a count is Binomial(20, 1/20), so a mean of 400 has sd 0.049 and 0.25 is 5 sd
    # (measured worst of 120 prompts: 0.125). numpy's seeded draws are the same on every CPU.
    assert counts.mean(0) == pytest.approx(np.ones(idx.shape[1]), abs=0.25)


def _loop_reference(arrays, comparisons, B, seed, level):
    """Plain loop over resamples: gather each variant's per-prompt arrays, recompute everything."""
    idx = bootstrap.stratified_indices(arrays.codes, B, np.random.default_rng(seed))
    diffs = {c: [] for c in comparisons}
    for b in range(B):
        ms = {v: metrics.variant_metrics({f: x[idx[b]] for f, x in p.items()}, arrays.codes)
              for v, p in arrays.prompts.items()}
        for c in comparisons:
            a, r = ms[c.a], ms[c.b]
            rel_a = metrics.relative_metrics(a, ms["PT"], ms["IT"])
            rel_b = metrics.relative_metrics(r, ms["PT"], ms["IT"])
            diffs[c].append(float({**a, **rel_a}[c.metric] - {**r, **rel_b}[c.metric]))
    tail = (1 - level) / 2
    return {c: np.quantile(d, [tail, 1 - tail]) for c, d in diffs.items()}


def test_matches_plain_loop_reference(arrays):
    comps = [*bootstrap.DEFAULT_COMPARISONS,
             *(bootstrap.Comparison.parse(("FullDelta", "PT", m))
               for m in ("KL", "CapRec", "BrevEx", "Refusal", "OverRefusal", "VerbCarry"))]
    got = bootstrap.bootstrap_comparisons(arrays, comps, B=300, seed=5, level=0.9)
    ref = _loop_reference(arrays, comps, B=300, seed=5, level=0.9)
    point = metrics.summary(arrays)
    for c, row in zip(comps, got.iter_rows(named=True)):
        # float64 throughout; the vectorised sums only add in another order: measured 2e-14 at
        # values <= 12 (2% of 1e-12), and the point deltas came out exact.
        np.testing.assert_allclose([row["lo"], row["hi"]], ref[c], rtol=0, atol=1e-12)
        assert row["delta"] == pytest.approx(point[c.a][c.metric] - point[c.b][c.metric])
    assert (got["hi"] > got["lo"]).sum() >= len(comps) - 1  # not a comparison of zeros


def test_batch_equals_single_calls_and_seed_is_honoured(arrays):
    batch = bootstrap.bootstrap_comparisons(arrays, B=200, seed=3)
    for c, row in zip(bootstrap.DEFAULT_COMPARISONS, batch.iter_rows(named=True)):
        single = bootstrap.paired_bootstrap(arrays, c.a, c.b, c.metric, B=200, seed=3)
        assert single == (row["delta"], row["lo"], row["hi"])
    again = bootstrap.bootstrap_comparisons(arrays, B=200, seed=3)
    other = bootstrap.bootstrap_comparisons(arrays, B=200, seed=4)
    assert again.equals(batch)
    assert not other["lo"].equals(batch["lo"])


def _simulated(rng, n_per_slice, metric):
    codes = np.repeat(np.arange(len(metrics.SLICES)), n_per_slice)
    n = len(codes)
    zeros = {f: np.zeros(n) for f in metrics.FIELDS}
    if metric == "Len":
        base = rng.normal(30, 8, n) + 3 * codes
        a, b = base + 2 + rng.normal(0, 3, n), base + rng.normal(0, 3, n)
        return codes, {"A": {**zeros, "n_tokens": a}, "B": {**zeros, "n_tokens": b}}, 2.0
    u = rng.random(n)
    p_a = np.array([0.5, 0.6, 0.4, 0, 0, 0])[codes]
    p_b = np.array([0.3, 0.5, 0.4, 0, 0, 0])[codes]
    em = {f: (u < p).astype(float) for f, p in (("A", p_a), ("B", p_b))}
    return codes, {v: {**zeros, "em": em[v], "format_pass": em[v]} for v in em}, 0.1


@pytest.mark.parametrize("metric", ["Len", "Cap"])
def test_interval_covers_true_difference_near_nominal(metric):
    rng = np.random.default_rng(2024)
    hits = 0
    for rep in range(200):
        codes, prompts, truth = _simulated(rng, 40, metric)
        arrays = PromptArrays(ids=np.arange(len(codes)).astype(str), codes=codes, prompts=prompts)
        _, lo, hi = bootstrap.paired_bootstrap(arrays, "A", "B", metric, B=500, seed=rep)
        hits += lo <= truth <= hi
    assert 0.90 <= hits / 200 <= 0.99


def test_bad_requests_fail_before_work(arrays):
    with pytest.raises(ValueError, match="'Nope' has no evaluation records"):
        bootstrap.paired_bootstrap(arrays, "Nope", "PT", "Cap")
    with pytest.raises(ValueError, match="unknown metric 'Speed'"):
        bootstrap.paired_bootstrap(arrays, "FullDelta", "PT", "Speed")
    with pytest.raises(ValueError, match="need both references"):
        bootstrap.paired_bootstrap(arrays, "FullDelta", "PT", "CapRec", it="IT-missing")
    with pytest.raises(ValueError, match="needs keys a, b, metric"):
        bootstrap.Comparison.parse({"a": "FullDelta", "metric": "Cap"})


def test_estimates_bracket_point_values(arrays):
    est = bootstrap.bootstrap_estimates(arrays, ["PT", "FullDelta"], ["Cap", "Len", "VerbCarry"],
                                        B=300, seed=0)
    assert est.height == 6
    assert (est["lo"] <= est["estimate"]).all() and (est["estimate"] <= est["hi"]).all()
    pt_carry = est.row(2, named=True)
    assert (pt_carry["lo"], pt_carry["estimate"], pt_carry["hi"]) == (0.0, 0.0, 0.0)


def test_lenient_endpoint_is_a_comparison_metric_and_bad_names_are_refused(arrays):
    table = bootstrap.bootstrap_comparisons(arrays, [("FullDelta", "PT", "QA_Lenient"),
                                                     {"a": "IT", "b": "PT", "metric": "Math_Lenient"}], B=200)
    assert table["metric"].to_list() == ["QA_Lenient", "Math_Lenient"]
    assert table["delta"][1] > 0
    with pytest.raises(ValueError, match="unknown metric 'QA_lenient'"):
        bootstrap.Comparison.parse(("FullDelta", "PT", "QA_lenient"))
