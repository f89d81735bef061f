# Answer-phase activation caches (h_PT and delta per layer), sharded, and the train standardiser.


rule cache_shard:
    input:
        teacher=f"{RUN}/teacher/{{split}}.parquet",
        **model_inputs(),
    output:
        tensors=f"{RUN}/cache/{{split}}/shard{{shard}}.safetensors",
        index=f"{RUN}/cache/{{split}}/shard{{shard}}.parquet",
    log:
        f"{RUN}/logs/cache/{{split}}/shard{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/cache/{{split}}/shard{{shard}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("cache_shard"),
    params:
        **stage(
            "postdiff.method.cache:cache_shard",
            **model_params(),
            layers=config["layers"],
            shard=lambda wc: int(wc.shard),
            n_shards=config["cache"]["n_shards"],
            batch_size=config["cache"]["batch_size"],
            cache_dtype=config["cache"]["dtype"],
        ),
    conda:
        ENV
    script:
        STAGE


rule standardiser:
    input:
        shards=cache_shards("train"),
    output:
        standardiser=f"{RUN}/cache/standardiser.safetensors",
    log:
        f"{RUN}/logs/cache/standardiser.log",
    benchmark:
        f"{RUN}/benchmarks/cache/standardiser.tsv"
    params:
        **stage(
            "postdiff.method.standardise:standardiser",
            layers=config["layers"],
        ),
    conda:
        ENV
    script:
        STAGE
