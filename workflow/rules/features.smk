# Feature cards: one data job per surrogate seed (reads the selector and test caches in one streaming pass, runs IT
# for the logit lens and, with features.steer, PT for steering) and one local job rendering the
# page. Nothing upstream of the tables reads them.

FEATURES = config["features"]
# Every path of the feature cards is built here; `FEATURE_SEEDS` lists the data sets the page shows.
FEATURE_DIR = f"{SEED}/features"
FEATURE_NAMES = ("cards", "masks", "activity", "contexts", "lens", "layer_lens", "steering")
FEATURE_FILES = {name: f"{FEATURE_DIR}/{name}.parquet" for name in FEATURE_NAMES}
FEATURE_SEEDS = {f"surrogate seed {s}": {name: path.format(seed=s) for name, path in FEATURE_FILES.items()} for s in SEEDS}


# Label -> mask file: the locked CapMask, VMask and every sweep cutoff's CapMask.
FEATURE_MASKS = {"CapMask (locked)": MASK_FILES["cap"], "VMask": MASK_FILES["vmask"]}
for (_exclusion, _cutoff), _path in zip(sweep_pairs(), sweep_targets()):
    FEATURE_MASKS[f"CapMask sweep: cap_cutoff {_cutoff}, verb_exclusion {_exclusion}"] = _path


rule feature_data:
    input:
        scores=SELECTION_REFERENCES["scores"],
        gates=f"{SEED}/gates/full.json",
        standardiser=rules.standardiser.output.standardiser,
        surrogates=expand(f"{SEED}/surrogate/L{{layer}}.safetensors", layer=config["layers"], allow_missing=True),
        masks=list(FEATURE_MASKS.values()),
        **{split: cache_shards(split) for split in ("selector", "test")},
        **{f"{split}_suite": f"{RUN}/suite/{split}.parquet" for split in ("selector", "test")},
        **{f"{split}_teacher": f"{RUN}/teacher/{split}.parquet" for split in ("selector", "test")},
        **model_inputs(),
    output:
        **FEATURE_FILES,
    log:
        f"{RUN}/logs/seed{{seed}}/features/data.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/features/data.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("feature_data"),
    params:
        **stage(
            "postdiff.outputs.features:feature_data",
            **model_params(),
            layers=config["layers"],
            mask_labels=list(FEATURE_MASKS),
            **FEATURES,
            max_new_tokens=EVAL["max_new_tokens"],
            batch_size=EVAL["batch_size"],
        ),
    conda:
        ENV
    script:
        STAGE


# Per seed (in FEATURE_SEEDS' order), layout and layer: the export that each card links to,
# relative to the page (EXPORT_TARGETS: a SAELens weights file, or the seed's sparsify directory).
EXPORT_LINKS = [
    {layout: {layer: os.path.relpath(EXPORT_TARGETS[layout].format(seed=s, layer=layer), RUN)
              for layer in config["layers"]} for layout in EXPORT_LAYOUTS}
    for s in SEEDS
]


rule feature_page:
    input:
        **{name: [files[name] for files in FEATURE_SEEDS.values()] for name in FEATURE_NAMES},
        exports=EXPORT_FILES,  # not read: the cards link to them
    output:
        html=report(f"{RUN}/features.html", caption="../report/features.rst", category="Features"),
    log:
        f"{RUN}/logs/features/page.log",
    benchmark:
        f"{RUN}/benchmarks/features/page.tsv"
    params:
        **stage(
            "postdiff.outputs.featurepage:feature_page",
            labels=list(FEATURE_SEEDS),
            steer=FEATURES["steer"],
            exports=EXPORT_LINKS,
        ),
    conda:
        ENV
    script:
        STAGE
