"""End-to-end: the default config, as shipped, on one surrogate seed.

What holds by construction or with a wide margin is asserted exactly; what depends on float
rounding through surrogate training and greedy decoding is held to the band measured across
CPU kernel sets (``ATEN_CPU_CAPABILITY`` default, avx2, avx512) and surrogate seeds 0 to 2
(``bench/capabilities.py``, ``bench/results/capabilities.json``; README, "What may move").
The second default seed adds nothing here that ``tests/test_workflow.py`` does not check on the
tiny config (adding a seed, across-seed tables), so this run trains one. Its sweep runs the
config's lowest and highest cutoffs, 4.0 and 6.0 (the locked 5.0 is CapMask's selection, which
runs anyway): which neighbours admit different pools moves with the CPU (on avx512 4.0 and 5.0
both give pools of 8, under `default` kernels 5.0 and 6.0 the same 4 features), while 4.0 and
6.0 differ under both (8 and 6, 8 and 4), and two cutoffs whose pools differ are what its
assertion needs. It has no strict point (the strict exclusion is the locked one, so that point is
CapMask's own selection): the strict point's row and its exclusion from pools_differ are checked
on hand-made masks (tests/test_selection.py) and the tiny run selects one; it was a quarter of
this run's selection CPU. Its
selections stop at two features (`size_cap: 2`): every step gains 0 on this pair, and what the
assertions read of the masks (sizes, baselines of the same sizes, pools, forced points, the null)
does not need five; the three selections were a third of the run's CPU. It
runs only what the assertions read: the test evaluations of the variants they
name (Table 1's rows, computed as the table1 job computes them, without the four variants no
assertion reads), the sweep summary, the gate table and the claims table, with every job they
need. The figures, cards, exports, provenance and the whole Table 1 of a run are checked on the
tiny config.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from workflow_utils import REPO, copy_workflow, snakemake

from postdiff.method.gates import TESTED_ON
from postdiff.method.selection.maskfile import forced, read_mask_file
from postdiff.stats import metrics
from postdiff.stats.tables import table1_frame
from postdiff.workflow.config import seeded, threshold, variant_table

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"
RUN = "results/default"
# The PT and IT rows depend only on the shipped pair and greedy decoding: the teacher's bytes and
# these rows were identical under all three capabilities. The margins allow an argmax tie.
PAIR_CAP, PAIR_LEN = 0.01, 0.5
# FullDelta across 3 capabilities x 3 seeds with gates refined until calib KL stops falling
# (bench/results/capabilities.json: CapRec 0.619 to 0.685, KL 0.821 to 0.829), widened by 0.05
# CapRec and 0.01 KL for CPUs outside those nine runs.
FULL_CAPREC = (0.57, 0.74)
FULL_KL = (0.81, 0.84)


CONFIG = yaml.safe_load((REPO / "config/config.yaml").read_text())
SIZE_CAP = 2
# The variants the assertions read, in Table 1's order.
VARIANTS = ("PT", "IT", "FullDelta", "CapMask", "RandomMask", "ActivationMassMask", "MeanDiff", "OneLayer-L1", "OneLayer-L2")


def evals(variant: str) -> str:
    seed_dir = "seed0/" if seeded(variant_table(CONFIG)[variant]) else ""
    return f"{RUN}/{seed_dir}eval/test/{variant}.parquet"


def table(workdir: Path) -> dict[str, dict]:
    """Table 1's rows of :data:`VARIANTS`, as the table1 job computes them."""
    frame = table1_frame(metrics.align(metrics.read_eval([workdir / evals(v) for v in VARIANTS])))
    return {row["Variant"]: row for row in frame.iter_rows(named=True)}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = copy_workflow(tmp_path_factory.mktemp("default_run"))
    cutoffs = sorted(CONFIG["sweep"]["cap_cutoffs"])
    # The strict exclusion set to the locked one: its point is then the locked mask's own selection.
    trimmed = {"surrogate": {"seeds": [0]}, "selection": {"size_cap": SIZE_CAP},
               "sweep": {"cap_cutoffs": [cutoffs[0], cutoffs[-1]], "strict_verb_exclusion": CONFIG["selection"]["verb_exclusion"]}}
    (workdir / "config/trimmed.yaml").write_text(yaml.safe_dump(trimmed))
    targets = [*map(evals, VARIANTS), *(f"{RUN}/seed0/tables/{name}.csv" for name in ("gates", "claims")), f"{RUN}/seed0/sweep/summary.csv"]
    snakemake(workdir, *targets, configfile=["config/config.yaml", "config/trimmed.yaml"])
    return workdir


def test_pt_and_it_rows_are_the_shipped_pairs(default_run: Path) -> None:
    got, want = table(default_run), {r["Variant"]: r for r in pl.read_csv(DATA / "default_table1_seed0.csv").iter_rows(named=True)}
    assert list(got) == [v for v in want if v in got] == list(VARIANTS)  # every variant read, in the shipped order
    for name in ("PT", "IT"):
        assert abs(got[name]["Cap"] - want[name]["Cap"]) <= PAIR_CAP, (name, got[name], want[name])
        assert abs(got[name]["Len"] - want[name]["Len"]) <= PAIR_LEN, (name, got[name], want[name])
    assert got["IT"]["KL"] == 0.0 and got["PT"]["CapRec"] == 0.0 and got["IT"]["CapRec"] == 1.0


