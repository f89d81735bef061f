# One TopK surrogate per layer, fitted on the train cache, and its R^2 / dead features per split.


rule train_surrogate:
    input:
        shards=cache_shards("train"),
        standardiser=rules.standardiser.output.standardiser,
        teacher=f"{RUN}/teacher/train.parquet",
        **model_inputs(),
    output:
        module=f"{RUN}/surrogate/L{{layer}}.safetensors",
        curve=f"{RUN}/surrogate/L{{layer}}_curve.parquet",
        curve_png=report(
            f"{RUN}/surrogate/L{{layer}}_curve.png",
            caption="../report/curve.rst",
            category="Surrogate",
            labels={"layer": "{layer}", "figure": "loss curve"},
        ),
    log:
        f"{RUN}/logs/surrogate/L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/surrogate/L{{layer}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **stage(
            "postdiff.surrogate:train_layer",
            **model_params(),
            layer=lambda wc: int(wc.layer),
            layers=config["layers"],
            **config["surrogate"],
        ),
    conda:
        ENV
    script:
        STAGE


rule surrogate_metrics:
    input:
        module=rules.train_surrogate.output.module,
        standardiser=rules.standardiser.output.standardiser,
        **{split: cache_shards(split) for split in SPLITS},
        **{f"{split}_teacher": f"{RUN}/teacher/{split}.parquet" for split in SPLITS},
        **model_inputs(),
    output:
        metrics=f"{RUN}/surrogate/L{{layer}}_metrics.parquet",
    log:
        f"{RUN}/logs/surrogate/L{{layer}}_metrics.log",
    benchmark:
        f"{RUN}/benchmarks/surrogate/L{{layer}}_metrics.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **stage(
            "postdiff.surrogate:layer_metrics",
            **model_params(),
            layer=lambda wc: int(wc.layer),
            layers=config["layers"],
            splits=SPLITS,
        ),
    conda:
        ENV
    script:
        STAGE
