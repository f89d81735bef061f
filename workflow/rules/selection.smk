# Feature scores on the selector split, CapMask / VMask by forward selection, size-matched
# baseline masks, and the threshold sweep (every cutoff its own target), per surrogate seed.
# Nothing here reads test.

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


rule score_features:
    input:
        **SELECTOR,
        records=eval_file("selector", "FullDelta"),
        **model_inputs(),
    output:
        scores=SELECTION_REFERENCES["scores"],
    log:
        f"{RUN}/logs/seed{{seed}}/selection/scores.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/selection/scores.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **stage(
            "postdiff.method.selection.scoring:score_features",
            **model_params(),
            ridge_alpha=config["scoring"]["ridge_alpha"],
            batch_size=SEL["batch_size"],
        ),
    conda:
        ENV
    script:
        STAGE


# Its own job: `scoring.top_n` only sizes the plot, so changing it reruns the plot alone.
rule scores_plot:
    input:
        scores=rules.score_features.output.scores,
    output:
        plot=report(f"{SEED}/selection/scores.png", caption="../report/scores.rst", category="Selection",
                    subcategory="seed {seed}"),
    log:
        f"{RUN}/logs/seed{{seed}}/selection/scores_plot.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/selection/scores_plot.tsv"
    params:
        **stage("postdiff.method.selection.scoring:plot_scores", top_n=config["scoring"]["top_n"]),
    conda:
        ENV
    script:
        STAGE


wildcard_constraints:
    exclusion=r"[^/]+",
    cutoff=r"[^/]+",
    step=r"\d+",
    shard=r"\d+",


# One job per selection; or, with `selection.n_shards` > 1, every step's candidates cut into
# shards that run as separate jobs, a cheap merge per step, and a cheap job writing the mask.
for target, sel in SELECTIONS.items():
    if SEL["n_shards"] == 1:

        rule:
            name:
                f"select_{target}"
            input:
                **sel["input"],
            output:
                mask=sel["mask"],
                steps=sel["steps"],
                records=sel["records"],
            log:
                f"{RUN}/logs/{sel['log']}.log",
            benchmark:
                f"{RUN}/benchmarks/{sel['log']}.tsv"
            threads: config["threads"]
            retries: RETRIES
            resources:
                **gpu_resources(),
            params:
                **stage(
                    "postdiff.method.selection.jobs:select",
                    **sel["params"],
                    **model_params(),
                ),
            conda:
                ENV
            script:
                STAGE

    else:

        rule:
            name:
                f"select_{target}_shard"
            input:
                **sel["input"],
                state=previous_state(sel["work"]),
            output:
                values=f"{sel['work']}/step{{step}}/shard{{shard}}.parquet",
                records=f"{sel['work']}/step{{step}}/shard{{shard}}_records.parquet",
            log:
                f"{RUN}/logs/{sel['log']}/step{{step}}/shard{{shard}}.log",
            benchmark:
                f"{RUN}/benchmarks/{sel['log']}/step{{step}}/shard{{shard}}.tsv"
            threads: config["threads"]
            retries: RETRIES
            resources:
                **gpu_resources(),
            params:
                **stage(
                    "postdiff.method.selection.jobs:select_shard",
                    shard=lambda wc: int(wc.shard),
                    n_shards=SEL["n_shards"],
                    **sel["params"],
                    **model_params(),
                ),
            conda:
                ENV
            script:
                STAGE

        rule:
            name:
                f"select_{target}_step"
            localrule: True
            input:
                **sel["input"],
                state=previous_state(sel["work"]),
                values=step_values(sel["work"]),
                records=step_values(sel["work"], "_records"),
            output:
                state=f"{sel['work']}/step{{step}}.json",
                steps=f"{sel['work']}/step{{step}}.parquet",
                records=f"{sel['work']}/step{{step}}_records.parquet",
            log:
                f"{RUN}/logs/{sel['log']}/step{{step}}.log",
            benchmark:
                f"{RUN}/benchmarks/{sel['log']}/step{{step}}.tsv"
            params:
                **stage(
                    "postdiff.method.selection.jobs:select_step",
                    **sel["params"],
                ),
            conda:
                ENV
            script:
                STAGE

        rule:
            name:
                f"select_{target}"
            localrule: True
            input:
                **sel["input"],
                **last_step(sel["work"]),
            output:
                mask=sel["mask"],
                steps=sel["steps"],
                records=sel["records"],
            log:
                f"{RUN}/logs/{sel['log']}.log",
            benchmark:
                f"{RUN}/benchmarks/{sel['log']}.tsv"
            params:
                **stage(
                    "postdiff.method.selection.jobs:select_finish",
                    **sel["params"],
                ),
            conda:
                ENV
            script:
                STAGE


rule baseline_masks:
    input:
        cap_mask=MASK_FILES["cap"],
        scores=rules.score_features.output.scores,
    output:
        random=MASK_FILES["random"],
        mass=MASK_FILES["mass"],
    log:
        f"{RUN}/logs/seed{{seed}}/selection/baselines.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/selection/baselines.tsv"
    params:
        # The RandomMask draw follows the surrogate seed (seed 0 draws with baselines.seed itself).
        **stage(
            "postdiff.method.selection.baselines:baseline_masks",
            seed=lambda wc: config["baselines"]["seed"] + int(wc.seed),
        ),
    conda:
        ENV
    script:
        STAGE


rule sweep_summary:
    input:
        masks=sweep_targets(),
        locked=MASK_FILES["cap"],
    output:
        summary=f"{SEED}/sweep/summary.parquet",
        csv=report(f"{SEED}/sweep/summary.csv", caption="../report/sweep.rst", category="Threshold sweep",
                   subcategory="seed {seed}"),
    log:
        f"{RUN}/logs/seed{{seed}}/sweep/summary.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/sweep/summary.tsv"
    params:
        **stage("postdiff.method.selection.sweep:sweep_summary"),
    conda:
        ENV
    script:
        STAGE
