# Paths, parameters and resources shared by every stage.
import ast
import functools
import hashlib
import json
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


# The package that every job imports: the workflow's own src/, which stage.py puts first on the path.
SRC = Path(workflow.basedir) / "src"


def _module_file(mod):
    """The source file of `mod` (a dotted postdiff name) under SRC, or None."""
    base = SRC.joinpath(*mod.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# Cached: every stage's hash walks the same modules, and parsing them all again for each of
# ~40 stages was most of the time a dry run took (and every SLURM job re-reads this file).
@functools.cache
def _imported(mod):
    """postdiff modules that `mod`'s source imports anywhere in the file (static, no import)."""
    path = _module_file(mod)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = getattr(node, "module") or ""  # (the word is a keyword of Snakefiles)
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            found.add(base)
            # `from postdiff import metrics` imports the submodule postdiff.metrics
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m.split(".")[0] == "postdiff" and _module_file(m)}


_CODE_HASHES = {}


def code_hash(entry):
    """sha256 of the source of `entry`'s module and of every postdiff module it imports, directly
    or indirectly (with the packages around them). As a param it reruns exactly the jobs whose
    code changed; their outputs change, so everything downstream reruns too."""
    mod = entry.partition(":")[0]
    if mod not in _CODE_HASHES:
        if _module_file(mod) is None:
            raise ValueError(f"stage entry {entry!r}: no module {mod} under {SRC}")
        seen, todo = set(), [mod]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            parts = name.split(".")
            todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # packages run on import
            todo.extend(_imported(name))
        digest = hashlib.sha256()
        for name in sorted(seen):
            path = _module_file(name)
            digest.update(f"{path.relative_to(SRC)}\0".encode() + path.read_bytes() + b"\0")
        _CODE_HASHES[mod] = digest.hexdigest()
    return _CODE_HASHES[mod]


def stage(entry, **params):
    """A rule's params: the stage function `entry` ("postdiff.module:function"), the hash of its
    code, and the stage's own params. Every rule that runs STAGE takes its params from here."""
    return dict(entry=entry, code=code_hash(entry), **params)


