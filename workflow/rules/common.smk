# Paths, parameters and resources shared by every stage.
import json
import os
import re
import sys

RUN = f"results/{config['run']}"
SPLITS = ["train", "calib", "selector", "test"]
STAGE = "../scripts/stage.py"
ENV = "../../envs/postdiff.yaml"
BUILTIN = "builtin"
PAIR_INFO = f"{RUN}/pair/info.json"

# Every job (local, or a SLURM job re-reading this file) finds the pair's Hugging Face cache here.
if config["hf"]["home"]:
    os.environ["HF_HOME"] = os.path.abspath(config["hf"]["home"])
if config["hf"]["offline"]:
    os.environ["HF_HUB_OFFLINE"] = "1"


wildcard_constraints:
    split="|".join(SPLITS),


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


def _grows(value):
    """A resource that grows with the attempt (an out-of-memory or time-limit kill asks for more):
    linear, so a second retry does not ask for four times what a node has."""
    return lambda wildcards, attempt: value * attempt


def gpu_resources():
    """What a model job requests. Memory and runtime grow with the attempt; `attempt` itself
    reaches the stage, which halves its batch size on every retry (postdiff.runtime.Job)."""
    res = dict(config["resources"]["gpu"])
    for key in ("mem_mb", "runtime"):
        if key in res:
            res[key] = _grows(res[key])
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
    return dict(entry="postdiff.gates:calibrate", mode=mode, layers=layers, **model_params(), **config["gates"])


def variant_table():
    """Configured variants, plus a one-layer ablation per layer when the config asks for it."""
    table = dict(config["variants"])
    if config["ablation"]["one_layer"] and len(config["layers"]) > 1:
        for layer in config["layers"]:
            table[f"OneLayer-L{layer}"] = {"mode": "full", "gates": f"single_L{layer}"}
    return table


VARIANTS = variant_table()
MASK_FILES = {
    "cap": f"{RUN}/sweep/verb_exclusion={config['selection']['verb_exclusion']}/cap_cutoff={config['selection']['cap_cutoff']}/cap_mask.json",
    "vmask": f"{RUN}/selection/vmask.json",
    "random": f"{RUN}/selection/random_mask.json",
    "mass": f"{RUN}/selection/mass_mask.json",
}
SURROGATE_MODES = ("full", "add_mask", "minus_mask", "bdec")


def variant_label(name):
    return VARIANTS[name].get("label", name)


def variant_inputs(wildcards):
    entry = VARIANTS[wildcards.variant]
    inputs = {}
    if "gates" in entry:
        inputs["gates"] = f"{RUN}/gates/{entry['gates']}.json"
    if entry["mode"] in SURROGATE_MODES:
        inputs["surrogates"] = expand(f"{RUN}/surrogate/L{{layer}}.safetensors", layer=config["layers"])
    if "mask" in entry:
        inputs["mask"] = MASK_FILES.get(entry["mask"], entry["mask"])
    if entry["mode"] == "mean":
        inputs["standardiser"] = f"{RUN}/cache/standardiser.safetensors"
    return inputs


SELECTOR = dict(
    variant=f"{RUN}/variants/FullDelta.json",
    split=f"{RUN}/suite/selector.parquet",
    teacher=f"{RUN}/teacher/selector.parquet",
)
SELECTION_REFERENCES = dict(
    scores=f"{RUN}/selection/scores.parquet",
    pt_records=f"{RUN}/eval/selector/PT.parquet",
    it_records=f"{RUN}/eval/selector/IT.parquet",
)
SEL = config["selection"]


def selection_params(**extra):
    """A selection's own params; the jobs that evaluate candidates add `model_params()`."""
    keys = ("lambda", "size_cap", "max_candidates", "max_new_tokens", "batch_size")
    return dict(**{k: SEL[k] for k in keys}, **extra)


# The two forward selections: where each writes its mask, steps, per-step work and logs.
SELECTIONS = {
    "cap": dict(
        input=dict(**SELECTOR, **SELECTION_REFERENCES, **model_inputs()),
        mask=f"{RUN}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/cap_mask.json",
        steps=f"{RUN}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/steps.parquet",
        work=f"{RUN}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/select",
        log=f"sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}",
        params=selection_params(
            selection="cap",
            cap_cutoff=lambda wc: float(wc.cutoff),
            verb_exclusion=lambda wc: float(wc.exclusion),
        ),
    ),
    "vmask": dict(
        input=dict(**SELECTOR, **SELECTION_REFERENCES, **model_inputs(), full_records=f"{RUN}/eval/selector/FullDelta.parquet"),
        mask=f"{RUN}/selection/vmask.json",
        steps=f"{RUN}/selection/vmask_steps.parquet",
        work=f"{RUN}/selection/vmask",
        log="selection/vmask",
        params=selection_params(selection="vmask", verb_cutoff=SEL["verb_cutoff"]),
    ),
}


def _filled(pattern, wildcards):
    return pattern.format(**dict(wildcards.items()))


def previous_state(work):
    """Input function: the selection state after the step before `step` (none before step 1)."""
    return lambda wc: [] if int(wc.step) == 1 else _filled(f"{work}/step{int(wc.step) - 1}.json", wc)


def step_values(work):
    """Input function: every candidate shard's objective values of one step."""
    return lambda wc: [_filled(f"{work}/step{wc.step}/shard{s}.parquet", wc) for s in range(SEL["n_shards"])]


def last_step(work):
    """Input functions: the state after the last step and every step's rows."""
    steps = range(1, SEL["size_cap"] + 1)
    return dict(
        state=lambda wc: _filled(f"{work}/step{SEL['size_cap']}.json", wc),
        steps=lambda wc: [_filled(f"{work}/step{t}.parquet", wc) for t in steps],
    )


def sweep_targets():
    """Every cutoff of the grid under the locked exclusion, and the locked cutoff under the strict one."""
    grid = [f"{RUN}/sweep/verb_exclusion={SEL['verb_exclusion']}/cap_cutoff={c}/cap_mask.json" for c in config["sweep"]["cap_cutoffs"]]
    strict = f"{RUN}/sweep/verb_exclusion={config['sweep']['strict_verb_exclusion']}/cap_cutoff={SEL['cap_cutoff']}/cap_mask.json"
    return grid + [strict]


BOOT = config["bootstrap"]
TEST_EVALS = [f"{RUN}/eval/test/{v}.parquet" for v in VARIANTS]
ABLATION = ["FullDelta"] + [v for v in VARIANTS if v.startswith("OneLayer-")]
QUALITATIVE = [v for v in config["report"]["qualitative_variants"] if v in VARIANTS]


def table_outputs(name, caption):
    return {
        ext: report(f"{RUN}/tables/{name}.{ext}", caption=f"../report/{caption}", category="Tables")
        if ext == "csv" else f"{RUN}/tables/{name}.{ext}"
        for ext in ("csv", "md", "tex")
    }


def figure_outputs(name, caption):
    return {
        "png": report(f"{RUN}/figures/{name}.png", caption=f"../report/{caption}", category="Figures"),
        "pdf": f"{RUN}/figures/{name}.pdf",
    }