def test_fulldelta_within_the_band_measured_across_cpus_and_seeds(default_run: Path) -> None:
    full = table(default_run)["FullDelta"]
    assert FULL_CAPREC[0] <= full["CapRec"] <= FULL_CAPREC[1], full
    assert FULL_KL[0] <= full["KL"] <= FULL_KL[1], full


def test_orderings_that_hold_with_a_margin(default_run: Path) -> None:
    """Each gap is several times its margin: FullDelta's KL stayed within 0.821-0.829 and its Cap
    above 0.40 in all nine capability runs; MeanDiff (3.32), PT (4.69) and the one-layer rows
    (L1 1.81, L2 0.83 under both default seeds) sit far from the bounds."""
    t = table(default_run)
    assert t["FullDelta"]["KL"] < t["MeanDiff"]["KL"] - 1.0 < t["PT"]["KL"] - 2.0  # 0.83 < 3.3 < 4.7
    assert t["OneLayer-L2"]["KL"] < t["OneLayer-L1"]["KL"] - 0.5  # the late layer carries the delta
    assert t["FullDelta"]["Cap"] > t["PT"]["Cap"] + 0.15 and t["FullDelta"]["Len"] < t["PT"]["Len"] - 10


def test_masks_are_size_matched_non_empty_and_move_pt(default_run: Path) -> None:
    """fill_to_cap makes CapMask the paper's locked-size mask, and its baselines match its size
    layer by layer, so all three rows are real interventions, not PT by construction."""
    seed = default_run / f"{RUN}/seed0"
    cfg = yaml.safe_load((default_run / "config/config.yaml").read_text())["selection"]
    cap = json.loads((seed / f"sweep/verb_exclusion={float(cfg['verb_exclusion'])}/cap_cutoff={float(cfg['cap_cutoff'])}/cap_mask.json").read_text())
    sizes = {layer: len(f) for layer, f in cap["mask"].items() if f}
    assert sum(sizes.values()) == min(SIZE_CAP, cap["n_candidates"]) > 0
    for name in ("random_mask", "mass_mask"):
        other = json.loads((seed / f"selection/{name}.json").read_text())["mask"]
        assert {layer: len(f) for layer, f in other.items() if f} == sizes, name
    by_score = json.loads((seed / "selection/score_mask.json").read_text())["mask"]
    assert sorted((int(k), j) for k, f in by_score.items() for j in f) == sorted(map(tuple, cap["pool"][: sum(sizes.values())]))
    t = table(default_run)
    for name in ("CapMask", "RandomMask", "ActivationMassMask"):
        assert t[name]["KL"] != t["PT"]["KL"], name
    vmask = json.loads((seed / "selection/vmask.json").read_text())
    assert len(vmask["order"]) == min(SIZE_CAP, vmask["n_candidates"])
    assert [g["step"] for g in vmask["step_gains"]] == list(range(1, len(vmask["order"]) + 1))


def test_the_sweep_selects_from_pools_that_differ(default_run: Path) -> None:
    """The locked exclusion's cutoffs (the strict point's pool differs by its exclusion) select
    from pools that differ; whether each mask was forced is read back from its mask file (every
    gain is 0 on this pair, so the masks need not differ)."""
    seed = default_run / f"{RUN}/seed0/sweep"
    summary = pl.read_csv(seed / "summary.csv")
    cutoffs = summary.filter(~pl.col("strict"))
    assert cutoffs.height > 1 and cutoffs["pools_differ"].all() and cutoffs["n_pool"].n_unique() > 1
    assert (summary["n_pool"] <= summary["n_admitted"]).all()
    for row in summary.iter_rows(named=True):
        point = f"verb_exclusion={threshold(row['exclusion'])}/cap_cutoff={threshold(row['cutoff'])}"
        obj = read_mask_file(str(seed / point / "cap_mask.json"))
        assert row["forced"] == forced(obj), row


def test_gate_choices_are_reported(default_run: Path) -> None:
    gates = pl.read_csv(default_run / f"{RUN}/seed0/tables/gates.csv")
    assert gates["gates"].to_list() == ["full", "single_L1", "single_L2", "mean"]
    assert (gates["n_compared"] > 0).all() and (gates["calib_kl"] <= gates["closest_kl"]).all()
    assert (gates["tested_on"] == TESTED_ON).all()


def test_the_capability_null_holds_or_is_forced(default_run: Path) -> None:
    """No single feature moves a greedy token on this pair, so CapMask's Cap interval against PT
    contains 0; and with every step's gain 0 the mask is its pool's top by score, which the
    table calls forced rather than a null of selection."""
    claims = pl.read_csv(default_run / f"{RUN}/seed0/tables/claims.csv")
    assert claims["comparison"].to_list() == ["CapMask vs PT", *["VMask subtraction vs FullDelta"] * 2,
                                              "OneLayer-late vs FullDelta", "threshold sweep vs locked mask"]
    null = claims.row(0, named=True)
    assert null["lo"] <= 0 <= null["hi"] and null["holds"], null
    assert null["verdict"] in ("holds", "forced"), null
