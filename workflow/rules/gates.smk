# Per-layer gates alpha_l, calibrated on calib over a KL grid and refined off it: each seed's joint
# surrogate and each of its layers on its own (the one-layer ablation), and the MeanDiff baseline
# (no seed). Each writes its choice against the grid winner and its neighbours, tie tests included.

GATE_INPUTS = dict(
    split=f"{RUN}/suite/calib.parquet",
    teacher=f"{RUN}/teacher/calib.parquet",
    **model_inputs(),
)


rule gates_full:
    input:
        **GATE_INPUTS,
        surrogates=expand(f"{SEED}/surrogate/L{{layer}}.safetensors", layer=config["layers"], allow_missing=True),
    output:
        gates=f"{SEED}/gates/full.json",
        curve=f"{SEED}/gates/full_curve.parquet",
        choice=f"{SEED}/gates/full_choice.json",
    log:
        f"{RUN}/logs/seed{{seed}}/gates/full.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/gates/full.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("gates_full"),
    params:
        **gate_params("full", config["layers"]),
    conda:
        ENV
    script:
        STAGE


rule gates_single:
    input:
        **GATE_INPUTS,
        surrogates=f"{SEED}/surrogate/L{{layer}}.safetensors",
    output:
        gates=f"{SEED}/gates/single_L{{layer}}.json",
        curve=f"{SEED}/gates/single_L{{layer}}_curve.parquet",
        choice=f"{SEED}/gates/single_L{{layer}}_choice.json",
    log:
        f"{RUN}/logs/seed{{seed}}/gates/single_L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/gates/single_L{{layer}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("gates_single"),
    params:
        **gate_params("full", lambda wc: [int(wc.layer)]),
    conda:
        ENV
    script:
        STAGE


rule gates_mean:
    input:
        **GATE_INPUTS,
        standardiser=rules.standardiser.output.standardiser,
    output:
        gates=f"{RUN}/gates/mean.json",
        curve=f"{RUN}/gates/mean_curve.parquet",
        choice=f"{RUN}/gates/mean_choice.json",
    log:
        f"{RUN}/logs/gates/mean.log",
    benchmark:
        f"{RUN}/benchmarks/gates/mean.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("gates_mean"),
    params:
        **gate_params("mean", config["layers"]),
    conda:
        ENV
    script:
        STAGE


# The seed's gate choices in one table for the report: a statistical tie is flagged there.
rule gate_table:
    input:
        choices=lambda wc: [f"{SEED}/gates/{name}_choice.json".format(seed=wc.seed) for name in gate_names()]
        + [rules.gates_mean.output.choice],
    output:
        csv=report(f"{SEED}/tables/gates.csv", caption="../report/gates.rst", category="Tables",
                   subcategory="seed {seed}"),
    log:
        f"{RUN}/logs/seed{{seed}}/gates/table.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/gates/table.tsv"
    params:
        **stage("postdiff.stats.tables:gate_table", names=[*gate_names(), "mean"]),
    conda:
        ENV
    script:
        STAGE