def package_hash():
    """sha256 of the whole package and of the workflow's rules and scripts: the run id's code."""
    root = Path(workflow.basedir)
    files = [root / "Snakefile", *sorted((root / "workflow").rglob("*.smk")),
             *sorted((root / "workflow" / "scripts").rglob("*.py")), *sorted((SRC / "postdiff").rglob("*.py"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


def threshold(value):
    """The one form of a threshold in paths: `cap_cutoff=2.0` whether the config says 2 or 2.0."""
    text = repr(float(value))
    if not re.fullmatch(r"-?\d+\.\d+", text):
        raise ValueError(f"threshold {value!r}: use a plain decimal number (got {text} as a float)")
    return text


def preflight():
    """Stop a real run before its first job when the pair cannot be used: one line per problem,
    each naming its config key. Dry runs never get here (onstart), so they stay offline."""
    if not config["pair"]["preflight"]:
        return
    sys.path.insert(0, os.path.join(workflow.basedir, "src"))
    from postdiff.preflight import config_problems

    problems = config_problems(config)
    if problems:
        print("\n".join(["postdiff: the configured pair cannot be used (pair.preflight: false skips this check):", *problems]),
              file=sys.stderr)
        sys.exit(1)


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
    (postdiff.runtime.Job)."""
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


GATE_INPUTS = dict(
    split=f"{RUN}/suite/calib.parquet",
    teacher=f"{RUN}/teacher/calib.parquet",
    **model_inputs(),
)


def gate_params(mode, layers):
    boot = {k: config["bootstrap"][k] for k in ("B", "seed", "level")}
    return stage("postdiff.gates:calibrate", mode=mode, layers=layers, **model_params(), **config["gates"],
                 bootstrap=boot)


def gate_names():
    """A seed's gates files: the joint surrogate's and, with the one-layer ablation, each layer's."""
    singles = [f"single_L{v.removeprefix('OneLayer-L')}" for v in VARIANTS if v.startswith("OneLayer-L")]
    return ["full", *singles]


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
    keys = ("lambda", "size_cap", "accept", "min_gain", "fill_to_cap", "max_candidates", "max_new_tokens", "batch_size")
    # Each accepted step's gain gets an interval from the same paired bootstrap as Table 2.
    gain_bootstrap = {k: config["bootstrap"][k] for k in ("B", "seed", "level")}
    return dict(**{k: SEL[k] for k in keys}, gain_bootstrap=gain_bootstrap, **extra)


# The two forward selections: where each writes its mask, steps, per-step work and logs.
SELECTIONS = {
    "cap": dict(
        input=dict(**SELECTOR, **SELECTION_REFERENCES, **model_inputs()),
        mask=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/cap_mask.json",
        steps=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/steps.parquet",
        records=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/step_records.parquet",
        work=f"{SEED}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/select",
        log="seed{seed}/sweep/verb_exclusion={exclusion}/cap_cutoff={cutoff}",
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
        params=selection_params(selection="vmask", verb_cutoff=SEL["verb_cutoff"]),
    ),
}


def _filled(pattern, wildcards):
    return pattern.format(**dict(wildcards.items()))


def previous_state(work):
    """Input function: the selection state after the step before `step` (none before step 1)."""
    return lambda wc: [] if int(wc.step) == 1 else _filled(f"{work}/step{int(wc.step) - 1}.json", wc)


def step_values(work, suffix=""):
    """Input function: every candidate shard's objective values (or, with `suffix` "_records",
    its candidates' selector records) of one step."""
    return lambda wc: [_filled(f"{work}/step{wc.step}/shard{s}{suffix}.parquet", wc) for s in range(SEL["n_shards"])]


def last_step(work):
    """Input functions: the state after the last step and every step's rows."""
    steps = range(1, SEL["size_cap"] + 1)
    return dict(
        state=lambda wc: _filled(f"{work}/step{SEL['size_cap']}.json", wc),
        steps=lambda wc: [_filled(f"{work}/step{t}.parquet", wc) for t in steps],
        step_records=lambda wc: [_filled(f"{work}/step{t}_records.parquet", wc) for t in steps],
    )


def sweep_pairs():
    """The sweep's (verb_exclusion, cap_cutoff) pairs in their path form: every cutoff of the grid
    under the locked exclusion, and the locked cutoff under the strict one. One pair per
    selection: `[1, 2, 2.0]` is two selections, not three."""
    locked, strict = threshold(SEL["verb_exclusion"]), threshold(config["sweep"]["strict_verb_exclusion"])
    pairs = [(locked, threshold(c)) for c in config["sweep"]["cap_cutoffs"]] + [(strict, threshold(SEL["cap_cutoff"]))]
    return list(dict.fromkeys(pairs))


def sweep_targets(output="mask", seed="{seed}"):
    """The CapMask files of every sweep pair (or another `output` of the cap selection, e.g.
    "records"), for `seed` (by default a `{seed}` pattern)."""
    return [SELECTIONS["cap"][output].format(exclusion=e, cutoff=c, seed=seed) for e, c in sweep_pairs()]


BOOT = config["bootstrap"]
TEST_EVALS = [eval_file("test", v) for v in VARIANTS]
ABLATION = ["FullDelta"] + [v for v in VARIANTS if v.startswith("OneLayer-")]
QUALITATIVE = config["report"]["qualitative_variants"]


def cross_reference_problems():
    """Names that one part of the config uses for another: comparison labels must be variant
    labels, report lists must be variant keys. One line per problem."""
    problems = []
    labels = [variant_label(v) for v in VARIANTS]
    for i, comparison in enumerate(BOOT["comparisons"]):
        for side in ("a", "b"):
            name = comparison[side]
            if name not in labels:
                hint = f" (a key; its label is {variant_label(name)!r})" if name in VARIANTS else ""
                problems.append(f"bootstrap.comparisons[{i}].{side}: {name!r} is no variant label{hint}; "
                                f"labels: {', '.join(labels)}")
    for key in ("figure1_variants", "qualitative_variants"):
        for name in config["report"][key]:
            if name not in VARIANTS:
                hint = f" (a label; the key is {next(v for v in VARIANTS if variant_label(v) == name)!r})" \
                    if name in labels else ""
                problems.append(f"report.{key}: {name!r} is no variant key{hint}; keys: {', '.join(VARIANTS)}")
    return problems


if cross_reference_problems():
    raise WorkflowError("postdiff: the config names unknown variants:\n" + "\n".join(cross_reference_problems()))


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

