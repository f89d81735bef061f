# The pair: its facts and checks (every run), and the embedded PT/IT pair, a tiny Gemma 3 text
# model trained offline on a generated world (only when config names the built-in pair).


rule pair_info:
    input:
        **pair_dirs(),
    output:
        info=PAIR_INFO,
    log:
        f"{RUN}/logs/pair/info.log",
    benchmark:
        f"{RUN}/benchmarks/pair/info.tsv"
    params:
        **stage(
            "postdiff.models.preflight:pair_info",
            **model_paths(),
            layers=config["layers"],
        ),
    conda:
        ENV
    script:
        STAGE


TOY = {**{k: v for k, v in config["toy"].items() if k not in ("threads", "train", "shipped", "plant")}, "world_seed": config["world"]["seed"], "n_countries": config["world"]["n_countries"]}
PLANT = config["toy"].get("plant")


# By default the pair is the shipped one (the same on every machine); `toy.train: true` trains it.
if not config["toy"]["train"]:

    rule shipped_pair:
        input:
            shipped=config["toy"]["shipped"],
        output:
            pt=directory(f"{RUN}/pair/pt"),
            it=directory(f"{RUN}/pair/it"),
        log:
            f"{RUN}/logs/pair/shipped.log",
        benchmark:
            f"{RUN}/benchmarks/pair/shipped.tsv"
        localrule: True
        params:
            **stage("postdiff.models.toy.shipped:install", **TOY, plant=PLANT),
        conda:
            ENV
        script:
            STAGE

    ruleorder: shipped_pair > train_pt
    ruleorder: shipped_pair > train_it


rule tokenizer:
    output:
        tokenizer=directory(f"{RUN}/pair/tokenizer"),
    log:
        f"{RUN}/logs/pair/tokenizer.log",
    benchmark:
        f"{RUN}/benchmarks/pair/tokenizer.tsv"
    params:
        **stage(
            "postdiff.models.toy.train:build_tokenizer",
            **TOY,
        ),
    conda:
        ENV
    script:
        STAGE


rule train_pt:
    input:
        tokenizer=rules.tokenizer.output.tokenizer,
    output:
        model=directory(f"{RUN}/pair/pt"),
    log:
        f"{RUN}/logs/pair/train_pt.log",
    benchmark:
        f"{RUN}/benchmarks/pair/train_pt.tsv"
    threads: config["toy"]["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("train_pt"),
    params:
        **stage(
            "postdiff.models.toy.train:train_pt",
            **TOY,
        ),
    conda:
        ENV
    script:
        STAGE


rule train_it:
    input:
        model=rules.train_pt.output.model,
    output:
        model=directory(f"{RUN}/pair/it"),
    log:
        f"{RUN}/logs/pair/train_it.log",
    benchmark:
        f"{RUN}/benchmarks/pair/train_it.tsv"
    threads: config["toy"]["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("train_it"),
    params:
        # The positive control's IT is PT plus planted neurons; the default's, PT fine-tuned.
        **(
            stage("postdiff.models.toy.plant:train_planted", **TOY, plant=PLANT)
            if PLANT is not None
            else stage("postdiff.models.toy.train:train_it", **TOY)
        ),
    conda:
        ENV
    script:
        STAGE
