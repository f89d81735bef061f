"""What the rules derive from a config (postdiff.workflow.config), on hand-made configs."""

from __future__ import annotations

import pytest

from postdiff.workflow.config import cross_reference_problems, grown, seeded, sweep_pairs, threshold, variant_table


def test_a_threshold_has_one_path_form() -> None:
    assert [threshold(v) for v in (2, 2.0, "2", 0.5, -1)] == ["2.0", "2.0", "2.0", "0.5", "-1.0"]
    with pytest.raises(ValueError, match=r"threshold 1e-20: use a plain decimal number \(got 1e-20 as a float\)"):
        threshold(1e-20)


def test_sweep_pairs_are_one_per_selection() -> None:
    config = {"selection": {"verb_exclusion": 1, "cap_cutoff": 2}, "sweep": {"cap_cutoffs": [1, 2, 2.0], "strict_verb_exclusion": 0}}
    assert sweep_pairs(config) == [("1.0", "1.0"), ("1.0", "2.0"), ("0.0", "2.0")]


def test_the_one_layer_ablation_adds_a_variant_per_layer_and_only_surrogate_variants_are_seeded() -> None:
    variants = {"PT": {"mode": "pt"}, "MeanDiff": {"mode": "mean", "gates": "mean"},
                "FullDelta": {"mode": "full", "gates": "full"}, "CapMask": {"mode": "add_mask", "mask": "cap", "gates": "full"}}
    config = {"variants": variants, "ablation": {"one_layer": True}, "layers": [3, 7]}
    table = variant_table(config)
    assert list(table) == [*variants, "OneLayer-L3", "OneLayer-L7"]
    assert table["OneLayer-L7"] == {"mode": "full", "gates": "single_L7"}
    assert list(variant_table({**config, "layers": [3]})) == list(variants)  # one layer: nothing to ablate
    assert {name: seeded(entry) for name, entry in table.items()} == {
        "PT": False, "MeanDiff": False, "FullDelta": True, "CapMask": True, "OneLayer-L3": True, "OneLayer-L7": True}
    assert seeded({"mode": "pt", "gates": "full"})  # gates a surrogate calibrated


def test_cross_references_name_the_key_and_the_likely_fix() -> None:
    variants = {"FullDelta": {"mode": "full"}, "VMinus": {"mode": "minus_mask", "label": "FullDelta - VMask"}}
    config = {"bootstrap": {"comparisons": [{"a": "VMinus", "b": "FullDelta"}]},
              "report": {"figure1_variants": ["FullDelta - VMask"], "qualitative_variants": ["FullDelta"]}}
    assert cross_reference_problems(config, variants) == [
        "bootstrap.comparisons[0].a: 'VMinus' is no variant label (a key; its label is 'FullDelta - VMask'); "
        "labels: FullDelta, FullDelta - VMask",
        "report.figure1_variants: 'FullDelta - VMask' is no variant key (a label; the key is 'VMinus'); "
        "keys: FullDelta, VMinus",
    ]


def test_a_planted_it_needs_a_llama_pt() -> None:
    config = {"bootstrap": {"comparisons": []}, "report": {"figure1_variants": [], "qualitative_variants": []},
              "toy": {"plant": {"steps": 10}}}
    assert cross_reference_problems(config, {}) == [
        "toy.plant: a planted IT needs toy.architecture: llama, got 'gemma3'"]
    config["toy"]["architecture"] = "llama"
    assert cross_reference_problems(config, {}) == []


def test_publishing_needs_the_saelens_layout_and_a_hosted_pt() -> None:
    config = {"bootstrap": {"comparisons": []}, "report": {"figure1_variants": [], "qualitative_variants": []},
              "export": {"saelens": False, "sparsify": True, "hub": "me/saes"}, "pair": {"pt": "builtin"}}
    assert cross_reference_problems(config, {}) == [
        "export.hub: publishing needs export.saelens: true",
        "export.hub: the embedded pair (pair.pt: builtin) is no hosted model; set pair.pt to a hub id"]
    config.update(export={"saelens": True, "sparsify": True, "hub": "me/saes"}, pair={"pt": "google/gemma-3-4b-pt"})
    assert cross_reference_problems(config, {}) == []
    assert cross_reference_problems({**config, "export": {"saelens": False, "sparsify": True, "hub": None}}, {}) == []


def test_a_retry_asks_for_more_up_to_the_cap() -> None:
    assert [grown(64_000, a) for a in (1, 2, 3)] == [64_000, 128_000, 192_000]
    assert [grown(64_000, a, cap=100_000) for a in (1, 2, 3)] == [64_000, 100_000, 100_000]
    assert grown(200_000, 2, cap=100_000) == 200_000  # a first request above the cap is kept, never lowered
