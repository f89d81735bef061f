"""What the workflow derives from a config beyond its schema: the one path form of a threshold,
the variant table, which variants depend on the surrogate seed, the sweep's selections, and names
that one part of the config uses for another. Standard library only: the Snakemake process
imports it while it parses the rules."""

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


def grown(value: int, attempt: int, cap: int | None = None) -> int:
    """A resource request on Snakemake's ``attempt`` (an out-of-memory or time-limit kill asks for
    more): linear, so a second retry does not ask for four times what a node has, and never past
    ``cap`` (None: no cap), so a retry is not refused for asking more than any node has."""
    return value * attempt if cap is None else min(value * attempt, max(value, cap))


def gpu_request(resources: Mapping[str, Any], flag: str) -> dict[str, Any]:
    """``resources`` with its GPU asked for one way only: the SLURM plugin sends ``--gpus`` for
    ``gpu`` (and ``gpu_model``) and ``--gres`` for ``gres``, both when both are set. ``flag``
    ``gres`` folds ``gpu`` and ``gpu_model`` into ``gres: gpu[:<model>]:<n>``."""
    if flag == "gpus":
        return dict(resources)
    res = dict(resources)
    n, model = res.pop("gpu", 1), res.pop("gpu_model", None)
    res["gres"] = f"gpu:{model}:{n}" if model else f"gpu:{n}"
    return res


# The resource every model job holds one of (workflow/rules/common.smk); a cluster run that groups
# model jobs caps it at 1, so that Snakemake runs a group's jobs one after another.
GPU_SLOT = "gpu_slot"


def group_problems(groups: Mapping[str, str], limits: Mapping[str, Any]) -> list[str]:
    """Why the job groups ``groups`` (rule -> group id template) are unsafe on a cluster under the
    run's ``--resources`` ``limits``; empty when they are not. Snakemake sizes a group by stacking
    its parallel jobs only as far as the limits force it: without ``gpu_slot=1`` a group of n
    independent model jobs asks for n GPUs (``--gpus``), or with ``--gres`` for one GPU and the
    runtime of its longest job only. And a group id with a "/" (``{seeddir}`` is "seed<N>/") is
    never submitted: the SLURM plugin 2.8.0 fails on the job script's name and the run waits forever."""
    problems = [f"rule {rule}: group id {template!r} can contain '/' (use {{seed}} or no seed)"
                for rule, template in groups.items() if "/" in template or "{seeddir}" in template]
    if groups and limits.get(GPU_SLOT) != 1:
        problems.append(f"rules {', '.join(sorted(groups))} are grouped, but --resources has {GPU_SLOT}="
                        f"{limits.get(GPU_SLOT)}: add {GPU_SLOT}=1 (slurm/config.yaml has it; a --resources on "
                        "the command line replaces the profile's list), or drop the groups")
    return problems


PLACEHOLDER = "SET_ME"


def placeholder_problems(config: Mapping[str, Any]) -> list[str]:
    """One line per ``resources.gpu`` value still a ``SET_ME`` placeholder (config/gemma3-4b.yaml
    ships its site settings so): a cluster run stops before submitting any job."""
    return [f"resources.gpu.{key}: {value!r} is a placeholder: set your site's value (slurm/README.md)"
            for key, value in config["resources"]["gpu"].items() if str(value).startswith(PLACEHOLDER)]


# Variant modes that read the surrogate; gates that no surrogate calibrates (every other gates
# file is a seed's).
SURROGATE_MODES = ("full", "add_mask", "minus_mask", "bdec")
SHARED_GATES = ("mean",)


def variant_table(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Configured variants, plus a one-layer ablation per layer when the config asks for it."""
    table = dict(config["variants"])
    if config["ablation"]["one_layer"] and len(config["layers"]) > 1:
        for layer in config["layers"]:
            table[f"OneLayer-L{layer}"] = {"mode": "full", "gates": f"single_L{layer}"}
    return table


def seeded(entry: Mapping[str, Any]) -> bool:
    """Whether a variant (its table entry) depends on the surrogate seed: it reads a surrogate, a
    mask or surrogate-calibrated gates."""
    return entry["mode"] in SURROGATE_MODES or "mask" in entry or entry.get("gates") not in (None, *SHARED_GATES)


def sweep_pairs(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The sweep's (verb_exclusion, cap_cutoff) pairs in their path form: every cutoff of the grid
    under the locked exclusion, and the locked cutoff under the strict one. One pair per
    selection: cutoffs ``[1, 2, 2.0]`` are two selections, not three."""
    selection, sweep = config["selection"], config["sweep"]
    locked, strict = threshold(selection["verb_exclusion"]), threshold(sweep["strict_verb_exclusion"])
    pairs = [(locked, threshold(c)) for c in sweep["cap_cutoffs"]] + [(strict, threshold(selection["cap_cutoff"]))]
    return list(dict.fromkeys(pairs))


def cross_reference_problems(config: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Comparison labels must be variant labels, report lists must be variant keys (of ``variants``,
    the configured variants with the ablation's), and a planted IT needs a Llama toy PT. One line
    per problem, naming the config key."""
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
    toy = config.get("toy", {})
    if toy.get("plant") is not None and toy.get("architecture", "gemma3") != "llama":
        # Gemma 3 normalises each MLP output before the residual, so planted neurons are not additive.
        problems.append(f"toy.plant: a planted IT needs toy.architecture: llama, got {toy.get('architecture', 'gemma3')!r}")
    export = config.get("export", {})
    if export.get("hub"):
        # What is published is the SAELens layout, for a model that others can run.
        if not export.get("saelens"):
            problems.append("export.hub: publishing needs export.saelens: true")
        if config.get("pair", {}).get("pt") == "builtin":
            problems.append("export.hub: the embedded pair (pair.pt: builtin) is no hosted model; set pair.pt to a hub id")
    return problems
