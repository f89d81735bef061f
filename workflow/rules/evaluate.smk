# Generation under each variant's intervention, checkers and teacher-forced KL to IT: per-prompt
# records. The selector split feeds scoring and selection; the test split feeds the tables.
# Each split is cut into `evaluate.n_shards` jobs per variant; a cheap merge joins them. IT's
# records are its teacher rows (postdiff.evaluate.teacher_records): one local job per split, no GPU.

EVAL = config["evaluate"]
# Variant names as a wildcard pattern: those that run a model, and those that copy the teacher.
GENERATED = "|".join(re.escape(v) for v in VARIANTS if VARIANTS[v]["mode"] != "it") or "(?!)"
COPIED = "|".join(re.escape(v) for v in VARIANTS if VARIANTS[v]["mode"] == "it") or "(?!)"


wildcard_constraints:
    eval_split="selector|test",


rule evaluate:
    wildcard_constraints:
        variant=GENERATED,
    input:
        variant=f"{RUN}/{{seeddir}}variants/{{variant}}.json",
        split=f"{RUN}/suite/{{eval_split}}.parquet",
        teacher=f"{RUN}/teacher/{{eval_split}}.parquet",
        **model_inputs(),
    output:
        records=f"{RUN}/{{seeddir}}eval/{{eval_split}}/{{variant}}/shard{{shard}}.parquet",
    log:
        f"{RUN}/logs/{{seeddir}}eval/{{eval_split}}/{{variant}}/shard{{shard}}.log",
    benchmark:
        f"{RUN}/benchmarks/{{seeddir}}eval/{{eval_split}}/{{variant}}/shard{{shard}}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources(),
    params:
        **stage(
            "postdiff.evaluate:evaluate_variant",
            **model_params(),
            max_new_tokens=EVAL["max_new_tokens"],
            batch_size=EVAL["batch_size"],
            shard=lambda wc: int(wc.shard),
            n_shards=EVAL["n_shards"],
        ),
    conda:
        ENV
    script:
        STAGE


rule merge_eval:
    wildcard_constraints:
        variant=GENERATED,
    input:
        shards=expand(
            f"{RUN}/{{{{seeddir}}}}eval/{{{{eval_split}}}}/{{{{variant}}}}/shard{{shard}}.parquet", shard=range(EVAL["n_shards"])
        ),
    output:
        merged=f"{RUN}/{{seeddir}}eval/{{eval_split}}/{{variant}}.parquet",
    log:
        f"{RUN}/logs/{{seeddir}}eval/{{eval_split}}/{{variant}}.log",
    benchmark:
        f"{RUN}/benchmarks/{{seeddir}}eval/{{eval_split}}/{{variant}}.tsv"
    params:
        **stage("postdiff.shards:merge"),
    conda:
        ENV
    script:
        STAGE


rule evaluate_teacher:
    wildcard_constraints:
        variant=COPIED,
    input:
        variant=f"{RUN}/{{seeddir}}variants/{{variant}}.json",
        split=f"{RUN}/suite/{{eval_split}}.parquet",
        teacher=f"{RUN}/teacher/{{eval_split}}.parquet",
    output:
        records=f"{RUN}/{{seeddir}}eval/{{eval_split}}/{{variant}}.parquet",
    log:
        f"{RUN}/logs/{{seeddir}}eval/{{eval_split}}/{{variant}}.log",
    benchmark:
        f"{RUN}/benchmarks/{{seeddir}}eval/{{eval_split}}/{{variant}}.tsv"
    params:
        **stage(
            "postdiff.evaluate:evaluate_variant",
            max_new_tokens=EVAL["max_new_tokens"],
            batch_size=EVAL["batch_size"],
        ),
    conda:
        ENV
    script:
        STAGE
