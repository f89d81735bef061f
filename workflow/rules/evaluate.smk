# Generation under each variant's intervention, checkers and teacher-forced KL to IT: per-prompt
# records. The selector split feeds scoring and selection; the test split feeds the tables.


wildcard_constraints:
    eval_split="selector|test",


rule evaluate:
    input:
        variant=f"{RUN}/variants/{{variant}}.json",
        split=f"{RUN}/suite/{{eval_split}}.parquet",
        teacher=f"{RUN}/teacher/{{eval_split}}.parquet",
        models=model_input("pt") + model_input("it"),
    output:
        records=f"{RUN}/eval/{{eval_split}}/{{variant}}.parquet",
    log:
        f"{RUN}/logs/eval/{{eval_split}}/{{variant}}.log",
    benchmark:
        f"{RUN}/benchmarks/eval/{{eval_split}}/{{variant}}.tsv"
    threads: config["threads"]
    resources:
        **gpu_resources(),
    params:
        entry="postdiff.evaluate:evaluate_variant",
        **model_params(),
        **config["evaluate"],
    conda:
        ENV
    script:
        STAGE
