"""End-to-end: the real workflow on config/tiny.yaml in a temporary copy of the repository."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml
from safetensors import safe_open
from workflow_utils import TINY, copy_workflow, planned_jobs, planned_outputs, snakemake

pytestmark = pytest.mark.slow
RUN = "results/tiny"
SEED0 = f"{RUN}/seed0"
PAIR_RULES = {"tokenizer", "train_pt", "train_it"}
SELECTION_RULES = {"score_features", "select_cap", "select_vmask", "baseline_masks", "sweep_summary"}
TEST_SPLIT = re.compile(r"/(suite|teacher)/test\.parquet$|/cache/test/|/eval/test/")


def _write_config(workdir: Path, name: str, **changes: dict) -> str:
    cfg = yaml.safe_load((workdir / TINY).read_text())
    for section, values in changes.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    (workdir / "config" / name).write_text(yaml.safe_dump(cfg, sort_keys=False))
    return f"config/{name}"


def _sweep_target(cutoff: float, exclusion: float = 1.0) -> str:
    return f"{SEED0}/sweep/verb_exclusion={exclusion}/cap_cutoff={cutoff}/cap_mask.json"


def test_dry_run_shows_the_dag(tmp_path: Path) -> None:
    jobs = planned_jobs(copy_workflow(tmp_path))
    assert {"suite", "teacher", "cache_shard", "train_surrogate", "select_cap", "table1", "provenance"} <= set(jobs)
    assert jobs["teacher"] == 4 and jobs["cache_shard"] == 4


@pytest.mark.parametrize(
    ("change", "named"),
    [({"suite": {"sed": 1}}, "sed"), ({"surrogate": {"k": "sixteen"}}, "sixteen"), ({"layers": "1"}, "layers")],
)
def test_bad_config_stops_before_any_job(tmp_path: Path, change: dict, named: str) -> None:
    workdir = copy_workflow(tmp_path)
    cfg = yaml.safe_load((workdir / TINY).read_text())
    for key, value in change.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    (workdir / "config" / "bad.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, "-n", configfile="config/bad.yaml", check=False)
    assert proc.returncode != 0
    assert named in proc.stdout + proc.stderr
    assert not (workdir / "results").exists()


def test_full_run_produces_every_artifact(tiny_run: Path) -> None:
    run = tiny_run / RUN
    for path in ["tables/table1.csv", "tables/table2.tex", "tables/claims.md", "tables/r2.md", "figures/figure1.pdf",
                 "figures/figure2.png", "qualitative.html", "sweep/summary.csv", "export/saelens/L1/sparsity.safetensors",
                 "tables/gates.csv", "gates/full_choice.json", "gates/single_L0_choice.json",
                 "export/sparsify/norm/sae.safetensors"]:
        assert (run / "seed0" / path).stat().st_size > 0, path
    for path in ["pair_gap.json", "tables/seeds.csv", "figures/seeds.png", "tables/mask_stability.csv", "features.html",
                 "provenance/manifest.parquet", "provenance/runtimes.csv", "provenance/run_id.json"]:
        assert (run / path).stat().st_size > 0, path
    table1 = pl.read_csv(run / "seed0/tables/table1.csv")
    assert table1["Variant"].to_list()[:3] == ["PT", "IT", "FullDelta"]
    assert "FullDelta - VMask" in table1["Variant"].to_list()
    assert table1.filter(pl.col("Variant") == "IT")["KL"].item() == 0.0
    manifest = pl.read_parquet(run / "provenance/manifest.parquet")
    assert manifest["sha256"].str.len_chars().unique().to_list() == [64]
    # Every file of the run but provenance/ and logs/ (and this job's own, later, benchmark).
    on_disk = {str(p.relative_to(tiny_run)) for p in run.rglob("*") if p.is_file()
               and p.relative_to(run).parts[0] not in ("provenance", "logs") and p.name != ".snakemake_timestamp"}
    assert set(manifest["path"]) == on_disk - {f"{RUN}/benchmarks/provenance.tsv"}
    kinds = dict(zip(manifest["path"], manifest["kind"]))
    assert all((kind == "benchmark") == ("/benchmarks/" in path) for path, kind in kinds.items())
    for part in ["cache/train/shard0.safetensors", "seed0/gates/full.json", "gates/mean.json",
                 "seed0/selection/scores.parquet", "seed0/selection/vmask_steps.parquet", "eval/test/PT.parquet",
                 "seed0/eval/test/FullDelta.parquet", "pair/pt/config.json"]:
        assert f"{RUN}/{part}" in kinds, part
    log = (run / "logs/pair_gap.log").read_text()
    assert "PT-to-IT gap" in log


def test_feature_cards_cover_every_selected_feature(tiny_run: Path) -> None:
    run = tiny_run / SEED0
    cards = pl.read_parquet(run / "features/cards.parquet")
    masked = set()
    for path in [run / "selection/vmask.json", *run.glob("sweep/*/*/cap_mask.json")]:
        masked |= {(int(layer), j) for layer, features in json.loads(path.read_text())["mask"].items() for j in features}
    keys = set(cards.select("layer", "feature").iter_rows())
    assert masked <= keys and cards.height > 0
    assert cards.filter(pl.col("reasons").list.contains("top cap_score")).height == 3  # tiny.yaml's features.top_n
    activity = pl.read_parquet(run / "features/activity.parquet")
    assert activity.height == 2 * cards.height and activity["frequency"].is_between(0, 1).all()
    steering = pl.read_parquet(run / "features/steering.parquet")
    fired = activity.filter((pl.col("split") == "selector") & (pl.col("n_active") > 0)).height
    assert steering.height == 2 * (fired + 1)  # n_prompts per firing card, plus PT's own
    layer_lens = pl.read_parquet(run / "features/layer_lens.parquet")
    assert set(layer_lens["vector"]) == {"delta_mean", "b_dec"}
    assert (tiny_run / RUN / "features.html").read_text().count('class="card"') == cards.height


def test_second_run_does_nothing(tiny_run: Path) -> None:
    assert planned_jobs(tiny_run) == {}


def test_suite_seed_reruns_only_what_depends_on_it(tiny_run: Path) -> None:
    config = _write_config(tiny_run, "seed1.yaml", suite={"seed": 1})
    jobs = planned_jobs(tiny_run, configfile=config)
    assert {"suite", "split", "teacher", "cache_shard", "table1"} <= set(jobs)
    assert not PAIR_RULES & set(jobs), f"the pair does not depend on the suite seed: {jobs}"


def test_adding_a_seed_runs_that_seed_and_the_aggregates(tiny_run: Path, tmp_path: Path) -> None:
    """A second surrogate seed adds its own jobs, the across-seed aggregates and provenance, and
    nothing else; the across-seed table reads both seeds' Table 1, and the mask stability table,
    run here, both seeds' masks. (Building the across-seed table would evaluate all of seed 1's
    variants, most of this test's minutes; its stage is checked on two tables in
    tests/test_seeds.py, and the tiny run checks every other stage.)"""
    workdir = tmp_path / "seeds"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    config = _write_config(workdir, "seeds.yaml", surrogate={"seeds": [0, 1]})
    planned = planned_outputs(workdir, configfile=config)
    aggregates = {"seed_table", "seed_figure", "mask_stability", "feature_page", "provenance"}
    assert aggregates <= {rule for rule, _ in planned}
    seed_jobs = [(rule, outs) for rule, outs in planned if rule not in aggregates]
    stray = [(rule, out) for rule, outs in seed_jobs for out in outs if not out.startswith(f"{RUN}/seed1/")]
    assert not stray, f"adding seed 1 reruns jobs outside results/tiny/seed1/: {stray}"
    assert {"train_surrogate", "gates_full", "evaluate", "select_cap", "table1"} <= {rule for rule, _ in seed_jobs}
    dry = snakemake(workdir, f"{RUN}/tables/seeds.csv", "-n", configfile=config).stdout
    seed_table = re.search(r"^rule seed_table:\n    input: (.*)$", dry, re.M)
    assert seed_table and seed_table[1].split(", ") == [f"{RUN}/seed{s}/tables/table1.csv" for s in (0, 1)], dry[-2000:]

    snakemake(workdir, f"{RUN}/tables/mask_stability.parquet", configfile=config)
    assert not (workdir / RUN / "seed1/tables/table1.csv").exists(), "the stability table needs no evaluation"
    stability = pl.read_parquet(workdir / RUN / "tables/mask_stability.parquet")
    for s in (0, 1):
        vmask = json.loads((workdir / RUN / f"seed{s}/selection/vmask.json").read_text())["mask"]
        rows = stability.filter((pl.col("seed") == s) & (pl.col("mask") == "VMask"))
        assert rows.height == sum(len(f) for f in vmask.values())
        assert ((rows["best_in_dictionary_cos"] >= rows["best_in_mask_cos"].fill_nan(0)) | rows["best_in_mask_cos"].is_nan()).all()


def test_selection_never_reads_the_test_split(tiny_run: Path) -> None:
    """Walk every input of the scoring, selection and sweep jobs back to the sources."""
    proc = snakemake(tiny_run, "--detailed-summary")
    inputs: dict[str, list[str]] = {}
    rule_of: dict[str, str] = {}
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    header = rows[0]
    for row in rows[1:]:
        rec = dict(zip(header, row))
        rule_of[rec["output_file"]] = rec["rule"]
        inputs[rec["output_file"]] = [p for p in rec.get("input-file(s)", "").split(",") if p and p != "-"]
    roots = [out for out, rule in rule_of.items() if rule in SELECTION_RULES]
    assert roots, "no selection outputs in the summary"
    seen, stack = set(), list(roots)
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        assert not TEST_SPLIT.search(path), f"{path} is upstream of selection"
        stack.extend(inputs.get(path, []))
    assert any(p.endswith("suite/selector.parquet") for p in seen)


def test_sweep_targets_rerun_only_themselves(tiny_run: Path) -> None:
    cfg = yaml.safe_load((tiny_run / TINY).read_text())
    locked, grid = cfg["selection"]["cap_cutoff"], cfg["sweep"]["cap_cutoffs"]
    other = next(c for c in grid if c != locked)
    assert planned_jobs(tiny_run, _sweep_target(other)) == {}

    (tiny_run / _sweep_target(other)).unlink()
    assert planned_jobs(tiny_run, _sweep_target(other)) == {"select_cap": 1}
    snakemake(tiny_run, _sweep_target(other))

    new = [*grid, 0.25, 2.5]
    config = _write_config(tiny_run, "grid.yaml", sweep={"cap_cutoffs": new})
    targets = [_sweep_target(c) for c in new]
    assert planned_jobs(tiny_run, *targets, configfile=config) == {"select_cap": 2}


def test_report_is_one_html_file(tiny_run: Path) -> None:
    snakemake(tiny_run, "--report", "report.html")
    html = (tiny_run / "report.html").read_text(errors="replace")
    assert "table1" in html and "figure1" in html and "pair_gap.json" in html
    assert "with 95% bootstrap intervals" in html and "{{" not in html.split("with 95% bootstrap")[0][-200:]
    assert "claims.csv" in html and "its 95% percentile interval" in html


def _edited_copy(tiny_run: Path, dest: Path, module: str) -> Path:
    """A copy of the finished tiny run whose src/postdiff/<module> has one more line."""
    shutil.copytree(tiny_run, dest, symlinks=True)
    with open(dest / "src" / "postdiff" / module, "a") as fh:
        fh.write("\n# an edit\n")
    return dest


MODEL_RULES = PAIR_RULES | {"pair_info", "teacher", "cache_shard", "train_surrogate", "surrogate_metrics",
                            "gates_full", "gates_single", "gates_mean", "evaluate", "score_features",
                            "select_cap", "select_vmask"}


def test_editing_tables_reruns_the_tables_and_what_reads_them(tiny_run: Path, tmp_path: Path) -> None:
    workdir = _edited_copy(tiny_run, tmp_path / "run", "stats/tables.py")
    jobs = planned_jobs(workdir)
    # The claims table writes with Table 2's writer; the across-seed table reads Table 1, and its figure reads it;
    # the gates' table is written there too. A stage that draws a plot of its own (the surrogate's curve) does
    # not import the tables (postdiff.stats.canvas), so no model job reruns.
    assert jobs == {"table1": 1, "table2": 1, "claims": 1, "r2_table": 1, "gate_table": 1, "seed_table": 1,
                    "seed_figure": 1, "provenance": 1, "all": 1}
    assert not MODEL_RULES & set(jobs)


def test_editing_surrogate_reruns_its_importers_and_their_downstream(tiny_run: Path, tmp_path: Path) -> None:
    everything = planned_jobs(copy_workflow(tmp_path))  # a dry run from scratch: every job
    workdir = _edited_copy(tiny_run, tmp_path / "run", "method/surrogate.py")
    jobs = planned_jobs(workdir)
    # Entry modules that import postdiff.method.surrogate, directly or through another module.
    importers = {"train_surrogate", "surrogate_metrics", "gates_full", "gates_single", "gates_mean",
                 "evaluate", "score_features", "select_cap", "select_vmask", "feature_data", "export_saelens",
                 "export_sparsify"}
    # IT's records are its teacher completions (postdiff.method.records): they import no surrogate either.
    untouched = PAIR_RULES | {"pair_info", "suite", "split", "teacher", "cache_shard", "standardiser", "evaluate_teacher"}
    assert {rule: jobs.get(rule) for rule in importers} == {rule: everything[rule] for rule in importers}
    # The PT and IT specs read no surrogate; every other spec does.
    expected = {rule: n for rule, n in everything.items() if rule not in untouched}
    assert jobs == {**expected, "variant_spec": everything["variant_spec"] - 2}


def test_plot_only_params_rerun_only_the_plot(tiny_run: Path) -> None:
    config = _write_config(tiny_run, "top_n.yaml", scoring={"top_n": 3})
    # provenance records the resolved config, so it reruns too
    assert planned_jobs(tiny_run, configfile=config) == {"scores_plot": 1, "provenance": 1, "all": 1}


def test_feature_cards_feed_nothing_upstream(tiny_run: Path) -> None:
    config = _write_config(tiny_run, "cards.yaml", features={"top_n": 1})
    assert planned_jobs(tiny_run, configfile=config) == {"feature_data": 1, "feature_page": 1, "provenance": 1, "all": 1}


def test_thresholds_have_one_form_in_paths(tiny_run: Path) -> None:
    """`1` and `1.0` name one selection, and the README's sweep target works as printed."""
    config = _write_config(tiny_run, "ints.yaml", selection={"cap_cutoff": 1.0, "verb_exclusion": 1},
                           sweep={"cap_cutoffs": [0.5, 1], "strict_verb_exclusion": 0})
    assert planned_jobs(tiny_run, _sweep_target(1.0), _sweep_target(0.5), _sweep_target(1.0, 0.0),
                        configfile=config) == {}
    jobs = planned_jobs(tiny_run, "--forceall", configfile=config)
    assert jobs["select_cap"] == 3  # cutoffs 0.5 and 1.0, and the strict exclusion


