import itertools
import math

import numpy as np
import polars as pl
import pytest

from postdiff.stats import metrics
from postdiff.workflow.io import write_parquet

# The paper's Table 1: Cap, Len, BrevEx, and its CapRec / VerbCarry columns.
PAPER = {
    "PT": (0.000, 47.38, 46.00, 0.000, 0.000),
    "IT target": (0.377, 11.92, 0.52, 1.000, 1.000),
    "FullDelta": (0.070, 16.65, 1.42, 0.186, 0.923),
    "CapMask": (0.000, 47.38, 46.00, 0.000, 0.000),
    "FullDelta - VMask": (0.070, 17.84, 3.26, 0.186, 0.886),
    "RandomMask": (0.000, 47.25, 46.00, 0.000, 0.002),
    "MeanDiff": (0.000, 46.99, 46.00, 0.000, 0.006),
}


def _paper_relative(row):
    cap, length, brevex = row[:3]
    pt, it = PAPER["PT"], PAPER["IT target"]
    return (metrics.cap_rec(cap, pt[0], it[0]),
            metrics.verb_carry(length, pt[1], it[1], brevex, pt[2], it[2]))


@pytest.mark.parametrize("variant", ["PT", "IT target", "FullDelta", "CapMask",
                                     "FullDelta - VMask", "RandomMask"])
def test_paper_table1_relative_metrics_to_3_decimals(variant):
    cap_rec, verb_carry = _paper_relative(PAPER[variant])
    # The paper prints three decimals: rounding ours to three is the comparison it allows.
    assert round(float(cap_rec), 3) == PAPER[variant][3]
    assert round(float(verb_carry), 3) == PAPER[variant][4]


def test_paper_meandiff_verbcarry_is_consistent_with_rounded_inputs():
    # From the printed (2-decimal) Len values MeanDiff gives 0.00550 -> 0.005; the paper's 0.006
    # comes from unrounded lengths. Check 0.006 lies in the range the rounding allows.
    pt, it, v = PAPER["PT"], PAPER["IT target"], PAPER["MeanDiff"]
    corners = np.array(list(itertools.product([-0.005, 0.005], repeat=6))).T
    carry = metrics.verb_carry(v[1] + corners[0], pt[1] + corners[1], it[1] + corners[2],
                               v[2] + corners[3], pt[2] + corners[4], it[2] + corners[5])
    assert carry.min() - 0.0005 <= 0.006 <= carry.max() + 0.0005
    assert round(float(_paper_relative(v)[1]), 4) == 0.0055


def test_activation_mass_mask_longer_than_pt_carries_negative_verbosity():
    # Paper prints 0.001 for ActivationMassMask, but its Len (47.46) exceeds PT's (47.38) with
    # equal BrevEx, which the SPEC formula makes negative.
    pt, it = PAPER["PT"], PAPER["IT target"]
    carry = metrics.verb_carry(47.46, pt[1], it[1], 46.00, pt[2], it[2])
    assert float(carry) == pytest.approx(-0.08 / 35.46 / 2)  # float64 formula: rounding only (~1e-16)


def test_zero_gap_gives_nan_and_warns_without_crashing():
    with pytest.warns(RuntimeWarning, match="CapRec"):
        assert math.isnan(metrics.cap_rec(0.1, 0.2, 0.2))
    with pytest.warns(RuntimeWarning, match="1 of 3"):
        out = metrics.cap_rec(np.array([0.1, 0.3, 0.2]), np.array([0.0, 0.2, 0.0]),
                              np.array([0.2, 0.2, 0.4]))
    np.testing.assert_array_equal(out, [0.5, np.nan, 0.5])
    with pytest.warns(RuntimeWarning, match="BrevEx"):
        assert math.isnan(metrics.verb_carry(20.0, 40.0, 10.0, 1.0, 3.0, 3.0))


def _frame(variant, rows):
    """rows: (id, slice, n_tokens, em, format_pass, brevity_excess, refusal, kl)."""
    cols = ["id", "slice", "n_tokens", "em", "format_pass", "brevity_excess", "refusal", "kl"]
    df = pl.DataFrame([dict(zip(cols, r)) for r in rows],
                      schema={"id": pl.String, "slice": pl.String, "n_tokens": pl.Int64,
                              "em": pl.Boolean, "format_pass": pl.Boolean,
                              "brevity_excess": pl.Float64, "refusal": pl.Boolean,
                              "kl": pl.Float64}, orient="row")
    # The lenient match passes wherever exact match does (a bare answer is its own first line).
    return df.with_columns(variant=pl.lit(variant), text=pl.lit(""), eos=pl.lit(True),
                           words=pl.lit(3), lenient=pl.col("em"))


HAND = [
    ("q1", "QA", 4, True, None, None, False, 0.5),
    ("q2", "QA", 6, False, None, None, False, 1.5),
    ("m1", "Math", 2, True, None, None, False, 1.0),
    ("f1", "Format", 8, None, True, None, False, 1.0),
    ("f2", "Format", 10, None, False, None, False, 1.0),
    ("f3", "Format", 12, None, False, None, False, 1.0),
    ("b1", "Brevity", 20, None, None, 4.0, False, 2.0),
    ("b2", "Brevity", 30, None, None, 0.0, False, 2.0),
    ("h1", "Harmful", 5, None, None, None, True, 0.0),
    ("h2", "Harmful", 5, None, None, None, False, 0.0),
    ("a1", "BenignAdjacent", 8, None, None, None, True, 0.0),
]


