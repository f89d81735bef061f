"""What the workflow checks in a config beyond its schema: the one path form of a threshold, and
names that one part of the config uses for another. Standard library only (the Snakemake process
imports it while it parses the rules)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any


def threshold(value: float | int | str) -> str:
    """The one form of a threshold in paths: ``cap_cutoff=2.0`` whether the config says 2 or 2.0."""
    text = repr(float(value))
    if not re.fullmatch(r"-?\d+\.\d+", text):
        raise ValueError(f"threshold {value!r}: use a plain decimal number (got {text} as a float)")
    return text


def cross_reference_problems(config: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Comparison labels must be variant labels, report lists must be variant keys (of ``variants``,
    the configured variants with the ablation's). One line per problem, naming the config key."""
    labels = {name: entry.get("label", name) for name, entry in variants.items()}
    problems = []
    for i, comparison in enumerate(config["bootstrap"]["comparisons"]):
        for side in ("a", "b"):
            name = comparison[side]
            if name not in labels.values():
                hint = f" (a key; its label is {labels[name]!r})" if name in variants else ""
                problems.append(f"bootstrap.comparisons[{i}].{side}: {name!r} is no variant label{hint}; "
                                f"labels: {', '.join(labels.values())}")
    for key in ("figure1_variants", "qualitative_variants"):
        for name in config["report"][key]:
            if name not in variants:
                hint = f" (a label; the key is {next(v for v, lab in labels.items() if lab == name)!r})" \
                    if name in labels.values() else ""
                problems.append(f"report.{key}: {name!r} is no variant key{hint}; keys: {', '.join(variants)}")
    return problems
