# Paths, parameters and resources shared by every stage.
import functools
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
# The positive control: the embedded pair with planted neurons instead of fine-tuning (toy.plant).
PLANTED = config["pair"]["it"] == BUILTIN and config["toy"].get("plant") is not None
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
from postdiff.workflow.config import (GPU_SLOT, SHARED_GATES, SURROGATE_MODES, cross_reference_problems, seeded as _seeded,
                                     gpu_request, grown, sweep_pairs as _sweep_pairs, threshold, variant_table)


code_hash = functools.partial(_code_hash, SRC)  # of an entry "postdiff.module:function"


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


def gpu_resources(rule):
    """What a model job of `rule` requests. Memory (up to `resources.max_mem_mb`) and runtime grow
    with the attempt; `attempt` itself reaches the stage, which halves its batch size on every
    retry (postdiff.workflow.runtime.Job). The runtime is the cost preview's high estimate of the
    job times `resources.runtime_margin` unless `resources.gpu.runtime` sets one for every rule."""
    res = gpu_request(config["resources"]["gpu"], config["resources"]["gpu_flag"])
    caps = {"mem_mb": config["resources"].get("max_mem_mb")}
    res.setdefault("runtime", functools.partial(_estimated_runtime, rule))
    for key in ("mem_mb", "runtime"):
        if key in res:
            res[key] = lambda wildcards, attempt, value=res[key], cap=caps.get(key): grown(
                value(wildcards) if callable(value) else value, attempt, cap)
    # GPU_SLOT: one per model job, under either gpu_flag; a grouped run caps it at 1 (group_problems).
    return {**res, GPU_SLOT: 1, "attempt": lambda wildcards, attempt: attempt}


@functools.cache
def _estimate_inputs():
    """Prompts per split and mean lengths, as the cost preview reads them (teacher files once written)."""
    from postdiff import plan

    return plan.split_sizes(config, Path(RUN)), plan.lengths(config, Path(RUN))


def _estimated_runtime(rule, wildcards):
    from postdiff import plan

    sizes, lengths = _estimate_inputs()
    job = plan.JobFacts(rule=rule, stage="", wildcards=dict(wildcards.items()), gpu=True, loads=True)
    seconds = plan.job_seconds(job, config, sizes, lengths, plan.Estimates(), plan.HIGH)
    return plan.runtime_request(seconds, config["resources"]["runtime_margin"])


RETRIES = config["resources"]["retries"]


def default_targets():
    return [f"{RUN}/provenance/run_id.json"]


def cache_shards(split):
    n = config["cache"]["n_shards"]
    return [f"{RUN}/cache/{split}/shard{s}.safetensors" for s in range(n)]


def gate_params(mode, layers):
    boot = {k: config["bootstrap"][k] for k in ("B", "seed", "level")}
    return stage("postdiff.method.gates:calibrate", mode=mode, layers=layers, **model_params(), **config["gates"],
                 bootstrap=boot)


def gate_names():
    """A seed's gates files: the joint surrogate's and, with the one-layer ablation, each layer's."""
    singles = [f"single_L{v.removeprefix('OneLayer-L')}" for v in VARIANTS if v.startswith("OneLayer-L")]
    return ["full", *singles]


VARIANTS = variant_table(config)
LOCKED = (threshold(config["selection"]["verb_exclusion"]), threshold(config["selection"]["cap_cutoff"]))
# Per seed (a `{seed}` pattern); the cap mask is the locked cutoff's.
MASK_FILES = {
    "cap": f"{SEED}/sweep/verb_exclusion={LOCKED[0]}/cap_cutoff={LOCKED[1]}/cap_mask.json",
    "vmask": f"{SEED}/selection/vmask.json",
    "random": f"{SEED}/selection/random_mask.json",
    "mass": f"{SEED}/selection/mass_mask.json",
    "score": f"{SEED}/selection/score_mask.json",
}


def seeded(name):
    """Whether variant `name` depends on the surrogate seed (postdiff.workflow.config.seeded)."""
    return _seeded(VARIANTS[name])


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


SELECTOR = dict(
    variant=f"{SEED}/variants/FullDelta.json",
    split=f"{RUN}/suite/selector.parquet",
    teacher=f"{RUN}/teacher/selector.parquet",
)
SELECTION_REFERENCES = dict(
    scores=f"{SEED}/selection/scores.parquet",
    pt_records=eval_file("selector", "PT"),
    it_records=eval_file("selector", "IT"),
)
SEL = config["selection"]


def selection_params(**extra):
    """A selection's own params; the jobs that evaluate candidates add `model_params()`."""
    keys = ("lambda", "size_cap", "accept", "min_gain", "fill_to_cap", "evidence", "split_seed", "max_candidates", "max_new_tokens", "batch_size", "verify", "verify_margin")
    # Each accepted step's gain gets an interval from the same paired bootstrap as Table 2.
    gain_bootstrap = {k: config["bootstrap"][k] for k in ("B", "seed", "level")}
    return dict(**{k: SEL[k] for k in keys}, gain_bootstrap=gain_bootstrap, **extra)


