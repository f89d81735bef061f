# Paths, parameters and resources shared by every stage.
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError

RUN = f"results/{config['run']}"
SPLITS = ["train", "calib", "selector", "test"]
STAGE = "../scripts/stage.py"
ENV = "../../envs/postdiff.yaml"
BUILTIN = "builtin"
PAIR_INFO = f"{RUN}/pair/info.json"
# Each surrogate seed has its own surrogates, gates, selections, evaluations and tables under
# results/<run>/seed<N>/; what no surrogate touches (suite, teacher, caches, PT, IT, MeanDiff)
# is computed once for all seeds, so adding a seed runs only that seed's jobs.
SEEDS = config["surrogate"]["seeds"]
SEED = f"{RUN}/seed{{seed}}"

# Every job (local, or a SLURM job re-reading this file) finds the pair's Hugging Face cache here.
# (Set with update(): --lint takes `os.environ[...]` for a read that wants an `envvars:` directive.)
if config["hf"]["home"]:
    os.environ.update(HF_HOME=os.path.abspath(config["hf"]["home"]))
if config["hf"]["offline"]:
    os.environ.update(HF_HUB_OFFLINE="1")


wildcard_constraints:
    split="|".join(SPLITS),
    seed=r"\d+",
    # "" for a seed-independent variant's files, "seed<N>/" for a seed's (see variant_dir).
    seeddir=r"(seed\d+/)?",


# The package that every job imports: the workflow's own src/, which stage.py puts first on the
# path. This process imports it too, for the code hashes and the config checks (standard library only).
SRC = Path(workflow.basedir) / "src"
sys.path.insert(0, str(SRC))
from postdiff.workflow.codehash import code_hash as _code_hash, tree_hash
from postdiff.workflow.configcheck import cross_reference_problems, threshold


def code_hash(entry):
    """postdiff.workflow.codehash.code_hash of `entry` ("postdiff.module:function") under SRC."""
    return _code_hash(SRC, entry)


def stage(entry, **params):
    """A rule's params: the stage function `entry` ("postdiff.module:function"), the hash of its
    code, and the stage's own params. Every rule that runs STAGE takes its params from here."""
    return dict(entry=entry, code=code_hash(entry), **params)


def package_hash():
    """sha256 of the whole package and of the workflow's rules and scripts: the run id's code."""
    root = Path(workflow.basedir)
    return tree_hash(root, [root / "Snakefile", *sorted((root / "workflow").rglob("*.smk")),
                            *sorted((root / "workflow" / "scripts").rglob("*.py")), *sorted((SRC / "postdiff").rglob("*.py"))])


def model_spec(role):
    """The model that `role` ("pt" or "it") names: the embedded pair's directory or a hub id/path."""
    spec = config["pair"][role]
    return f"{RUN}/pair/{role}" if spec == BUILTIN else spec


def pair_dirs():
    """Named inputs `pt_model` / `it_model`: the pair's directories when the workflow builds them,
    so the DAG orders the jobs (a hub id or outside path is no input)."""
    return {f"{role}_model": model_spec(role) for role in ("pt", "it") if config["pair"][role] == BUILTIN}


def model_inputs():
    """Inputs of a job that loads the pair: its directories and the pair's facts (fingerprints,
    stop set), computed once per run by `pair_info`."""
    return {**pair_dirs(), "pair": PAIR_INFO}


def _model_path(role):
    if config["pair"][role] != BUILTIN:
        return config["pair"][role]
    # Taken from the job's input, not hardcoded: without a shared filesystem, that is where it lands.
    return lambda wildcards, input: getattr(input, f"{role}_model")


def model_paths():
    """Params naming PT and IT; a rule using them also takes `pair_dirs()` or `model_inputs()`."""
    return {role: _model_path(role) for role in ("pt", "it")}


def model_params():
    """Params of a job that loads the pair. Carrying `device` goes with requesting `gpu_resources()`
    (tests/test_resources.py checks it over the real-pair DAG)."""
    return {**model_paths(), "dtype": config["pair"]["dtype"], "device": config["pair"]["device"]}


def _grows(value, cap=None):
    """A resource that grows with the attempt (an out-of-memory or time-limit kill asks for more):
    linear, so a second retry does not ask for four times what a node has, and never past `cap`
    (None: no cap), so a retry is not refused for asking more than any node has."""
    return lambda wildcards, attempt: value * attempt if cap is None else min(value * attempt, max(value, cap))


