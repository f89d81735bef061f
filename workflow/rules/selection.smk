# Feature scores on the selector split, CapMask / VMask by forward selection, size-matched
# baseline masks, and the threshold sweep (every cutoff its own target), per surrogate seed.
# Nothing here reads test.

# A checkpoint: which sweep points share a candidate pool is read from its scores (shared_pool).
checkpoint score_features:
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
        **gpu_resources("score_features"),
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
        **stage("postdiff.method.selection.scoreplot:plot_scores", top_n=config["scoring"]["top_n"]),
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
# In one job, a sweep point whose pool an earlier point has copies that point's selection (shared_pool).
for target, sel in SELECTIONS.items():
    if SEL["n_shards"] == 1:

        rule:
            name:
                f"select_{target}"
            input:
                unpack(sel["shared"]),
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
                **gpu_resources(f"select_{target}"),
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
                verified=f"{sel['work']}/step{{step}}/shard{{shard}}_verified.json",
            log:
                f"{RUN}/logs/{sel['log']}/step{{step}}/shard{{shard}}.log",
            benchmark:
                f"{RUN}/benchmarks/{sel['log']}/step{{step}}/shard{{shard}}.tsv"
            threads: config["threads"]
            retries: RETRIES
            resources:
                **gpu_resources(f"select_{target}_shard"),
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
                records=step_values(sel["work"], "_records.parquet"),
                verified=step_values(sel["work"], "_verified.json"),
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
        score=MASK_FILES["score"],
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