def test_readme_sweep_target_runs_as_printed(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    target = re.search(r"^snakemake (results/default/seed\d+/sweep/\S+cap_mask\.json)", readme, re.M)[1]
    # One of the default grid's own targets, so it reruns only what is stale.
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "config/config.yaml").read_text())
    grid = {f"results/default/seed0/sweep/verb_exclusion={float(cfg['selection']['verb_exclusion'])}/"
            f"cap_cutoff={float(c)}/cap_mask.json" for c in cfg["sweep"]["cap_cutoffs"]}
    assert target in grid, (target, grid)
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, target, "-n", configfile="config/config.yaml")
    assert "select_cap" in proc.stdout


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"bootstrap": {"comparisons": [{"a": "FullDelta", "b": "Pt", "metric": "Cap"}]}},
         "bootstrap.comparisons[0].b: 'Pt' is no variant label"),
        ({"bootstrap": {"comparisons": [{"a": "FullDelta-VMask", "b": "FullDelta", "metric": "Cap"}]}},
         "bootstrap.comparisons[0].a: 'FullDelta-VMask' is no variant label (a key; its label is 'FullDelta - VMask')"),
        ({"report": {"figure1_variants": ["PT", "IT", "Nope"]}}, "report.figure1_variants: 'Nope' is no variant key"),
        ({"report": {"qualitative_variants": ["PT", "Nope"]}}, "report.qualitative_variants: 'Nope' is no variant key"),
    ],
)
def test_unknown_variant_names_stop_the_workflow(tmp_path: Path, changes: dict, named: str) -> None:
    workdir = copy_workflow(tmp_path)
    config = _write_config(workdir, "names.yaml", **changes)
    proc = snakemake(workdir, "-n", configfile=config, check=False)
    assert proc.returncode != 0
    assert named in proc.stdout + proc.stderr


