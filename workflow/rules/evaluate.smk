# Generation under each variant's intervention, checkers and teacher-forced KL to IT: per-prompt
# records. The selector split feeds scoring and selection; the test split feeds the tables.
# Each split is cut into `evaluate.n_shards` jobs per variant and a cheap merge joins them; with
# one shard the job writes the variant's records itself (a merge job would only copy them). IT's
# records are its teacher rows (postdiff.method.records.teacher_records): one local job per split, no GPU.

EVAL = config["evaluate"]
SHARDED_EVAL = EVAL["n_shards"] > 1
RECORDS = f"{{seeddir}}eval/{{eval_split}}/{{variant}}"  # + ".parquet": one variant's merged records
# What one evaluate job writes (a shard's records, or all of them), under results, logs, benchmarks.
EVAL_JOB = f"{RECORDS}/shard{{shard}}" if SHARDED_EVAL else RECORDS
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
        records=f"{RUN}/{EVAL_JOB}.parquet",
    log:
        f"{RUN}/logs/{EVAL_JOB}.log",
    benchmark:
        f"{RUN}/benchmarks/{EVAL_JOB}.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("evaluate"),
    params:
        **stage(
            "postdiff.method.evaluate:evaluate_variant",
            **model_params(),
            max_new_tokens=EVAL["max_new_tokens"],
            batch_size=EVAL["batch_size"],
            shard=lambda wc: int(wc.get("shard", 0)),
            n_shards=EVAL["n_shards"],
        ),
    conda:
        ENV
    script:
        STAGE


if SHARDED_EVAL:

    rule merge_eval:
        localrule: True  # defined only with shards, so not in the Snakefile's localrules list
        wildcard_constraints:
            variant=GENERATED,
        input:
            shards=expand(f"{RUN}/{RECORDS}/shard{{shard}}.parquet", shard=range(EVAL["n_shards"]), allow_missing=True),
        output:
            merged=f"{RUN}/{RECORDS}.parquet",
        log:
            f"{RUN}/logs/{RECORDS}.log",
        benchmark:
            f"{RUN}/benchmarks/{RECORDS}.tsv"
        params:
            **stage("postdiff.workflow.shards:merge"),
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
        records=f"{RUN}/{RECORDS}.parquet",
    log:
        f"{RUN}/logs/{RECORDS}.log",
    benchmark:
        f"{RUN}/benchmarks/{RECORDS}.tsv"
    params:
        **stage("postdiff.method.records:teacher_variant", max_new_tokens=EVAL["max_new_tokens"]),
    conda:
        ENV
    script:
        STAGE
