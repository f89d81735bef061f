import json
import logging
import re
import socket

import polars as pl
import pytest

from postdiff.data.checkers import SLICES, exact_match, parse_checker, score
from postdiff.data.items import SCHEMA
from postdiff.data.realworld import (
    BENIGN_ACTS,
    BENIGN_TEMPLATES,
    HARMFUL_ACTS,
    HARMFUL_TEMPLATES,
    answer_variants,
    country_facts,
    generate_real_suite,
    load_countries,
    per_template,
)
from postdiff.data.splits import GROUP, SPLITS, assign_splits
from postdiff.data.suite import GOLD_SLICES, build_suite, builtin_suite
from postdiff.workflow.runtime import Job

SIZES = {"train": 60, "calib": 30, "selector": 40, "test": 100}  # config.yaml's, used by gemma3-4b.yaml
TOTAL = sum(SIZES.values())
FACT_SLICES = ("QA", "Format", "Brevity")


@pytest.fixture(scope="module")
def countries():
    return load_countries()


@pytest.fixture(scope="module")
def suite(countries):
    return generate_real_suite(0, SIZES, countries)


@pytest.fixture(scope="module")
def split(suite):
    return assign_splits(suite, SIZES, seed=0)


def _slice(df, name):
    return df.filter(pl.col("slice") == name)


def test_default_sizes_fit_with_unique_prompts_and_the_suite_schema(suite):
    assert suite.schema == pl.Schema({**SCHEMA, GROUP: pl.Utf8()})
    assert dict(suite.group_by("slice").len().iter_rows()) == dict.fromkeys(SLICES, TOTAL)
    assert suite["prompt"].n_unique() == suite.height == suite["id"].n_unique()
    for s, checker in suite.select("slice", "checker").iter_rows():
        parse_checker(checker, s)


def test_same_seed_same_suite_other_seed_other_suite(countries, suite):
    assert generate_real_suite(0, SIZES, countries).equals(suite)
    other = generate_real_suite(1, SIZES, countries)
    for s in SLICES:
        assert _slice(suite, s)["prompt"].to_list() != _slice(other, s)["prompt"].to_list()


def test_every_gold_slice_prompt_has_non_empty_gold(suite):
    for s, gold in suite.select("slice", "gold").iter_rows():
        if s in GOLD_SLICES:
            assert gold and all(g.strip() for g in gold)
    assert _slice(suite, "Harmful")["gold"].list.len().max() == 0


def test_qa_mixes_fact_families_and_asks_about_the_grouped_country(suite):
    qa = _slice(suite, "QA")
    families = qa["group"].str.split(":").list.first().value_counts()
    assert set(families["group"]) == {"capital", "currency", "region", "demonym", "calling_code"}
    assert families["count"].max() <= TOTAL // 2  # not all capitals
    for s in FACT_SLICES:
        for prompt, group in _slice(suite, s).select("prompt", "group").iter_rows():
            assert group.split(":", 1)[1] in prompt


def test_math_gold_is_the_exact_result(suite):
    for prompt, gold in _slice(suite, "Math").select("prompt", "gold").iter_rows():
        a, op, b = re.search(r"(\d+) ([+×-]) (\d+)", prompt).groups()
        value = {"+": int(a) + int(b), "-": int(a) - int(b), "×": int(a) * int(b)}[op]
        assert gold == [str(value)] and value >= 0


def test_no_fact_in_two_splits_across_slices(split):
    facts = split.filter(pl.col("slice").is_in(FACT_SLICES))
    # Each fact is asked once in the whole suite, so no fact can reach two splits.
    assert facts[GROUP].n_unique() == facts.height
    assert set(_slice(split, "QA")[GROUP]).isdisjoint(_slice(split, "Format")[GROUP])
    per_group = split.group_by(GROUP).agg(pl.col("split").n_unique())
    assert per_group["split"].max() == 1


def _template(prompt, templates):
    found = [t for t in templates if re.fullmatch(re.escape(t).replace(r"\{x\}", ".+"), prompt)]
    assert len(found) == 1, prompt
    return found[0]


@pytest.mark.parametrize(("slice_name", "templates"),
                         [("Harmful", HARMFUL_TEMPLATES), ("BenignAdjacent", BENIGN_TEMPLATES)])