def test_same_config_gives_identical_tables(tiny_run: Path, tmp_path: Path) -> None:
    """Retraining the surrogates gives the same bytes: the surrogates, the R^2 table, the gates
    and FullDelta's test records, everything downstream of them reads only those. (In a copy,
    so the shared run stays complete for the other tests.)"""
    workdir = tmp_path / "again"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    outputs = [f"{SEED0}/surrogate/L0.safetensors", f"{SEED0}/surrogate/L1.safetensors", f"{SEED0}/tables/r2.csv",
               f"{SEED0}/gates/full.json", f"{SEED0}/eval/test/FullDelta.parquet"]
    def contents(path: str) -> object:
        # safetensors writes its metadata map in hash order, which changes from process to
        # process: a surrogate is compared by its tensors' bytes and its metadata's entries.
        if not path.endswith(".safetensors"):
            return (workdir / path).read_bytes()
        with safe_open(workdir / path, "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}

    before = {p: contents(p) for p in outputs}
    mtimes = {p: (workdir / p).stat().st_mtime_ns for p in outputs}
    # Deleting an intermediate is not enough: Snakemake leaves it missing while everything after
    # it is up to date. Forcing the surrogates reruns them and what the targets need after them.
    snakemake(workdir, *outputs[2:], "--forcerun", "train_surrogate")
    assert all((workdir / p).stat().st_mtime_ns > t for p, t in mtimes.items()), "the outputs did not run again"
    assert {p: contents(p) for p in outputs} == before


def test_gemma_config_dry_runs_without_a_download(tmp_path: Path) -> None:
    jobs = planned_jobs(copy_workflow(tmp_path), configfile="config/gemma3-4b.yaml")
    assert "train_pt" not in jobs, "a hub pair must not train the embedded one"
    # One job per split and per variant (n_shards 1: no merge jobs); IT's rows are copied by a
    # local job per split.
    assert jobs["cache_shard"] == 4 and "merge_eval" not in jobs and jobs["evaluate_teacher"] == 2
    assert not (tmp_path / "results").exists()


def test_sharded_evaluation_equals_one_job(tiny_run: Path, tmp_path: Path) -> None:
    """With `evaluate.n_shards: 2` a variant's split runs as two jobs and a merge; the merged
    records are the one job's (the tiny run evaluates each variant and split in one job)."""
    workdir = tmp_path / "sharded"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    target = workdir / SEED0 / "eval/test/FullDelta.parquet"
    one_job = pl.read_parquet(target)
    target.unlink()
    config = _write_config(workdir, "sharded.yaml", evaluate={"n_shards": 2})
    assert planned_jobs(workdir, str(target.relative_to(workdir)), configfile=config) == {"evaluate": 2, "merge_eval": 1}
    snakemake(workdir, str(target.relative_to(workdir)), configfile=config)
    sharded = pl.read_parquet(target)
    assert sharded.drop("kl").equals(one_job.drop("kl"))
    # A shard's prompts are padded into other batches than the one job's, which moves float32
    # sums in the last bits: every generated token agrees exactly, the KL to rounding (1.3e-5
    # relative measured under ATEN_CPU_CAPABILITY=avx2, as in test_evaluate's batch check).
    assert sharded["kl"].to_list() == pytest.approx(one_job["kl"].to_list(), rel=1e-4)


def test_sharded_selection_equals_one_job_and_reruns_one_shard(tiny_run: Path, tmp_path: Path) -> None:
    """With `selection.n_shards: 2` each step's candidates run as two jobs; the mask and step
    rows equal the one-job selection's, and losing one shard's job redoes only that shard and
    what never ran after it."""
    workdir = tmp_path / "sharded"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    cfg = yaml.safe_load((workdir / TINY).read_text())
    size_cap, cutoff = cfg["selection"]["size_cap"], cfg["sweep"]["cap_cutoffs"][0]
    target = workdir / _sweep_target(cutoff)
    one_job = {"mask": target.read_text(), "steps": pl.read_parquet(target.with_name("steps.parquet"))}
    target.unlink()
    config = _write_config(workdir, "sharded.yaml", selection={"n_shards": 2})
    assert planned_jobs(workdir, _sweep_target(cutoff), configfile=config) == {
        "select_cap_shard": 2 * size_cap, "select_cap_step": size_cap, "select_cap": 1}
    snakemake(workdir, _sweep_target(cutoff), configfile=config)
    # The one-job run may have copied this point's selection from the locked point's identical
    # pool (selected_at names that point); sharded selections never share, so they select here.
    sharded, one = json.loads(target.read_text()), json.loads(one_job["mask"])
    assert sharded.pop("selected_at") == {"cutoff": sharded["cutoff"], "exclusion": sharded["exclusion"]}
    one.pop("selected_at")
    assert sharded == one
    assert pl.read_parquet(target.with_name("steps.parquet")).equals(one_job["steps"])

    work = target.parent / "select"
    for lost in [work / f"step{size_cap}" / "shard1.parquet", work / f"step{size_cap}.json", target]:
        lost.unlink()
    assert planned_jobs(workdir, _sweep_target(cutoff), configfile=config) == {
        "select_cap_shard": 1, "select_cap_step": 1, "select_cap": 1}
