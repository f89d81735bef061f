# IT teacher completions: greedy, batched with left padding, for every split.


rule teacher:
    input:
        split=f"{RUN}/suite/{{split}}.parquet",
        it=model_input("it"),
    output:
        completions=f"{RUN}/teacher/{{split}}.parquet",
    log:
        f"{RUN}/logs/teacher/{{split}}.log",
    benchmark:
        f"{RUN}/benchmarks/teacher/{{split}}.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources(),
    params:
        entry="postdiff.teacher:teacher",
        it=model_spec("it"),
        dtype=config["pair"]["dtype"],
        device=config["pair"]["device"],
        **config["teacher"],
    conda:
        ENV
    script:
        STAGE