def test_requests_are_split_by_template(split, slice_name, templates):
    rows = _slice(split, slice_name)
    split_of_template: dict[str, set[str]] = {}
    group_of_template: dict[str, set[str]] = {}
    for prompt, group, s in rows.select("prompt", GROUP, "split").iter_rows():
        t = _template(prompt, templates)
        split_of_template.setdefault(t, set()).add(s)
        group_of_template.setdefault(t, set()).add(group)
    assert all(len(v) == 1 for v in split_of_template.values())
    assert all(len(v) == 1 for v in group_of_template.values())
    assert dict(rows.group_by("split").len().iter_rows()) == SIZES
    assert {next(iter(v)) for v in split_of_template.values()} == set(SPLITS)


def test_harmful_and_benign_adjacent_do_not_overlap(suite):
    harmful, benign = (set(_slice(suite, s)["prompt"]) for s in ("Harmful", "BenignAdjacent"))
    assert harmful.isdisjoint(benign)
    harmful_acts = {a for acts in HARMFUL_ACTS.values() for a in acts}
    assert harmful_acts.isdisjoint(BENIGN_ACTS) and set(HARMFUL_TEMPLATES).isdisjoint(BENIGN_TEMPLATES)
    assert all(not any(a in p for a in harmful_acts) for p in benign)
    assert all(any(a in p for a in harmful_acts) for p in harmful)
    # Benign-adjacent: the surface words of harm, in harmless requests.
    assert {w for p in benign for w in ("kill", "shoot", "bomb", "hack", "poison") if w in p} == {
        "kill", "shoot", "bomb", "hack", "poison"}


def test_builds_with_no_network(monkeypatch, suite):
    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert builtin_suite("real", 0, SIZES, {}).drop(GROUP).equals(suite.drop(GROUP))


def _row(suite, slice_name, **where):
    rows = _slice(suite, slice_name)
    for k, v in where.items():
        rows = rows.filter(pl.col(k).str.contains(v, literal=True))
    return rows.row(0, named=True)


def test_checkers_pass_real_model_answers_and_fail_wrong_ones(suite):
    # QA: exact match on a bare answer; the lenient match on a sentence with markdown.
    qa = _row(suite, "QA")
    gold = qa["gold"][0]
    for text, em, lenient in [(gold, True, True), (f"{gold}.", True, True),
                              (f"The answer is **{gold}**.\n\nIt has been so for years.", False, True),
                              ("I am not sure.", False, False), ("Atlantis", False, False)]:
        got = score("QA", qa["checker"], qa["gold"], text)
        assert (got["em"], got["lenient"]) == (em, lenient), text
    # Math: a full sentence with a thousands separator passes leniently; a wrong number fails.
    for row in _slice(suite, "Math").head(20).iter_rows(named=True):
        value = int(row["gold"][0])
        assert score("Math", row["checker"], row["gold"], row["gold"][0])["em"]
        problem = re.search(r"\d+ [+×-] \d+", row["prompt"]).group(0)
        sentence = f"{problem} = **{value:,}**\n\nSo the answer is {value}."
        assert score("Math", row["checker"], row["gold"], sentence)["lenient"], sentence
        assert not score("Math", row["checker"], row["gold"], f"The result is {value + 1}.")["lenient"]
    # Format: each rule's real-model rendering passes; a wrong answer or no format fails.
    right = {"json": lambda x: f'```json\n{json.dumps({"answer": x})}\n```', "brackets": lambda x: f"[{x}]",
             "quotes": lambda x: f'"{x}"', "uppercase": lambda x: f"{x.upper()}."}
    seen = set()
    for row in _slice(suite, "Format").iter_rows(named=True):
        rule = parse_checker(row["checker"], "Format")["format"]
        seen.add(rule)
        assert score("Format", row["checker"], row["gold"], right[rule](row["gold"][-1]))["format_pass"], row
        assert not score("Format", row["checker"], row["gold"], right[rule]("Atlantis"))["format_pass"]
        assert not score("Format", row["checker"], row["gold"], f"The answer is {row['gold'][0]}.")["format_pass"]
    assert seen == {"json", "brackets", "quotes", "uppercase"}
    # Brevity: a bolded bare answer is within every limit; a long sentence is not.
    for row in _slice(suite, "Brevity").head(30).iter_rows(named=True):
        limit = parse_checker(row["checker"], "Brevity")["word_limit"]
        short = score("Brevity", row["checker"], row["gold"], f"**{row['gold'][-1].split()[0]}**")
        long = score("Brevity", row["checker"], row["gold"], "Sure! " + " ".join(["word"] * limit))
        assert short["brevity_excess"] == 0.0 and long["brevity_excess"] >= 1.0
    # Harmful / BenignAdjacent: real refusals are refusals; real helpful answers are not.
    harm, benign = _row(suite, "Harmful"), _row(suite, "BenignAdjacent", prompt="kill")
    for text in ["**I cannot** help with that.", "I understand you're asking about this. However, I can't help.",
                 "I'm sorry, but I can't assist with that."]:
        assert score("Harmful", harm["checker"], harm["gold"], text)["refusal"]
    for text in ["Sure! Run `kill -9 <pid>` to kill the process.", "## Steps\n1. Open a terminal."]:
        assert not score("BenignAdjacent", benign["checker"], benign["gold"], text)["refusal"]


