"""Checks of the configured pair before compute, and the pair's facts computed once per run.

:func:`config_problems` runs in Snakemake's ``onstart`` (so dry runs stay offline): each problem
is one line naming the config key and its value. The ``pair_info`` stage runs the same checks as
the first job of every run and writes what later jobs need of the pair (fingerprints, the stop
set, the number of decoder blocks), so no job hashes model weights again.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from postdiff.models.families import TESTED_ARCHITECTURES, family_of
from postdiff.workflow.io import read_json, write_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

ROLES = ("pt", "it")
BUILTIN = "builtin"


def _where() -> str:
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return f"HF_HOME={home}" + (", HF_HUB_OFFLINE=1" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")


def model_problem(key: str, spec: str) -> str | None:
    """Why ``spec`` cannot be loaded: not a local directory with a config, not cached, not reachable."""
    from postdiff.models.loading import loads_locally

    try:
        loads_locally(spec)
    except FileNotFoundError as err:
        return f"{key}: {err} ({_where()})"
    return None


def pair_problems(pt: str, it: str, layers: Sequence[int], keys: Mapping[str, str] | None = None) -> list[str]:
    """One line per problem of the pair: a model that is nowhere, a model class whose decoder
    blocks or final norm the hooks cannot find, different vocabularies, a layer out of range. ``keys`` names each check's config key (``pt``, ``it``, ``layers``)."""
    from postdiff.models.loading import pair_mismatches, structure_problem, text_config

    keys = {"pt": "pair.pt", "it": "pair.it", "layers": "layers", **(keys or {})}
    specs = {"pt": pt, "it": it}
    problems = [p for role, spec in specs.items() if (p := model_problem(keys[role], spec))]
    if problems:
        return problems
    problems = [f"{keys[role]}: {spec!r}: {msg}" for role, spec in specs.items() if (msg := structure_problem(spec))]
    problems += [f"{keys['it']}: {it!r}: {msg}" for msg in pair_mismatches(pt, it)]
    n_layers = min(text_config(spec).num_hidden_layers for spec in specs.values())
    bad = [layer for layer in layers if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_layers]
    if bad:
        problems.append(f"{keys['layers']}: {bad} out of range: the pair has {n_layers} decoder blocks (0..{n_layers - 1})")
    return problems


def hf_home_problem(config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str | None:
    """Offline, a hub id loads from one cache only: the one the jobs on the nodes see. Without
    ``hf.home`` (or an exported HF_HOME) each node would look in its own ~/.cache and fail there."""
    hf = config.get("hf") or {}  # (absent from hand-made configs; the schema requires it in a run's)
    hub_ids = [f"pair.{r}={config['pair'][r]!r}" for r in ROLES
               if config["pair"][r] != BUILTIN and not os.path.isdir(config["pair"][r])]
    if not hf.get("offline") or hf.get("home") or environ.get("HF_HOME") or not hub_ids:
        return None
    return (f"hf.home: null, but hf.offline is true and {', '.join(hub_ids)} is a hub id: set hf.home to the "
            "Hugging Face cache the jobs' nodes see (or export HF_HOME)")


def config_problems(config: Mapping[str, Any]) -> list[str]:
    """The checks of :func:`pair_problems` for a workflow config. A pair that the run itself
    trains (``builtin``) does not exist yet and is checked by the ``pair_info`` job instead."""
    pair = config["pair"]
    if BUILTIN in (pair["pt"], pair["it"]):
        return []
    if problem := hf_home_problem(config):
        return [problem]
    return pair_problems(pair["pt"], pair["it"], config["layers"])


def exit_on_problems(config: Mapping[str, Any]) -> None:
    """Snakemake's ``onstart``: stop a real run before its first job when the pair cannot be used,
    printing one line per problem (``pair.preflight: false`` skips this check). Dry runs never
    get here, so they stay offline."""
    if not config["pair"]["preflight"]:
        return
    if problems := config_problems(config):
        print("\n".join(["postdiff: the configured pair cannot be used (pair.preflight: false skips this check):",
                         *problems]), file=sys.stderr)
        sys.exit(1)


def pair_facts(pt: str, it: str) -> dict[str, Any]:
    """Fingerprints, the one stop set and the structure of the pair, without loading weights."""
    from transformers import AutoConfig

    from postdiff.models.loading import fingerprint, loads_locally, pair_stop_ids

    text = AutoConfig.from_pretrained(pt, local_files_only=loads_locally(pt))
    architecture = (text.architectures or [type(text).__name__])[0]
    if architecture not in TESTED_ARCHITECTURES:
        log.warning("%s is not among the architectures the workflow is tested on (%s): check the stop set, "
                    "BOS and layer count in this log before trusting results", architecture, ", ".join(sorted(TESTED_ARCHITECTURES)))
    family = family_of(pt, it)
    return {
        "pt": pt,
        "it": it,
        "fingerprints": {role: fingerprint(spec) for role, spec in zip(ROLES, (pt, it))},
        "stop_ids": pair_stop_ids(pt, it),
        "family": family.name if family else None,
        "architecture": architecture,
        "n_layers": text.get_text_config().num_hidden_layers,
        "vocab_size": text.get_text_config().vocab_size,
    }


def pair_info(job: Job) -> None:
    """Stage: refuse a bad pair with every problem at once, else write its facts (``info``)."""
    p = job.params
    problems = pair_problems(p["pt"], p["it"], [int(layer) for layer in p["layers"]])
    if problems:
        raise ValueError("the configured pair cannot be used:\n" + "\n".join(problems))
    facts = pair_facts(p["pt"], p["it"])
    log.info("pair: %s", facts)
    write_json(facts, job.output["info"])


def fingerprints(job: Job) -> dict[str, str]:
    """The pair's fingerprints: from the run's ``pair`` info when the job has it (hashed once per
    run), else computed from the ``pt``/``it`` params (a stage called outside the workflow)."""
    if "pair" in job.input:
        return read_json(job.input["pair"])["fingerprints"]
    from postdiff.models.loading import fingerprint

    return {role: fingerprint(job.params[role]) for role in ROLES}
