# Per-layer gates alpha_l, calibrated on calib over a KL grid: the joint surrogate, each layer on
# its own (the one-layer ablation) and the MeanDiff baseline.

rule gates_full:
    input:
        **GATE_INPUTS,
        surrogates=expand(f"{RUN}/surrogate/L{{layer}}.safetensors", layer=config["layers"]),
    output:
        gates=f"{RUN}/gates/full.json",
        curve=f"{RUN}/gates/full_curve.parquet",
    log:
        f"{RUN}/logs/gates/full.log",
    benchmark:
        f"{RUN}/benchmarks/gates/full.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **gate_params("full", config["layers"]),
    conda:
        ENV
    script:
        STAGE


rule gates_single:
    input:
        **GATE_INPUTS,
        surrogates=f"{RUN}/surrogate/L{{layer}}.safetensors",
    output:
        gates=f"{RUN}/gates/single_L{{layer}}.json",
        curve=f"{RUN}/gates/single_L{{layer}}_curve.parquet",
    log:
        f"{RUN}/logs/gates/single_L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/gates/single_L{{layer}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
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
    log:
        f"{RUN}/logs/gates/mean.log",
    benchmark:
        f"{RUN}/benchmarks/gates/mean.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **gate_params("mean", config["layers"]),
    conda:
        ENV
    script:
        STAGE
