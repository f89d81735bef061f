# Each seed's surrogates in the layouts of SAELens and EleutherAI sparsify, one job per seed, layer
# and layout (config `export`). Standardisation folded in: both take raw PT hidden states.

EXPORT = config["export"]
# Per layout: the directory of a seed's and layer's export (`{seed}` and `{layer}` patterns) and its
# files. The feature cards link to these files.
EXPORT_DIRS = {
    "saelens": f"{SEED}/export/saelens/L{{layer}}",
    "sparsify": f"{SEED}/export/sparsify/layers.{{layer}}",
}
EXPORT_NAMES = {
    "saelens": {"cfg": "cfg.json", "weights": "sae_weights.safetensors", "sparsity": "sparsity.safetensors"},
    "sparsify": {"cfg": "cfg.json", "weights": "sae.safetensors"},
}
EXPORT_LAYOUTS = [layout for layout in EXPORT_DIRS if EXPORT[layout]]
# Every export file of every seed and layer that the config asks for.
EXPORT_FILES = [
    f"{EXPORT_DIRS[layout]}/{name}".format(seed=s, layer=layer)
    for s in SEEDS for layer in config["layers"] for layout in EXPORT_LAYOUTS for name in EXPORT_NAMES[layout].values()
]


def export_outputs(layout):
    return {key: f"{EXPORT_DIRS[layout]}/{name}" for key, name in EXPORT_NAMES[layout].items()}


rule export_saelens:
    wildcard_constraints:
        layer=r"\d+",
    input:
        module=f"{SEED}/surrogate/L{{layer}}.safetensors",
        shards=cache_shards("train"),
        teacher=f"{RUN}/teacher/train.parquet",
        **model_inputs(),
    output:
        **export_outputs("saelens"),
    log:
        f"{RUN}/logs/seed{{seed}}/export/saelens/L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/export/saelens/L{{layer}}.tsv"
    params:
        **stage(
            "postdiff.export:export_saelens",
            **model_paths(),
            layer=lambda wc: int(wc.layer),
            layers=config["layers"],
        ),
    conda:
        ENV
    script:
        STAGE


rule export_sparsify:
    wildcard_constraints:
        layer=r"\d+",
    input:
        module=f"{SEED}/surrogate/L{{layer}}.safetensors",
        **model_inputs(),
    output:
        **export_outputs("sparsify"),
    log:
        f"{RUN}/logs/seed{{seed}}/export/sparsify/L{{layer}}.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/export/sparsify/L{{layer}}.tsv"
    params:
        **stage(
            "postdiff.export:export_sparsify",
            **model_paths(),
            layer=lambda wc: int(wc.layer),
        ),
    conda:
        ENV
    script:
        STAGE
