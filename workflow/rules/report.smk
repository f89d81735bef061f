# Tables 1-2, Figures 1-2, the qualitative page, the R^2 table, the pair's gap and the
# reproducibility records of the run.

rule table1:
    input:
        evals=TEST_EVALS,
    output:
        **table_outputs("table1", "table1.rst"),
    log:
        f"{RUN}/logs/tables/table1.log",
    benchmark:
        f"{RUN}/benchmarks/tables/table1.tsv"
    params:
        **stage(
            "postdiff.tables:table1",
            pt=variant_label("PT"),
            it=variant_label("IT"),
        ),
    conda:
        ENV
    script:
        STAGE


rule table2:
    input:
        evals=TEST_EVALS,
    output:
        **table_outputs("table2", "table2.rst"),
    log:
        f"{RUN}/logs/tables/table2.log",
    benchmark:
        f"{RUN}/benchmarks/tables/table2.tsv"
    params:
        **stage(
            "postdiff.tables:table2",
            pt=variant_label("PT"),
            it=variant_label("IT"),
            **BOOT,
        ),
    conda:
        ENV
    script:
        STAGE


rule r2_table:
    input:
        metrics=expand(f"{RUN}/surrogate/L{{layer}}_metrics.parquet", layer=config["layers"]),
    output:
        **table_outputs("r2", "r2.rst"),
    log:
        f"{RUN}/logs/tables/r2.log",
    benchmark:
        f"{RUN}/benchmarks/tables/r2.tsv"
    params:
        **stage("postdiff.tables:r2_table"),
    conda:
        ENV
    script:
        STAGE


rule figure1:
    input:
        evals=[f"{RUN}/eval/test/{v}.parquet" for v in config["report"]["figure1_variants"]],
    output:
        **figure_outputs("figure1", "figure1.rst"),
    log:
        f"{RUN}/logs/figures/figure1.log",
    benchmark:
        f"{RUN}/benchmarks/figures/figure1.tsv"
    params:
        **stage(
            "postdiff.figures:figure1",
            **{k: BOOT[k] for k in ("B", "seed", "level")},
        ),
    conda:
        ENV
    script:
        STAGE


rule figure2:
    input:
        evals=[f"{RUN}/eval/test/{v}.parquet" for v in ABLATION],
        sweep=rules.sweep_summary.output.summary,
    output:
        **figure_outputs("figure2", "figure2.rst"),
    log:
        f"{RUN}/logs/figures/figure2.log",
    benchmark:
        f"{RUN}/benchmarks/figures/figure2.tsv"
    params:
        **stage(
            "postdiff.figures:figure2",
            **{k: BOOT[k] for k in ("B", "seed", "level")},
        ),
    conda:
        ENV
    script:
        STAGE


rule qualitative:
    input:
        suite=f"{RUN}/suite/test.parquet",
        evals=[f"{RUN}/eval/test/{v}.parquet" for v in QUALITATIVE],
    output:
        html=report(f"{RUN}/qualitative.html", caption="../report/qualitative.rst", category="Qualitative"),
    log:
        f"{RUN}/logs/qualitative.log",
    benchmark:
        f"{RUN}/benchmarks/qualitative.tsv"
    params:
        **stage(
            "postdiff.qualitative:qualitative",
            variants=[variant_label(v) for v in QUALITATIVE],
            per_slice=config["report"]["qualitative_per_slice"],
            seed=config["report"]["seed"],
        ),
    conda:
        ENV
    script:
        STAGE


rule pair_gap:
    input:
        pt=f"{RUN}/eval/test/PT.parquet",
        it=f"{RUN}/eval/test/IT.parquet",
        **{f"{split}_teacher": f"{RUN}/teacher/{split}.parquet" for split in SPLITS},
    output:
        gap=report(f"{RUN}/pair_gap.json", caption="../report/pair_gap.rst", category="Pair"),
    log:
        f"{RUN}/logs/pair_gap.log",
    benchmark:
        f"{RUN}/benchmarks/pair_gap.tsv"
    params:
        **stage(
            "postdiff.gap:pair_gap",
            splits=SPLITS,
        ),
    conda:
        ENV
    script:
        STAGE


REPORTED = [
    *rules.table1.output, *rules.table2.output, *rules.r2_table.output,
    *rules.figure1.output, *rules.figure2.output, *rules.qualitative.output,
    *rules.sweep_summary.output, *rules.pair_gap.output, *rules.scores_plot.output, *rules.feature_page.output,
]


rule provenance:
    input:
        # Every leaf of the run, so every job of the run is upstream; the manifest itself covers
        # every file under results/<run>/ (provenance.manifest).
        artifacts=REPORTED + TEST_EVALS + sweep_targets() + [MASK_FILES["vmask"]]
        + sweep_targets("records") + [SELECTIONS["vmask"]["records"]]
        + [f"{RUN}/variants/{v}.json" for v in VARIANTS]
        + expand(f"{RUN}/surrogate/L{{layer}}.safetensors", layer=config["layers"])
        + [f"{RUN}/suite/{split}.parquet" for split in SPLITS]
        + [f"{RUN}/teacher/{split}.parquet" for split in SPLITS],
        pair=PAIR_INFO,
    output:
        config=f"{RUN}/provenance/config.json",
        run_id=f"{RUN}/provenance/run_id.json",
        manifest=f"{RUN}/provenance/manifest.parquet",
        runtimes=report(f"{RUN}/provenance/runtimes.csv", caption="../report/runtimes.rst", category="Reproducibility"),
    log:
        f"{RUN}/logs/provenance.log",
    benchmark:
        f"{RUN}/benchmarks/provenance.tsv"
    params:
        **stage(
            "postdiff.provenance:record",
            config=config,
            code_hash=package_hash(),
            run_dir=lambda wildcards, output: str(Path(output.run_id).parents[1]),  # results/<run>
            benchmark_root=f"{RUN}/benchmarks",
        ),
    conda:
        ENV
    script:
        STAGE
