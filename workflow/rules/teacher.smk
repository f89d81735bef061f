# IT teacher completions: greedy, batched with left padding, for every split.


rule teacher:
    input:
        split=f"{RUN}/suite/{{split}}.parquet",
        **model_inputs(),
    output:
        completions=f"{RUN}/teacher/{{split}}.parquet",
    log:
        f"{RUN}/logs/teacher/{{split}}.log",
    benchmark:
        f"{RUN}/benchmarks/teacher/{{split}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("teacher"),
    params:
        **stage(
            "postdiff.method.teacher:teacher",
            **model_params(),
            **config["teacher"],
        ),
    conda:
        ENV
    script:
        STAGE
