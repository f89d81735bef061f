# Feature scores on the selector split, CapMask / VMask by forward selection, size-matched
# baseline masks, and the threshold sweep (every cutoff its own target). Nothing here reads test.

rule score_features:
    input:
        **SELECTOR,
        records=f"{RUN}/eval/selector/FullDelta.parquet",
        models=model_input("pt"),
    output:
        scores=f"{RUN}/selection/scores.parquet",
        plot=report(f"{RUN}/selection/scores.png", caption="../report/scores.rst", category="Selection"),
    log:
        f"{RUN}/logs/selection/scores.log",
    benchmark:
        f"{RUN}/benchmarks/selection/scores.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources(),
    params:
        entry="postdiff.scoring:score_features",
        **model_params(),
        ridge_alpha=config["scoring"]["ridge_alpha"],
        top_n=config["scoring"]["top_n"],
        batch_size=SEL["batch_size"],
    conda:
        ENV
    script:
        STAGE


rule select_cap:
    input:
        **SELECTOR,
        **SELECTION_REFERENCES,
    output:
        mask=f"{RUN}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/cap_mask.json",
        steps=f"{RUN}/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}/steps.parquet",
    log:
        f"{RUN}/logs/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}.log",
    benchmark:
        f"{RUN}/benchmarks/sweep/verb_exclusion={{exclusion}}/cap_cutoff={{cutoff}}.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources(),
    params:
        entry="postdiff.selection:select_cap",
        **selection_params(
            cap_cutoff=lambda wc: float(wc.cutoff),
            verb_exclusion=lambda wc: float(wc.exclusion),
        ),
    conda:
        ENV
    script:
        STAGE


rule select_vmask:
    input:
        **SELECTOR,
        **SELECTION_REFERENCES,
        full_records=f"{RUN}/eval/selector/FullDelta.parquet",
    output:
        mask=f"{RUN}/selection/vmask.json",
        steps=f"{RUN}/selection/vmask_steps.parquet",
    log:
        f"{RUN}/logs/selection/vmask.log",
    benchmark:
        f"{RUN}/benchmarks/selection/vmask.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources(),
    params:
        entry="postdiff.selection:select_vmask",
        **selection_params(verb_cutoff=SEL["verb_cutoff"]),
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
        f"{RUN}/logs/selection/baselines.log",
    benchmark:
        f"{RUN}/benchmarks/selection/baselines.tsv"
    params:
        entry="postdiff.selection:baseline_masks",
        seed=config["baselines"]["seed"],
    conda:
        ENV
    script:
        STAGE


rule sweep_summary:
    input:
        masks=sweep_targets(),
        locked=MASK_FILES["cap"],
    output:
        summary=f"{RUN}/sweep/summary.parquet",
        csv=report(f"{RUN}/sweep/summary.csv", caption="../report/sweep.rst", category="Threshold sweep"),
    log:
        f"{RUN}/logs/sweep/summary.log",
    benchmark:
        f"{RUN}/benchmarks/sweep/summary.tsv"
    params:
        entry="postdiff.selection:sweep_summary",
    conda:
        ENV
    script:
        STAGE
