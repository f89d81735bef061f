# Variants as data: each config entry becomes variants/<name>.json, which one evaluation rule runs.


wildcard_constraints:
    variant="|".join(re.escape(v) for v in VARIANTS),


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
        **stage(
            "postdiff.spec:build_spec",
            surrogate_layers=config["layers"],
            name=lambda wc: variant_label(wc.variant),
            mode=lambda wc: VARIANTS[wc.variant]["mode"],
        ),
    conda:
        ENV
    script:
        STAGE
