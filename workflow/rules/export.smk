# Each seed's surrogates in the layouts of SAELens and EleutherAI sparsify (config `export`).
# Standardisation folded in: both take raw PT hidden states.

EXPORT = config["export"]
# SAELens: one directory per seed and layer (`{seed}` and `{layer}` patterns).
SAELENS_DIR = f"{SEED}/export/saelens/L{{layer}}"
SAELENS_FILES = {"cfg": "cfg.json", "weights": "sae_weights.safetensors", "sparsity": "sparsity.safetensors"}
# sparsify: one directory per seed holding a `<hookpoint>/` per layer, as sparsify's trainer saves
# them. The hookpoint is a module path of PT's, known only once the job builds PT's module tree.
SPARSIFY_DIR = f"{SEED}/export/sparsify"
EXPORT_LAYOUTS = [layout for layout in ("saelens", "sparsify") if EXPORT[layout]]
# Per layout, a seed's and layer's link target: the SAELens weights file, sparsify's seed directory.
EXPORT_TARGETS = {"saelens": f"{SAELENS_DIR}/{SAELENS_FILES['weights']}", "sparsify": SPARSIFY_DIR}
# Every export output of every seed and layer.
EXPORT_FILES = [
    *(expand([f"{SAELENS_DIR}/{name}" for name in SAELENS_FILES.values()], seed=SEEDS, layer=config["layers"])
      if EXPORT["saelens"] else []),
    *(expand(SPARSIFY_DIR, seed=SEEDS) if EXPORT["sparsify"] else []),
]
# What publishing writes (config export.hub): the repository's directory, its registry entry and
# the SAEDashboard commands.
PUBLISH_FILES = ([f"{RUN}/publish/hub", f"{RUN}/publish/pretrained_saes.yaml", f"{RUN}/publish/saedashboard.sh"]
                 if EXPORT.get("hub") else [])


if EXPORT["saelens"]:

    rule export_saelens:
        wildcard_constraints:
            layer=r"\d+",
        input:
            module=f"{SEED}/surrogate/L{{layer}}.safetensors",
            # The sparsity file: firing rates on the train cache.
            shards=cache_shards("train"),
            teacher=f"{RUN}/teacher/train.parquet",
            **model_inputs(),
        output:
            **{key: f"{SAELENS_DIR}/{name}" for key, name in SAELENS_FILES.items()},
        log:
            f"{RUN}/logs/seed{{seed}}/export/saelens_L{{layer}}.log",
        benchmark:
            f"{RUN}/benchmarks/seed{{seed}}/export/saelens_L{{layer}}.tsv"
        params:
            **stage(
                "postdiff.outputs.export:export_saelens",
                **model_paths(),
                layer=lambda wc: int(wc.layer),
                layers=config["layers"],
            ),
        conda:
            ENV
        script:
            STAGE


if EXPORT["sparsify"]:

    rule export_sparsify:
        input:
            modules=expand(f"{SEED}/surrogate/L{{layer}}.safetensors", layer=config["layers"], allow_missing=True),
            **model_inputs(),
        output:
            sparsify=directory(SPARSIFY_DIR),
        log:
            f"{RUN}/logs/seed{{seed}}/export/sparsify.log",
        benchmark:
            f"{RUN}/benchmarks/seed{{seed}}/export/sparsify.tsv"
        params:
            **stage(
                "postdiff.outputs.export:export_sparsify",
                **model_paths(),
                layers=config["layers"],
            ),
        conda:
            ENV
        script:
            STAGE


if EXPORT.get("hub"):

    # Every seed's and layer's SAELens export as one Hub repository, and its SAELens registry entry.
    PUBLISHED = [[s, layer] for s in SEEDS for layer in config["layers"]]

    rule publish:
        input:
            cfgs=[f"{SAELENS_DIR}/{SAELENS_FILES['cfg']}".format(seed=s, layer=layer) for s, layer in PUBLISHED],
            weights=[f"{SAELENS_DIR}/{name}".format(seed=s, layer=layer)
                     for s, layer in PUBLISHED for name in (SAELENS_FILES["weights"], SAELENS_FILES["sparsity"])],
        output:
            hub=directory(PUBLISH_FILES[0]),
            snippet=PUBLISH_FILES[1],
            dashboards=PUBLISH_FILES[2],
        log:
            f"{RUN}/logs/publish.log",
        benchmark:
            f"{RUN}/benchmarks/publish.tsv"
        params:
            **stage(
                "postdiff.outputs.publish:publish",
                saes=PUBLISHED,
                repo_id=EXPORT["hub"],
                release=EXPORT["hub"].split("/")[1],
                model_id=config["pair"]["pt"],
            ),
        conda:
            ENV
        script:
            STAGE
