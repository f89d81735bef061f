# Each seed's surrogates in the layouts of SAELens and EleutherAI sparsify (config `export`), one
# job per seed and layer. Standardisation folded in: both take raw PT hidden states.

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
# The job's outputs, `<layout>_<file>` for each layout the config asks for (the stage writes those).
EXPORT_OUTPUTS = {f"{layout}_{key}": f"{EXPORT_DIRS[layout]}/{name}"
                  for layout in EXPORT_LAYOUTS for key, name in EXPORT_NAMES[layout].items()}
# Every export file of every seed and layer.
EXPORT_FILES = expand(list(EXPORT_OUTPUTS.values()), seed=SEEDS, layer=config["layers"])


if EXPORT_LAYOUTS:

    rule export:
        wildcard_constraints:
            layer=r"\d+",
        input:
            module=f"{SEED}/surrogate/L{{layer}}.safetensors",
            # The SAELens layout's sparsity file: firing rates on the train cache.
            **(dict(shards=cache_shards("train"), teacher=f"{RUN}/teacher/train.parquet") if EXPORT["saelens"] else {}),
            **model_inputs(),
        output:
            **EXPORT_OUTPUTS,
        log:
            f"{RUN}/logs/seed{{seed}}/export/L{{layer}}.log",
        benchmark:
            f"{RUN}/benchmarks/seed{{seed}}/export/L{{layer}}.tsv"
        params:
            **stage(
                "postdiff.outputs.export:export_layer",
                **model_paths(),
                layer=lambda wc: int(wc.layer),
                layers=config["layers"],
            ),
        conda:
            ENV
        script:
            STAGE
