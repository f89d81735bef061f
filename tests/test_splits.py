import logging

import polars as pl
import pytest

from postdiff.data.splits import SPLITS, allocate, assign_splits, split_suite
from postdiff.data.suite import generate_suite
from postdiff.data.world import make_world
from postdiff.workflow.runtime import Job

SIZES = {"train": 6, "calib": 3, "selector": 4, "test": 10}


@pytest.fixture(scope="module")
def suite():
    return generate_suite(0, sum(SIZES.values()), make_world(0, 40))


def _members(df, split):
    return set(df.filter(pl.col("split") == split)["id"])


def test_exact_counts_per_slice_and_split(suite):
    df = assign_splits(suite, SIZES, seed=0)
    counts = df.group_by("slice", "split").len()
    assert counts.height == 6 * 4
    for slice_name, split, n in counts.iter_rows():
        assert n == SIZES[split], (slice_name, split)


def test_disjoint_and_union_is_the_input(suite):
    df = assign_splits(suite, SIZES, seed=0)
    assert df.drop("split").equals(suite)
    members = [_members(df, s) for s in SPLITS]
    assert sum(map(len, members)) == suite.height
    assert set().union(*members) == set(suite["id"])


def test_seeded_and_independent_of_row_order(suite):
    a = assign_splits(suite, SIZES, seed=0)
    shuffled = assign_splits(suite.sample(fraction=1.0, shuffle=True, seed=9), SIZES, seed=0)
    assert dict(a.select("id", "split").iter_rows()) == dict(shuffled.select("id", "split").iter_rows())
    other = assign_splits(suite, SIZES, seed=1)
    assert _members(a, "test") != _members(other, "test")


@pytest.mark.parametrize(
    ("n", "expected"),
    [(23, SIZES), (46, {k: 2 * v for k, v in SIZES.items()}), (10, {"train": 3, "calib": 1, "selector": 2, "test": 4}),
     (1, {"train": 0, "calib": 0, "selector": 0, "test": 1}), (0, dict.fromkeys(SIZES, 0))],
)
def test_allocate_proportional_largest_remainder(n, expected):
    # n = 10: quotas 2.61, 1.30, 1.74, 4.35 -> floors 2, 1, 1, 4 and two more to the largest remainders.
    assert allocate(n, SIZES) == expected


def test_user_sized_slices_split_proportionally_with_a_log(suite, caplog):
    uneven = pl.concat([suite.filter(pl.col("slice") == "QA").head(10), suite.filter(pl.col("slice") != "QA")])
    with caplog.at_level(logging.WARNING, logger="postdiff.data.splits"):
        df = assign_splits(uneven, SIZES, seed=0)
    assert "slice QA has 10 prompts, not 23" in caplog.text
    qa = dict(df.filter(pl.col("slice") == "QA").group_by("split").len().iter_rows())
    assert qa == allocate(10, SIZES)


@pytest.mark.parametrize(
    ("sizes", "match"),
    [({"train": 1, "dev": 2}, "unknown split"), ({"train": -1, "test": 2}, "non-negative"),
     ({"train": 0, "test": 0}, "positive total")],
)
def test_bad_sizes_are_refused(suite, sizes, match):
    with pytest.raises(ValueError, match=match):
        assign_splits(suite, sizes, seed=0)


def test_duplicate_ids_are_refused(suite):
    with pytest.raises(ValueError, match="qa-0000"):
        assign_splits(pl.concat([suite, suite.head(1)]), SIZES, seed=0)


def test_split_suite_stage_writes_one_file_per_split(tmp_path, suite):
    src = tmp_path / "suite.parquet"
    suite.write_parquet(src)
    out = {s: str(tmp_path / f"{s}.parquet") for s in SPLITS}
    split_suite(Job(input={"suite": str(src)}, output=out, params={"sizes": SIZES, "seed": 5}))
    parts = {s: pl.read_parquet(p) for s, p in out.items()}
    for s, df in parts.items():
        assert df.columns == [*suite.columns, "split"]
        assert df["split"].unique().to_list() == [s]
        assert df.height == 6 * SIZES[s]
    assert pl.concat(parts.values()).sort("id").equals(assign_splits(suite, SIZES, seed=5).sort("id"))


def _grouped(suite, size):
    """The suite with a group column: ``size`` consecutive prompts of a slice per group."""
    index = pl.int_range(pl.len()).over("slice") // size
    return suite.with_columns(group=pl.col("slice") + pl.lit(":") + index.cast(pl.Utf8))


def test_groups_stay_whole_when_the_sizes_allow(suite):
    # 46 prompts per slice in groups of 2, sizes all even: every group lies in one split.
    sizes = {k: 2 * v for k, v in SIZES.items()}
    grouped = _grouped(pl.concat([suite, suite.with_columns(pl.col("id") + "b", pl.col("prompt") + " again")]), 2)
    df = assign_splits(grouped, sizes, seed=0)
    assert df.group_by("group").agg(pl.col("split").n_unique())["split"].max() == 1
    for slice_name, split, n in df.group_by("slice", "split").len().iter_rows():
        assert n == sizes[split], (slice_name, split)
    assert assign_splits(grouped.sample(fraction=1.0, shuffle=True, seed=3), sizes, seed=0).sort("id").equals(
        df.sort("id"))


def test_groups_divided_by_the_sizes_are_logged(suite, caplog):
    with caplog.at_level(logging.WARNING, logger="postdiff.data.splits"):
        df = assign_splits(_grouped(suite, 5), SIZES, seed=0)
    assert "group(s) divided between splits" in caplog.text
    for slice_name, split, n in df.group_by("slice", "split").len().iter_rows():
        assert n == SIZES[split], (slice_name, split)


def test_a_group_in_two_slices_or_a_null_group_is_refused(suite):
    with pytest.raises(ValueError, match=r"group 'same' spans slices"):
        assign_splits(suite.with_columns(group=pl.lit("same")), SIZES, seed=0)
    with pytest.raises(ValueError, match="column 'group' is null for prompt"):
        assign_splits(suite.with_columns(group=pl.lit(None, pl.Utf8)), SIZES, seed=0)


def test_without_a_group_column_each_prompt_is_its_own_group(suite):
    with_ids = suite.with_columns(group=pl.col("id"))
    assert assign_splits(with_ids, SIZES, seed=2).drop("group").equals(assign_splits(suite, SIZES, seed=2))
