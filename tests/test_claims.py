"""The paper's claims as checks: verdicts from paired intervals on hand-made per-prompt records."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import polars as pl
import pytest

from postdiff.outputs import claims
from postdiff.stats import metrics
from postdiff.workflow.io import write_json, write_parquet
from postdiff.workflow.runtime import Job

N = 20  # prompts per slice
ROLES = {"pt": "PT", "full": "FullDelta", "cap": "CapMask", "vmask": "FullDelta - VMask", "late": "OneLayer-L2"}
POOL = [[2, 7], [2, 3], [1, 9], [2, 1]]


def records(variant: str, right: Mapping[str, int] | None = None, n_tokens: float = 40.0) -> pl.DataFrame:
    """``right[slice]`` of the slice's first prompts answered right (QA, Math, Format), every
    prompt ``n_tokens`` long."""
    right = right or {}
    rows = []
    for s in metrics.SLICES:
        for j in range(N):
            ok = j < right.get(s, 0)
            rows.append({"id": f"{s}{j:02d}", "slice": s, "variant": variant, "kl": 1.0, "n_tokens": n_tokens,
                         "em": ok if s in ("QA", "Math") else None, "lenient": ok if s in ("QA", "Math") else None,
                         "format_pass": ok if s == "Format" else None,
                         "brevity_excess": 0.0 if s == "Brevity" else None, "refusal": False})
    return pl.DataFrame(rows)


def mask(order: list[list[int]], passed: tuple[bool, ...] | None = None, cutoff: float = 5.0,
         exclusion: float = 1.0) -> dict:
    """A mask JSON as the selection writes it (only what the claims read)."""
    passed = passed if passed is not None else (False,) * len(order)
    layers: dict[str, list[int]] = {}
    for layer, feature in order:
        layers.setdefault(str(layer), []).append(feature)
    return {"order": order, "mask": layers, "pool": POOL, "cutoff": cutoff, "exclusion": exclusion,
            "step_gains": [{"step": t + 1, "gain": 0.01 if p else 0.0, "choose_gain": 0.01 if p else 0.0, "passed": p}
                           for t, p in enumerate(passed)]}


SELECTED = mask([[2, 3], [2, 7]], (True, False))  # step 1 passed: selection chose it
FORCED = mask([[2, 7], [2, 3]])  # every step a tie and the pool's head: the score order alone


def base(**override: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """FullDelta recovers Math and Format, its VMask subtraction and the late layer match it, and
    CapMask is PT; ``override`` replaces a role's records."""
    full = {"Math": 10, "Format": 12}
    frames = {"pt": records("PT"), "full": records("FullDelta", full, 12.0),
              "cap": records("CapMask"), "vmask": records("FullDelta - VMask", full, 14.0),
              "late": records("OneLayer-L2", full, 12.0)}
    frames.update(override)
    return {df["variant"][0]: df for df in frames.values()}


def table(frames: Mapping[str, pl.DataFrame], masks: Mapping[str, dict] | None = None,
          variants: Mapping[str, str] = ROLES) -> dict[tuple[str, str], dict]:
    masks = {"cap": SELECTED, "vmask": SELECTED} if masks is None else masks
    frame = claims.comparison_claims(frames, variants, masks, B=2000, seed=0)
    return {(r["comparison"], r["metric"]): r for r in frame.iter_rows(named=True)}


def test_the_null_holds_when_the_interval_contains_zero_not_when_the_point_is_zero() -> None:
    """One Math prompt right out of 20: Cap +1/60, but the prompt is missing from 36% of
    resamples, so the interval runs from 0 to 3 of them."""
    row = table(base(cap=records("CapMask", {"Math": 1})))["CapMask vs PT", "Cap"]
    assert row["estimate"] == pytest.approx(1 / 60)
    assert (row["lo"], row["hi"]) == (0.0, pytest.approx(3 / 60))
    assert (row["test"], row["holds"], row["forced"], row["verdict"]) == (claims.CONTAINS_ZERO, True, False, "holds")


def test_a_planted_capability_effect_fails_the_null() -> None:
    row = table(base(cap=records("CapMask", {"Math": 15, "Format": 15})))["CapMask vs PT", "Cap"]
    assert row["estimate"] == pytest.approx(0.5)
    assert 0.3 < row["lo"] < 0.5 < row["hi"] < 0.7
    assert (row["holds"], row["verdict"]) == (False, "fails")


@pytest.mark.parametrize("cap_mask, forced", [
    (FORCED, True),
    (SELECTED, False),
    (mask([[2, 3], [1, 9]]), False),  # every step a tie, but not the pool's top two by score
    (mask([]), False),  # empty: nothing was forced in
])
def test_a_forced_capmask_gives_forced_whatever_its_interval(cap_mask: dict, forced: bool) -> None:
    planted = base(cap=records("CapMask", {"Math": 15, "Format": 15}))
    row = table(planted, {"cap": cap_mask, "vmask": SELECTED})["CapMask vs PT", "Cap"]
    assert (row["holds"], row["forced"], row["verdict"]) == (False, forced, "forced" if forced else "fails")


