# Prompt suite (built-in generator or a user file) and its stratified, seeded splits.


rule suite:
    input:
        # A user's suite file is an input, so editing it reruns what depends on it.
        source=[] if config["suite"]["source"] == BUILTIN else [config["suite"]["source"]],
    output:
        suite=f"{RUN}/suite/suite.parquet",
    log:
        f"{RUN}/logs/suite.log",
    benchmark:
        f"{RUN}/benchmarks/suite.tsv"
    params:
        **stage(
            "postdiff.data.suite:build_suite",
            source=config["suite"]["source"],
            builtin=config["suite"]["builtin"],
            brevity_kinds=config["suite"]["brevity_kinds"],
            seed=config["suite"]["seed"],
            sizes=config["suite"]["sizes"],
            world=config["world"],
        ),
    conda:
        ENV
    script:
        STAGE


rule split:
    input:
        suite=rules.suite.output.suite,
    output:
        **{split: f"{RUN}/suite/{split}.parquet" for split in SPLITS},
    log:
        f"{RUN}/logs/split.log",
    benchmark:
        f"{RUN}/benchmarks/split.tsv"
    params:
        **stage(
            "postdiff.data.splits:split_suite",
            seed=config["suite"]["seed"],
            sizes=config["suite"]["sizes"],
        ),
    conda:
        ENV
    script:
        STAGE