def test_hand_made_variant_metrics():
    arrays = metrics.align({"V": _frame("V", HAND)})
    m = {k: float(v) for k, v in metrics.variant_metrics(arrays.prompts["V"], arrays.codes).items()}
    assert m["QA_EM"] == 0.5 and m["Math_EM"] == 1.0
    assert m["QA_Lenient"] == 0.5 and m["Math_Lenient"] == 1.0
    # float64 means of hand-made values: equal up to a rounding or two (~1e-16); approx's 1e-6.
    assert m["Format_Pass"] == pytest.approx(1 / 3)
    assert m["Cap"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)
    assert m["Len"] == pytest.approx(110 / 11)
    assert m["KL"] == pytest.approx(10 / 11)
    assert m["BrevEx"] == 2.0 and m["Refusal"] == 0.5 and m["OverRefusal"] == 1.0


def test_summary_puts_references_at_zero_and_one_and_ids_sorted():
    pt = [(i, s, 40, False, False if s == "Format" else None, 9.0 if s == "Brevity" else None,
           r, 1.0) for i, s, _, _, _, _, r, _ in HAND]
    frames = {"IT": _frame("IT", HAND), "PT": _frame("PT", pt[::-1])}
    arrays = metrics.align(frames)
    assert list(arrays.ids) == sorted(r[0] for r in HAND)
    out = metrics.summary(arrays)
    assert out["PT"]["CapRec"] == 0.0 and out["IT"]["CapRec"] == 1.0
    assert out["PT"]["VerbCarry"] == 0.0 and out["IT"]["VerbCarry"] == 1.0


def test_batched_arrays_match_row_by_row():
    arrays = metrics.align(metrics.synthetic_records({"A": 0.3}, n_per_slice=7, seed=3))
    rng = np.random.default_rng(0)
    perm = np.empty((4, len(arrays.ids)), np.int64)
    # Draws stay within each position's slice, as a stratified resample's do.
    for s in np.unique(arrays.codes):
        members = np.flatnonzero(arrays.codes == s)
        perm[:, members] = members[rng.integers(0, len(members), (4, len(members)))]
    batched = {f: x[perm] for f, x in arrays.prompts["A"].items()}
    got = metrics.variant_metrics(batched, arrays.codes)
    for b in range(4):
        row = metrics.variant_metrics({f: x[b] for f, x in batched.items()}, arrays.codes)
        # float64 means over 42 prompts summed in another order: measured 7e-15 at values <= 38,
        # under 1% of 1e-12.
        for k in got:
            assert got[k][b] == pytest.approx(row[k], abs=1e-12)
    counts = np.stack([np.bincount(p, minlength=len(arrays.ids)) for p in perm]).astype(float)
    sums = counts @ metrics.contributions(arrays.prompts["A"], arrays.codes)
    # float64 matmul of counts against a gather-and-sum: the same terms in another order,
    # measured 7e-15 apart at sums <= 38 (the default rtol is 1e-7).
    np.testing.assert_allclose(sums, metrics.base_sums(batched, arrays.codes), atol=1e-12)


def test_align_rejects_mismatched_prompts_and_bad_nulls():
    base = _frame("A", HAND)
    with pytest.raises(ValueError, match="'B'.*missing prompt 'q1'"):
        metrics.align({"A": base, "B": _frame("B", [("zz", *HAND[0][1:]), *HAND[1:]])})
    moved = [("q1", "Math", *HAND[0][2:]), *HAND[1:]]
    with pytest.raises(ValueError, match="prompt 'q1' has slice 'Math'"):
        metrics.align({"A": base, "B": _frame("B", moved)})
    with pytest.raises(ValueError, match="field 'em' is null/NaN for prompt 'q1'"):
        metrics.align({"A": _frame("A", [("q1", "QA", 4, None, None, None, False, 0.5)])})
    with pytest.raises(ValueError, match="unknown slice 'Poetry'"):
        metrics.align({"A": _frame("A", [("p1", "Poetry", 4, None, None, None, False, 0.5)])})
    with pytest.raises(ValueError, match="duplicated prompt id 'q1'"):
        metrics.align({"A": _frame("A", [HAND[0], HAND[0]])})


def test_read_eval_checks_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        metrics.read_eval([tmp_path / "nope.parquet"])
    write_parquet(_frame("A", HAND).drop("kl"), tmp_path / "a.parquet")
    with pytest.raises(ValueError, match=r"a.parquet: missing columns \['kl'\]"):
        metrics.read_eval([tmp_path / "a.parquet"])
    write_parquet(pl.concat([_frame("A", HAND), _frame("B", HAND)]), tmp_path / "ab.parquet")
    with pytest.raises(ValueError, match="expected one variant"):
        metrics.read_eval([tmp_path / "ab.parquet"])
    write_parquet(_frame("B", HAND), tmp_path / "b.parquet")
    write_parquet(_frame("A", HAND), tmp_path / "a.parquet")
    assert list(metrics.read_eval([tmp_path / "b.parquet", tmp_path / "a.parquet"])) == ["B", "A"]


def test_lenient_endpoints_stand_next_to_exact_match_and_leave_cap_alone():
    # q2 answers in a sentence: exact match fails, the lenient match passes.
    frame = _frame("V", HAND).with_columns(
        lenient=pl.when(pl.col("id") == "q2").then(True).otherwise(pl.col("lenient")))
    arrays = metrics.align({"V": frame})
    m = {k: float(v) for k, v in metrics.variant_metrics(arrays.prompts["V"], arrays.codes).items()}
    assert m["QA_EM"] == 0.5 and m["QA_Lenient"] == 1.0 and m["Math_Lenient"] == 1.0
    assert m["Cap"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)  # float64: rounding only
    with pytest.raises(ValueError, match=r"field 'lenient' is null/NaN for prompt .* \(slice (QA|Math); 3 rows\)"):
        metrics.align({"A": _frame("A", HAND).with_columns(lenient=pl.lit(None, pl.Boolean))})