def test_vmask_subtraction_keeps_capability_and_lengthens_outputs() -> None:
    rows = table(base())
    cap, length = rows["VMask subtraction vs FullDelta", "Cap"], rows["VMask subtraction vs FullDelta", "Len"]
    assert (cap["estimate"], cap["lo"], cap["hi"], cap["verdict"]) == (0.0, 0.0, 0.0, "holds")
    assert (length["estimate"], length["lo"], length["hi"]) == (pytest.approx(2.0),) * 3
    assert (length["test"], length["verdict"]) == (claims.ABOVE_ZERO, "holds")
    # Shorter by 2 tokens: the interval is below 0, so "lengthens" fails; and a forced VMask voids it.
    shorter = base(vmask=records("FullDelta - VMask", {"Math": 10, "Format": 12}, 10.0))
    assert table(shorter)["VMask subtraction vs FullDelta", "Len"]["verdict"] == "fails"
    assert table(shorter, {"cap": SELECTED, "vmask": FORCED})["VMask subtraction vs FullDelta", "Len"]["verdict"] == "forced"


def test_vmask_subtraction_that_loses_capability_fails() -> None:
    lost = base(vmask=records("FullDelta - VMask", {"Math": 2, "Format": 3}, 14.0))
    row = table(lost)["VMask subtraction vs FullDelta", "Cap"]
    assert row["estimate"] == pytest.approx(-(8 + 9) / 60)
    assert row["hi"] < 0 and row["verdict"] == "fails"


def test_the_late_layer_claim_and_claims_the_run_cannot_test() -> None:
    rows = table(base())
    assert rows["OneLayer-late vs FullDelta", "Cap"]["verdict"] == "holds"
    assert rows["OneLayer-late vs FullDelta", "Cap"]["variant_a"] == "OneLayer-L2"
    weaker = table(base(late=records("OneLayer-L2", {"Math": 1}, 12.0)))["OneLayer-late vs FullDelta", "Cap"]
    assert weaker["estimate"] == pytest.approx(-(9 + 12) / 60) and weaker["verdict"] == "fails"
    # No one-layer ablation and no VMask file: those claims drop out, the rest stay.
    kept = table(base(), {"cap": SELECTED}, {k: v for k, v in ROLES.items() if k != "late"})
    assert list(kept) == [("CapMask vs PT", "Cap")]


def sweep(same: list[bool], forced: list[bool] | None = None) -> pl.DataFrame:
    """Locked-exclusion points at cutoffs 4, 5, 6, then the strict point (never the locked mask)."""
    frame = pl.DataFrame({"cutoff": [4.0, 5.0, 6.0, 5.0], "exclusion": [1.0, 1.0, 1.0, 0.0],
                          "strict": [False, False, False, True], "same_as_locked": [*same, False]})
    return frame if forced is None else frame.with_columns(forced=pl.Series([*forced, False]))


@pytest.mark.parametrize("same, forced, estimate, verdict", [
    ([True, True, True], [False, False, False], 1.0, "holds"),
    ([True, True, False], [False, False, False], 2 / 3, "fails"),
    ([True, True, True], [True, True, True], 1.0, "forced"),
    ([True, True, True], [False, True, False], 1.0, "forced"),
])
def test_the_sweep_claim_from_the_summary(same: list[bool], forced: list[bool], estimate: float, verdict: str) -> None:
    row = claims.sweep_claim(sweep(same, forced)).row(0, named=True)
    assert (row["estimate"], row["verdict"], row["holds"]) == (pytest.approx(estimate), verdict, all(same))
    assert row["lo"] is None and row["metric"] == "same_as_locked"


def test_stage_writes_every_claim(tmp_path: Path) -> None:
    evals = []
    for name, df in base(cap=records("CapMask", {"Math": 15, "Format": 15})).items():
        evals.append(str(tmp_path / f"{name}.parquet"))
        write_parquet(df, evals[-1])
    write_json(FORCED, tmp_path / "cap.json")
    write_json(SELECTED, tmp_path / "vmask.json")
    write_parquet(sweep([True, True, True], [True, True, True]), tmp_path / "sweep.parquet")
    out = {k: str(tmp_path / f"claims.{k}") for k in ("csv", "md", "tex")}
    claims.claims(Job(input={"evals": evals, "cap_mask": str(tmp_path / "cap.json"), "vmask": str(tmp_path / "vmask.json"),
                             "sweep": str(tmp_path / "sweep.parquet")},
                      output=out, params={"variants": ROLES, "B": 500, "seed": 1, "level": 0.9}))
    csv = pl.read_csv(out["csv"])
    assert csv.columns == list(claims.CLAIM_SCHEMA)
    assert csv["verdict"].to_list() == ["forced", "holds", "holds", "holds", "forced"]
    assert csv["level"].to_list()[:4] == [0.9] * 4
    md = Path(out["md"]).read_text().splitlines()
    assert md[0] == "| Claim | Comparison | Metric | Estimate | CI | Test | Verdict |" and len(md) == 2 + 5
    assert "| n/a |" in md[-1] and md[-1].endswith("| forced |")
