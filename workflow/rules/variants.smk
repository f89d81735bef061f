# Variants as data: each config entry becomes variants/<name>.json, which one evaluation rule runs.


def variant_table():
    """Configured variants, plus a one-layer ablation per layer when the config asks for it."""
    table = dict(config["variants"])
    if config["ablation"]["one_layer"] and len(config["layers"]) > 1:
        for layer in config["layers"]:
            table[f"OneLayer-L{layer}"] = {"mode": "full", "gates": f"single_L{layer}"}
    return table


VARIANTS = variant_table()
MASK_FILES = {
    "cap": f"{RUN}/sweep/verb_exclusion={config['selection']['verb_exclusion']}/cap_cutoff={config['selection']['cap_cutoff']}/cap_mask.json",
    "vmask": f"{RUN}/selection/vmask.json",
    "random": f"{RUN}/selection/random_mask.json",
    "mass": f"{RUN}/selection/mass_mask.json",
}
SURROGATE_MODES = ("full", "add_mask", "minus_mask", "bdec")


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS),


def variant_label(name):
    return VARIANTS[name].get("label", name)


def variant_inputs(wildcards):
    entry = VARIANTS[wildcards.variant]
    inputs = {}
    if "gates" in entry:
        inputs["gates"] = f"{RUN}/gates/{entry['gates']}.json"
    if entry["mode"] in SURROGATE_MODES:
        inputs["surrogates"] = expand(f"{RUN}/surrogate/L{{layer}}.safetensors", layer=config["layers"])
    if "mask" in entry:
        inputs["mask"] = MASK_FILES.get(entry["mask"], entry["mask"])
    if entry["mode"] == "mean":
        inputs["standardiser"] = f"{RUN}/cache/standardiser.safetensors"
    return inputs


rule variant_spec:
    input:
        unpack(variant_inputs),
    output:
        spec=f"{RUN}/variants/{{variant}}.json",
    log:
        f"{RUN}/logs/variants/{{variant}}.log",
    benchmark:
        f"{RUN}/benchmarks/variants/{{variant}}.tsv"
    params:
        entry="postdiff.spec:build_spec",
        surrogate_layers=config["layers"],
        name=lambda wc: variant_label(wc.variant),
        mode=lambda wc: VARIANTS[wc.variant]["mode"],
    conda:
        ENV
    script:
        STAGE