def shared_pool(wc):
    """Input function of a one-job CapMask selection: nothing when it owns its pool, else the
    mask, steps and records of the owner, the first sweep point with the same pool (the locked
    point first, then the config's order, so adding a point never moves an existing owner).
    Pools are known once the scores are, hence the checkpoint. Sharded selections keep their
    own steps: behind a checkpoint their shard jobs would drop out of every dry run (and the
    cost preview) until the scores exist."""
    # Imported here: the Snakemake process needs polars only once scores exist.
    import polars as pl
    from postdiff.method.selection.sweep import pool_owner

    scores = pl.read_parquet(checkpoints.score_features.get(seed=wc.seed).output.scores)
    point = (wc.exclusion, wc.cutoff)
    owner = pool_owner(scores, [LOCKED, *sweep_pairs()], point, SEL["max_candidates"])
    if owner == point:
        return {}
    files = {**dict(wc.items()), "exclusion": owner[0], "cutoff": owner[1]}
    return {f"shared_{key}": SELECTIONS["cap"][key].format(**files) for key in ("mask", "steps", "records")}


# The two forward selections: where each writes its mask, steps, per-step work and logs.
SELECTIONS = {
    "cap": dict(
        input=dict(**SELECTOR, **SELECTION_REFERENCES, **model_inputs()),
        mask=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/cap_mask.json",
        steps=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/steps.parquet",
        records=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/step_records.parquet",
        work=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/select",
        log="seed{seed}/sweep/verb_exclusion={exclusion}/cap_cutoff={cutoff}",
        shared=shared_pool,
        params=selection_params(
            selection="cap",
            cap_cutoff=lambda wc: float(wc.cutoff),
            verb_exclusion=lambda wc: float(wc.exclusion),
        ),
    ),
    "vmask": dict(
        input=dict(**SELECTOR, **SELECTION_REFERENCES, **model_inputs(), full_records=eval_file("selector", "FullDelta")),
        mask=MASK_FILES["vmask"],
        steps=f"{SEED}/selection/vmask_steps.parquet",
        records=f"{SEED}/selection/vmask_step_records.parquet",
        work=f"{SEED}/selection/vmask",
        log="seed{seed}/selection/vmask",
        shared=lambda wc: {},
        params=selection_params(selection="vmask", verb_cutoff=SEL["verb_cutoff"]),
    ),
}


def _filled(pattern, wildcards):
    return pattern.format(**dict(wildcards.items()))


def previous_state(work):
    """Input function: the selection state after the step before `step` (none before step 1)."""
    return lambda wc: [] if int(wc.step) == 1 else _filled(f"{work}/step{int(wc.step) - 1}.json", wc)


def step_values(work, suffix=".parquet"):
    """Input function: every candidate shard's objective values (or, with `suffix`
    "_records.parquet", its candidates' selector records; "_verified.json", what verification
    decided in its call) of one step."""
    return lambda wc: [_filled(f"{work}/step{wc.step}/shard{s}{suffix}", wc) for s in range(SEL["n_shards"])]


def last_step(work):
    """Input functions: the state after the last step and every step's rows."""
    steps = range(1, SEL["size_cap"] + 1)
    return dict(
        state=lambda wc: _filled(f"{work}/step{SEL['size_cap']}.json", wc),
        steps=lambda wc: [_filled(f"{work}/step{t}.parquet", wc) for t in steps],
        step_records=lambda wc: [_filled(f"{work}/step{t}_records.parquet", wc) for t in steps],
    )


def sweep_pairs():
    """The sweep's (verb_exclusion, cap_cutoff) pairs in path form (postdiff.workflow.config.sweep_pairs)."""
    return _sweep_pairs(config)


def sweep_targets(output="mask", seed="{seed}"):
    """The CapMask files of every sweep pair (or another `output` of the cap selection, e.g.
    "records"), for `seed` (by default a `{seed}` pattern)."""
    return [SELECTIONS["cap"][output].format(exclusion=e, cutoff=c, seed=seed) for e, c in sweep_pairs()]


if _problems := cross_reference_problems(config, VARIANTS):
    raise WorkflowError("postdiff: the config contradicts itself:\n" + "\n".join(_problems))


def table_outputs(name, caption, root=SEED):
    """A table's CSV (in the report), Markdown and LaTeX under `root`/tables: by default one seed's."""
    sub = dict(subcategory="seed {seed}") if root == SEED else {}
    return {
        ext: report(f"{root}/tables/{name}.{ext}", caption=f"../report/{caption}", category="Tables", **sub)
        if ext == "csv" else f"{root}/tables/{name}.{ext}"
        for ext in ("csv", "md", "tex")
    }


def figure_outputs(name, caption, root=SEED):
    """A figure's PNG (in the report) and PDF under `root`/figures: by default one seed's."""
    sub = dict(subcategory="seed {seed}") if root == SEED else {}
    return {
        "png": report(f"{root}/figures/{name}.png", caption=f"../report/{caption}", category="Figures", **sub),
        "pdf": f"{root}/figures/{name}.pdf",
    }
