# Per seed: Tables 1-2, the paper's claims as checks, Figures 1-2, the qualitative page and the
# R^2 table. Across seeds: every seed's Table 1 side by side and the stability of the masks. Once
# per run: the pair's gap and the reproducibility records.

BOOT = config["bootstrap"]
TEST_EVALS = [eval_file("test", v) for v in VARIANTS]
ABLATION = ["FullDelta"] + [v for v in VARIANTS if v.startswith("OneLayer-")]
QUALITATIVE = config["report"]["qualitative_variants"]


rule table1:
    input:
        evals=TEST_EVALS,
    output:
        **table_outputs("table1", "table1.rst"),
    log:
        f"{RUN}/logs/seed{{seed}}/tables/table1.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/tables/table1.tsv"
    params:
        **stage(
            "postdiff.stats.tables:table1",
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
        f"{RUN}/logs/seed{{seed}}/tables/table2.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/tables/table2.tsv"
    params:
        **stage(
            "postdiff.stats.tables:table2",
            pt=variant_label("PT"),
            it=variant_label("IT"),
            **BOOT,
        ),
    conda:
        ENV
    script:
        STAGE


# The variants the paper's claims compare, by role (postdiff.outputs.claims); a claim whose variant
# this config lacks (no one-layer ablation, say) is left out. "Late" is the deepest layer.
CLAIM_ROLES = dict(pt="PT", full="FullDelta", cap="CapMask", vmask="FullDelta-VMask", late=f"OneLayer-L{max(config['layers'])}")
CLAIM_VARIANTS = {role: name for role, name in CLAIM_ROLES.items() if name in VARIANTS}


rule claims:
    input:
        evals=[eval_file("test", v) for v in CLAIM_VARIANTS.values()],
        cap_mask=MASK_FILES["cap"],
        vmask=MASK_FILES["vmask"],
        sweep=rules.sweep_summary.output.summary,
    output:
        **table_outputs("claims", "claims.rst"),
    log:
        f"{RUN}/logs/seed{{seed}}/tables/claims.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/tables/claims.tsv"
    params:
        **stage(
            "postdiff.outputs.claims:claims",
            variants={role: variant_label(name) for role, name in CLAIM_VARIANTS.items()},
            **{k: BOOT[k] for k in ("B", "seed", "level")},
        ),
    conda:
        ENV
    script:
        STAGE


# On a planted pair (config/control.yaml), how far each mask's features sit on the planted neurons,
# and whether they fire where those neurons do (test split).
PLANTED_MASKS = {"CapMask": MASK_FILES["cap"], "VMask": MASK_FILES["vmask"], "RandomMask": MASK_FILES["random"],
                 "ActivationMassMask": MASK_FILES["mass"], "ScoreMask": MASK_FILES["score"]}


rule planted_alignment:
    input:
        it=model_spec("it"),
        surrogates=expand(f"{SEED}/surrogate/L{{layer}}.safetensors", layer=config["layers"], allow_missing=True),
        shards=cache_shards("test"),
        masks=list(PLANTED_MASKS.values()),
    output:
        parquet=f"{SEED}/tables/planted.parquet",
        csv=report(f"{SEED}/tables/planted.csv", caption="../report/planted.rst", category="Tables", subcategory="seed {seed}"),
    log:
        f"{RUN}/logs/seed{{seed}}/tables/planted.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/tables/planted.tsv"
    params:
        **stage("postdiff.outputs.planted:planted_table", layers=config["layers"], masks=list(PLANTED_MASKS)),
    conda:
        ENV
    script:
        STAGE


# On a planted pair, where each planted neuron fires in IT's own answers (selector split).
rule plant_activity:
    input:
        split=f"{RUN}/suite/selector.parquet",
        teacher=f"{RUN}/teacher/selector.parquet",
        **model_inputs(),
    output:
        parquet=f"{RUN}/tables/plant_activity.parquet",
        csv=report(f"{RUN}/tables/plant_activity.csv", caption="../report/plant_activity.rst", category="Tables"),
    log:
        f"{RUN}/logs/tables/plant_activity.log",
    benchmark:
        f"{RUN}/benchmarks/tables/plant_activity.tsv"
    threads: config["threads"]
    retries: RETRIES
    resources:
        **gpu_resources("plant_activity"),
    params:
        **stage("postdiff.outputs.plant_activity:plant_activity", **model_params(), batch_size=EVAL["batch_size"]),
    conda:
        ENV
    script:
        STAGE


rule r2_table:
    input:
        metrics=expand(f"{SEED}/surrogate/L{{layer}}_metrics.parquet", layer=config["layers"], allow_missing=True),
    output:
        **table_outputs("r2", "r2.rst"),
    log:
        f"{RUN}/logs/seed{{seed}}/tables/r2.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/tables/r2.tsv"
    params:
        **stage("postdiff.stats.tables:r2_table"),
    conda:
        ENV
    script:
        STAGE


rule figure1:
    input:
        evals=[eval_file("test", v) for v in config["report"]["figure1_variants"]],
    output:
        **figure_outputs("figure1", "figure1.rst"),
    log:
        f"{RUN}/logs/seed{{seed}}/figures/figure1.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/figures/figure1.tsv"
    params:
        **stage(
            "postdiff.stats.figures:figure1",
            **{k: BOOT[k] for k in ("B", "seed", "level")},
        ),
    conda:
        ENV
    script:
        STAGE


rule figure2:
    input:
        evals=[eval_file("test", v) for v in ABLATION],
        sweep=rules.sweep_summary.output.summary,
    output:
        **figure_outputs("figure2", "figure2.rst"),
    log:
        f"{RUN}/logs/seed{{seed}}/figures/figure2.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/figures/figure2.tsv"
    params:
        **stage(
            "postdiff.stats.figures:figure2",
            **{k: BOOT[k] for k in ("B", "seed", "level")},
        ),
    conda:
        ENV
    script:
        STAGE


rule qualitative:
    input:
        suite=f"{RUN}/suite/test.parquet",
        evals=[eval_file("test", v) for v in QUALITATIVE],
    output:
        html=report(f"{SEED}/qualitative.html", caption="../report/qualitative.rst", category="Qualitative",
                    subcategory="seed {seed}"),
    log:
        f"{RUN}/logs/seed{{seed}}/qualitative.log",
    benchmark:
        f"{RUN}/benchmarks/seed{{seed}}/qualitative.tsv"
    params:
        **stage(
            "postdiff.outputs.qualitative:qualitative",
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
        pt=eval_file("test", "PT"),
        it=eval_file("test", "IT"),
        **{f"{split}_teacher": f"{RUN}/teacher/{split}.parquet" for split in SPLITS},
    output:
        gap=report(f"{RUN}/pair_gap.json", caption="../report/pair_gap.rst", category="Pair"),
    log:
        f"{RUN}/logs/pair_gap.log",
    benchmark:
        f"{RUN}/benchmarks/pair_gap.tsv"
    params:
        **stage(
            "postdiff.stats.gap:pair_gap",
            splits=SPLITS,
        ),
    conda:
        ENV
    script:
        STAGE


rule seed_table:
    input:
        tables=expand(rules.table1.output.csv, seed=SEEDS),
    output:
        **table_outputs("seeds", "seeds.rst", root=RUN),
        parquet=f"{RUN}/tables/seeds.parquet",
    log:
        f"{RUN}/logs/tables/seeds.log",
    benchmark:
        f"{RUN}/benchmarks/tables/seeds.tsv"
    params:
        **stage("postdiff.stats.seeds:seed_table", seeds=SEEDS),
    conda:
        ENV
    script:
        STAGE


rule seed_figure:
    input:
        table=rules.seed_table.output.parquet,
    output:
        **figure_outputs("seeds", "seeds_figure.rst", root=RUN),
    log:
        f"{RUN}/logs/figures/seeds.log",
    benchmark:
        f"{RUN}/benchmarks/figures/seeds.tsv"
    params:
        **stage("postdiff.stats.figures:seed_figure"),
    conda:
        ENV
    script:
        STAGE


# The masks whose stability across seeds is reported, by their Table 1 names.
STABLE_MASKS = {"CapMask": MASK_FILES["cap"], "VMask": MASK_FILES["vmask"]}


rule mask_stability:
    input:
        # Seed-major, then layer (modules) or mask (masks): the order the stage reads them in.
        modules=[f"{SEED}/surrogate/L{layer}.safetensors".format(seed=s) for s in SEEDS for layer in config["layers"]],
        masks=[path.format(seed=s) for s in SEEDS for path in STABLE_MASKS.values()],
    output:
        parquet=f"{RUN}/tables/mask_stability.parquet",
        csv=report(f"{RUN}/tables/mask_stability.csv", caption="../report/mask_stability.rst", category="Tables"),
    log:
        f"{RUN}/logs/tables/mask_stability.log",
    benchmark:
        f"{RUN}/benchmarks/tables/mask_stability.tsv"
    params:
        **stage("postdiff.outputs.stability:stability", seeds=SEEDS, layers=config["layers"], mask_names=list(STABLE_MASKS)),
    conda:
        ENV
    script:
        STAGE


PER_SEED_REPORTED = [
    *rules.table1.output, *rules.table2.output, *rules.claims.output, *rules.r2_table.output,
    *rules.figure1.output, *rules.figure2.output, *rules.qualitative.output,
    *rules.sweep_summary.output, *rules.scores_plot.output, *rules.gate_table.output,
    *(rules.planted_alignment.output if PLANTED else []),
]
REPORTED = [
    *expand(PER_SEED_REPORTED, seed=SEEDS), *rules.pair_gap.output,
    *rules.seed_table.output, *rules.seed_figure.output, *rules.mask_stability.output,
    *rules.feature_page.output, *(rules.plant_activity.output if PLANTED else []),
]
# Each seed's leaves: with the reported files, every job of the seed is upstream of provenance.
SEED_LEAVES = [
    *TEST_EVALS, *sweep_targets(), MASK_FILES["vmask"], *sweep_targets("records"), SELECTIONS["vmask"]["records"],
    *[f"{RUN}/{variant_dir(v)}variants/{v}.json" for v in VARIANTS],
    *expand(f"{SEED}/surrogate/L{{layer}}.safetensors", layer=config["layers"], allow_missing=True),
]


rule provenance:
    input:
        # Every leaf of the run, so every job of the run is upstream; the manifest itself covers
        # every file under results/<run>/ (provenance.manifest).
        artifacts=REPORTED + sorted(set(expand(SEED_LEAVES, seed=SEEDS))) + EXPORT_FILES + PUBLISH_FILES
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
            "postdiff.outputs.provenance:record",
            config=config,
            code_hash=package_hash(),
            run_dir=lambda wildcards, output: str(Path(output.run_id).parents[1]),  # results/<run>
            benchmark_root=f"{RUN}/benchmarks",
        ),
    conda:
        ENV
    script:
        STAGE
