# Variants as data: each config entry becomes variants/<name>.json, which one evaluation rule runs;
# a variant that depends on the surrogate seed gets one spec per seed, under seed<N>/.


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS),


rule variant_spec:
    input:
        unpack(variant_inputs),
    output:
        spec=f"{RUN}/{{seeddir}}variants/{{variant}}.json",
    log:
        f"{RUN}/logs/{{seeddir}}variants/{{variant}}.log",
    benchmark:
        f"{RUN}/benchmarks/{{seeddir}}variants/{{variant}}.tsv"
    params:
        **stage(
            "postdiff.method.spec:build_spec",
            surrogate_layers=config["layers"],
            name=lambda wc: variant_label(wc.variant),
            mode=lambda wc: VARIANTS[wc.variant]["mode"],
            mask_key=lambda wc: VARIANTS[wc.variant].get("mask_key", "mask"),
        ),
    conda:
        ENV
    script:
        STAGE