def gpu_resources():
    """What a model job requests. Memory (up to `resources.max_mem_mb`) and runtime grow with the
    attempt; `attempt` itself reaches the stage, which halves its batch size on every retry
    (postdiff.workflow.runtime.Job)."""
    res = dict(config["resources"]["gpu"])
    caps = {"mem_mb": config["resources"].get("max_mem_mb")}
    for key in ("mem_mb", "runtime"):
        if key in res:
            res[key] = _grows(res[key], caps.get(key))
    return {**res, "attempt": lambda wildcards, attempt: attempt}


RETRIES = config["resources"]["retries"]


def default_targets():
    return [f"{RUN}/provenance/run_id.json"]


def cache_shards(split):
    n = config["cache"]["n_shards"]
    return [f"{RUN}/cache/{split}/shard{s}.safetensors" for s in range(n)]


def variant_table():
    """Configured variants, plus a one-layer ablation per layer when the config asks for it."""
    table = dict(config["variants"])
    if config["ablation"]["one_layer"] and len(config["layers"]) > 1:
        for layer in config["layers"]:
            table[f"OneLayer-L{layer}"] = {"mode": "full", "gates": f"single_L{layer}"}
    return table


VARIANTS = variant_table()
SURROGATE_MODES = ("full", "add_mask", "minus_mask", "bdec")
# Gates that no surrogate calibrates; every other gates file is a seed's.
SHARED_GATES = ("mean",)
# Per seed (a `{seed}` pattern); the cap mask is the locked cutoff's.
MASK_FILES = {
    "cap": f"{SEED}/sweep/verb_exclusion={threshold(config['selection']['verb_exclusion'])}/cap_cutoff={threshold(config['selection']['cap_cutoff'])}/cap_mask.json",
    "vmask": f"{SEED}/selection/vmask.json",
    "random": f"{SEED}/selection/random_mask.json",
    "mass": f"{SEED}/selection/mass_mask.json",
}


def seeded(name):
    """Whether variant `name` depends on the surrogate seed: it reads a surrogate, a mask or
    surrogate-calibrated gates."""
    entry = VARIANTS[name]
    return entry["mode"] in SURROGATE_MODES or "mask" in entry or entry.get("gates") not in (None, *SHARED_GATES)


def variant_dir(name, seed="{seed}"):
    """Where variant `name`'s spec and evaluations live below results/<run>/: "" for a
    seed-independent variant, "seed<N>/" (or the `{seed}` pattern) for a seeded one."""
    return f"seed{seed}/" if seeded(name) else ""


def eval_file(split, name, seed="{seed}"):
    """The merged records of variant `name` on `split` (a `{seed}` pattern for a seeded one)."""
    return f"{RUN}/{variant_dir(name, seed)}eval/{split}/{name}.parquet"


def variant_label(name):
    return VARIANTS[name].get("label", name)


def _seed_of(wildcards):
    """The seed that a variant job's `seeddir` names, after checking it matches the variant."""
    name, seeddir = wildcards.variant, wildcards.seeddir
    if seeded(name) != bool(seeddir):
        where = f"{RUN}/seed<N>/" if seeded(name) else f"{RUN}/"
        raise WorkflowError(f"variant {name} {'depends' if seeded(name) else 'does not depend'} on the surrogate "
                            f"seed: its files are under {where} (asked for {RUN}/{seeddir})")
    return int(seeddir[len("seed"):-1]) if seeddir else None


def variant_inputs(wildcards):
    entry, seed = VARIANTS[wildcards.variant], _seed_of(wildcards)
    inputs = {}
    if "gates" in entry:
        root = RUN if entry["gates"] in SHARED_GATES else SEED.format(seed=seed)
        inputs["gates"] = f"{root}/gates/{entry['gates']}.json"
    if entry["mode"] in SURROGATE_MODES:
        inputs["surrogates"] = expand(f"{SEED}/surrogate/L{{layer}}.safetensors", seed=seed, layer=config["layers"])
    if "mask" in entry:
        inputs["mask"] = MASK_FILES.get(entry["mask"], entry["mask"]).format(seed=seed)
    if entry["mode"] == "mean":
        inputs["standardiser"] = f"{RUN}/cache/standardiser.safetensors"
    return inputs


if _problems := cross_reference_problems(config, VARIANTS):
    raise WorkflowError("postdiff: the config names unknown variants:\n" + "\n".join(_problems))