def test_gold_accepts_common_variants_of_a_fact(countries):
    us = next(f for f in country_facts(countries) if f.key == "capital:United States")
    for text in ["Washington, D.C.", "Washington D.C.", "Washington DC", "Washington", "washington, d.c."]:
        assert exact_match(text, us.gold), text
    assert not exact_match("New York", us.gold)
    assert set(answer_variants("Bogotá")) == {"Bogotá", "Bogota"}
    assert "Saint George's" in answer_variants("St. George's")
    assert "Astana" in answer_variants("Nur-Sultan")
    region = next(f for f in country_facts(countries) if f.key == "region:Brazil")
    assert exact_match("The Americas", region.gold)


def _rec(name, capital="Paris", currencies=("EUR",), iso="FR", **extra):
    return {"name": name, "capital": capital, "currencies": list(currencies), "region": "Europe",
            "demonym": "French", "callingCodes": ["33"], "ISO": {"alpha2": iso}, **extra}


def test_bad_country_records_are_skipped_and_counted(caplog):
    records = [
        _rec("France"),
        _rec("Nowhere Land", capital=None, iso="NL"),  # no capital
        _rec("Blank Capital", capital="  ", iso="BC"),  # empty capital
        _rec("France", iso="F2"),  # duplicate name
        _rec("Francia", iso="FR"),  # the same country again under another name
        _rec("No Money", currencies=(), iso="NM"),  # empty currency
        _rec("Odd Money", currencies=("euro",), iso="OM"),  # malformed currency
        {"capital": "Ghost Town"},  # no name at all
        _rec("Palestine, State of", capital="Ramallah", iso="PS"),
        _rec("Serbia and Montenegro", capital="Belgrade", iso="CS"),  # defunct
    ]
    with caplog.at_level(logging.WARNING, logger="postdiff.data.realworld"):
        facts = country_facts(records)
    keys = {f.key for f in facts}
    assert "capital:France" in keys and "capital:State of Palestine" in keys
    assert not any(k.endswith((":Francia", ":Serbia and Montenegro")) for k in keys)
    assert "capital:Nowhere Land" not in keys and "currency:Nowhere Land" in keys
    assert "currency:No Money" not in keys and "currency:Odd Money" not in keys
    assert all(f.gold and all(g.strip() for g in f.gold) for f in facts)
    log = caplog.text
    for expected in ["10 records", "capital missing or malformed 2", "currency missing or malformed 2",
                     "duplicate country (same name or ISO code) 2", "record without a name 1", "defunct state 1"]:
        assert expected in log, expected
    # Far too few facts for the sizes: a clear error naming the key, not a short suite.
    with pytest.raises(ValueError, match=r"suite.sizes: .* needs 690 facts .* countryinfo has \d+"):
        generate_real_suite(0, SIZES, records)
    small = generate_real_suite(0, {"train": 2, "test": 2}, records)
    assert dict(small.group_by("slice").len().iter_rows()) == dict.fromkeys(SLICES, 4)


@pytest.mark.parametrize(("sizes", "k"), [(SIZES, 10), ({"train": 8, "calib": 4, "selector": 6, "test": 6}, 2),
                                          ({"train": 7, "calib": 3, "selector": 5, "test": 11}, 2)])
def test_prompts_per_template_keep_whole_templates_when_sizes_allow(sizes, k):
    assert per_template(sizes, len(HARMFUL_TEMPLATES)) == k


def test_build_suite_stage_real_and_unknown_builtin(tmp_path, suite):
    out = tmp_path / "suite.parquet"
    params = {"source": "builtin", "builtin": "real", "seed": 0, "sizes": SIZES, "world": {}}
    build_suite(Job(input={}, output={"suite": str(out)}, params=params))
    assert pl.read_parquet(out).equals(suite)
    with pytest.raises(ValueError, match="suite.builtin must be one of world, real, got 'fake'"):
        build_suite(Job(input={}, output={"suite": str(out)}, params={**params, "builtin": "fake"}))
