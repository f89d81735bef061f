# One TopK surrogate per layer and seed, fitted on the train cache, and its R^2 / dead features
# per split.

# The training keys of every seed's surrogates: the seed list itself is no param of a seed's job,
# so adding a seed leaves the others' surrogates alone.
SURROGATE = {k: v for k, v in config["surrogate"].items() if k != "seeds"}


rule train_surrogate:
    input:
        shards=cache_shards("train"),
        standardiser=rules.standardiser.output.standardiser,
        teacher=f"{RUN}/teacher/train.parquet",
        **model_inputs(),
    output:
        module=f"{SEED}/surrogate/L{{layer}}.safetensors",
        curve=f"{SEED}/surrogate/L{{layer}}_curve.parquet",
        curve_png=report(
            f"{SEED}/surrogate/L{{layer}}_curve.png",
            caption="../report/curve.rst",
            category="Surrogate",
            labels={"seed": "{seed}", "layer": "{layer}", "figure": "loss curve"},
        ),
    log:
        f"{RUN}/logs/seed{{seed}}/surrogate/L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/surrogate/L{{layer}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("train_surrogate"),
    params:
        **stage(
            "postdiff.method.surrogate:train_layer",
            **model_params(),
            layer=lambda wc: int(wc.layer),
            layers=config["layers"],
            seed=lambda wc: int(wc.seed),
            **SURROGATE,
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
        metrics=f"{SEED}/surrogate/L{{layer}}_metrics.parquet",
    log:
        f"{RUN}/logs/seed{{seed}}/surrogate/L{{layer}}_metrics.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/surrogate/L{{layer}}_metrics.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("surrogate_metrics"),
    params:
        **stage(
            "postdiff.method.surrogate:layer_metrics",
            **model_params(),
            layer=lambda wc: int(wc.layer),
            layers=config["layers"],
            splits=SPLITS,
        ),
    conda:
        ENV
    script:
        STAGE
