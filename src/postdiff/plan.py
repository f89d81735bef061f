"""What a run will cost before it starts: per stage, its jobs, GPU jobs and model loads (from the
workflow's own DAG, a dry run that loads no model), and the tokens, bytes and GPU-hours that the
resolved config implies.

    python -m postdiff.plan --configfile config/gemma3-4b.yaml

Tokens: *generated* are decoding steps (one token per row per step); *forced* go through a
forward pass all at once (prompt prefill and teacher forcing, both models counted). Prefix and
answer lengths come from the run's teacher files once the teacher has run, else are assumed
(ASSUMED_PREFIX, and answers at ``max_new_tokens``: an upper bound). Variants and candidates
are counted at their ``max_new_tokens``: without IT's early stop they decode to it, nearly all. Selection and gate searches may stop early and
a selection may find fewer candidates than ``max_candidates``: their counts are upper bounds.
GPU-hours are the tokens over THROUGHPUT plus LOAD_S per model job: estimates, not measurements.
"""

from __future__ import annotations

import argparse
import io
import os
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import polars as pl

from postdiff.data.checkers import SLICES
from postdiff.data.splits import SPLITS
from postdiff.models.preflight import BUILTIN

# Estimates for one H100 in bf16 at Gemma 3 4B's size (config/gemma3-4b.yaml's header): not
# measured, no GPU was lent when they were set (issue 20). Replace them with a probe's numbers.
THROUGHPUT = {
    "generated": 2_500.0,  # tokens/s, greedy decoding at batch 64 with the KV cache
    "forced": 60_000.0,  # tokens/s through one model's forward pass
    "surrogate_rows": 34_000.0,  # rows/s of TopK surrogate training (20k steps x 1,024 rows in ~10 min)
}
LOAD_S = 30.0  # seconds to load the pair (two 4B models, ~8 GB bf16 each) from a local disk
ASSUMED_PREFIX = 40  # template + prompt tokens, the real suite on Gemma's tokenizer
# Published text widths, for a hub pair whose config is not in the local cache.
PUBLISHED_WIDTHS = {"google/gemma-3-4b-pt": 2560, "google/gemma-3-4b-it": 2560}
INDEX_BYTES = 8  # per cached position: its row and position (int32 each)


@dataclass(frozen=True)
class JobFacts:
    """One job of the DAG: its rule, the file its rule lives in (its stage) and what it asks for."""

    rule: str
    stage: str
    wildcards: Mapping[str, str]
    gpu: bool
    loads: bool  # its params carry `device`: it loads the pair (tests/test_resources.py)

    @property
    def seed(self) -> int | None:
        text = self.wildcards.get("seed") or self.wildcards.get("seeddir", "").removeprefix("seed").rstrip("/")
        return int(text) if text else None


def dag_jobs(workdir: Path, configfiles: Sequence[Path]) -> tuple[dict, list[JobFacts]]:
    """The resolved config and every job a run from scratch would run (a dry run in `workdir`)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

    # The workflow sets HF_HOME / HF_HUB_OFFLINE from its config in this process: keep ours.
    # Snakemake's own dry-run listing goes to the (discarded) stderr: the table is the output.
    with mock.patch.dict(os.environ), redirect_stderr(io.StringIO()), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(configfiles=[Path(c).resolve() for c in configfiles]),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        # As if nothing had run: the cost of the whole run, whatever is on disk.
        workflow.dag(DAGSettings(forceall=True)).execute_workflow(executor="dryrun")
        inner = workflow._workflow  # the API hands out no job list; the DAG after the dry run holds it
        # Stages in the order the Snakefile includes their rule files.
        order = {stage: i for i, stage in enumerate(dict.fromkeys(Path(r.snakefile).stem for r in inner.rules))}
        jobs = [
            JobFacts(
                rule=job.rule.name,
                stage=Path(job.rule.snakefile).stem,
                wildcards=dict(job.wildcards_dict),
                gpu=bool(dict(job.resources.items()).get("gpu", 0)),
                loads="device" in dict(job.params.items()),
            )
            for job in inner.dag.jobs
        ]
        return dict(inner.config), sorted(jobs, key=lambda j: (order[j.stage], j.rule))


@dataclass(frozen=True)
class Lengths:
    """Mean prefix and answer tokens per prompt (answers with their stop token), and where from."""

    prefix: float
    answer: float
    source: str


def split_sizes(config: Mapping, run_dir: Path) -> dict[str, int]:
    """Prompts per split: the split files once written, else `suite.sizes` per slice."""
    sizes = {}
    for split in SPLITS:
        path = run_dir / "suite" / f"{split}.parquet"
        sizes[split] = pl.read_parquet(path, columns=["id"]).height if path.is_file() else \
            int(config["suite"]["sizes"][split]) * len(SLICES)
    return sizes


def lengths(config: Mapping, run_dir: Path) -> Lengths:
    files = [run_dir / "teacher" / f"{split}.parquet" for split in SPLITS]
    if all(f.is_file() for f in files):
        rows = pl.concat([pl.read_parquet(f, columns=["prefix_ids", "token_ids"]) for f in files])
        return Lengths(float(rows["prefix_ids"].list.len().mean()), float(rows["token_ids"].list.len().mean()),
                       f"measured from {run_dir / 'teacher'}")
    return Lengths(float(ASSUMED_PREFIX), float(config["teacher"]["max_new_tokens"]),
                   f"assumed: {ASSUMED_PREFIX} prefix tokens, answers at teacher.max_new_tokens (an upper bound)")


def width(config: Mapping, workdir: Path) -> int | None:
    """The pair's hidden width, from its config alone (a local directory, or the hub id's snapshot
    in the run's Hugging Face cache; never the network); None when neither is at hand."""
    spec = config["pair"]["pt"]
    if spec == BUILTIN:
        return int(config["toy"]["hidden_size"])
    from huggingface_hub import try_to_load_from_cache

    from postdiff.models.loading import text_config

    home = config["hf"]["home"] or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    local = workdir / spec if (workdir / spec).is_dir() else None
    cached = None if local else try_to_load_from_cache(spec, "config.json", cache_dir=workdir / Path(home).expanduser() / "hub")
    folder = local or (Path(cached).parent if isinstance(cached, str) else None)
    return int(text_config(str(folder)).hidden_size) if folder else PUBLISHED_WIDTHS.get(spec)


@dataclass
class Stage:
    jobs: int = 0
    gpu_jobs: int = 0
    loads: int = 0
    generated: float = 0.0
    forced: float = 0.0
    surrogate_rows: float = 0.0
    disk_bytes: dict[str, float] = field(default_factory=dict)

    def gpu_hours(self) -> float:
        seconds = (self.generated / THROUGHPUT["generated"] + self.forced / THROUGHPUT["forced"]
                   + self.surrogate_rows / THROUGHPUT["surrogate_rows"] + self.loads * LOAD_S)
        return seconds / 3600


REFINE_PASSES = 12


def _shard_share(n: int, n_shards: int) -> float:
    return n / max(1, n_shards)


def job_work(job: JobFacts, config: Mapping, sizes: Mapping[str, int], ln: Lengths) -> tuple[float, float, float]:
    """(generated, forced, surrogate rows) of one job."""
    seq = ln.prefix + ln.answer
    sel, ev = config["selection"], config["evaluate"]
    rule, wc = job.rule, job.wildcards
    if rule == "teacher":
        n = sizes[wc["split"]]
        return n * ln.answer, n * ln.prefix, 0
    if rule == "cache_shard":
        return 0, 2 * _shard_share(sizes[wc["split"]], config["cache"]["n_shards"]) * seq, 0
    if rule == "train_surrogate":
        return 0, 0, config["surrogate"]["steps"] * config["surrogate"]["batch_size"]
    if rule == "evaluate":
        # Variants decode to their budget: they lack IT's early stop (on the tiny run all records
        # did; on the rehearsal 94% of the budget). KL is teacher-forced on IT's completions.
        n = _shard_share(sizes[wc["eval_split"]], ev["n_shards"])
        return n * ev["max_new_tokens"], n * ln.prefix + 2 * n * seq, 0
    if rule.startswith("gates_"):
        n_layers = 1 if rule == "gates_single" else len(config["layers"])
        gates = config["gates"]
        grid, rounds = len(gates["grid"]), gates["max_rounds"]
        passes = grid * (1 + (rounds * n_layers if n_layers > 1 else 0))  # the shared sweep, then rounds
        # The refinement's bounded search: about 12 KL passes per layer and round (Brent within
        # one grid step to tol 0.01), for at most max_rounds rounds.
        passes += REFINE_PASSES * n_layers * max(rounds, 1) if gates.get("refine", True) else 0
        return 0, sizes["calib"] * seq * (1 + passes), 0  # IT's reference once, then each KL pass
    if rule == "score_features":
        return 0, 2 * sizes["selector"] * seq, 0
    # Every step generates the incumbent and each remaining candidate (an upper bound: a pool
    # smaller than max_candidates, or a selection that stops, does less).
    steps = range(min(sel["size_cap"], sel["max_candidates"]))
    if rule in ("select_cap", "select_vmask") and job.gpu:
        rows = sum(sel["max_candidates"] - t + 1 for t in steps) * sizes["selector"]
        return rows * sel["max_new_tokens"], rows * ln.prefix, 0
    if rule.endswith("_shard") and rule.startswith("select_"):
        rows = (_shard_share(sel["max_candidates"], sel["n_shards"]) + 1) * sizes["selector"]
        return rows * sel["max_new_tokens"], rows * ln.prefix, 0
    return 0, 0, 0


def cache_itemsize(config: Mapping) -> int:
    """Bytes per cached number: `cache.dtype`, its "auto" resolved as the jobs do (bf16 on a
    CUDA device, fp32 on a CPU; `pair.device: auto` as on this machine)."""
    import torch

    from postdiff.models.loading import pick_dtype

    return torch.empty(0, dtype=pick_dtype(config["cache"]["dtype"], config["pair"]["device"])).element_size()


def disk_bytes(config: Mapping, sizes: Mapping[str, int], ln: Lengths, d: int | None) -> dict[str, dict[str, float]]:
    """Bytes of tensors written per stage: the caches (every split) and the surrogates."""
    if d is None:
        return {}
    per_position = len(config["layers"]) * 2 * d * cache_itemsize(config) + INDEX_BYTES
    n_features = config["surrogate"]["expansion"] * d
    per_surrogate = 4 * (3 * d + n_features + 2 * n_features * d)  # fp32 mu, sigma, b_dec; b_enc; W_enc, D
    n_surrogates = len(config["layers"]) * len(config["surrogate"]["seeds"])
    return {
        "caches": {"cache": sum(sizes.values()) * ln.answer * per_position},
        "surrogate": {"surrogate": n_surrogates * per_surrogate},
    }


def plan(config: Mapping, jobs: Sequence[JobFacts], workdir: Path) -> tuple[dict[str, Stage], Lengths, int | None]:
    """Per stage, in the order of `jobs`: counts, work and bytes of a run in `workdir`."""
    run_dir = workdir / "results" / str(config["run"])
    sizes, ln, d = split_sizes(config, run_dir), lengths(config, run_dir), width(config, workdir)
    stages: dict[str, Stage] = {}
    for job in jobs:
        stage = stages.setdefault(job.stage, Stage())
        generated, forced, rows = job_work(job, config, sizes, ln)
        stage.jobs += 1
        stage.gpu_jobs += job.gpu
        stage.loads += job.loads
        stage.generated += generated
        stage.forced += forced
        stage.surrogate_rows += rows
    for name, written in disk_bytes(config, sizes, ln, d).items():
        stages.setdefault(name, Stage()).disk_bytes.update(written)
    return stages, ln, d


def per_seed(jobs: Sequence[JobFacts], key: str) -> dict[int | None, int]:
    """Jobs with `key` true (e.g. "gpu", "loads") per seed; None holds the jobs every seed shares."""
    out: dict[int | None, int] = {}
    for job in jobs:
        out[job.seed] = out.get(job.seed, 0) + int(getattr(job, key))
    return out


def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def report(config: Mapping, jobs: Sequence[JobFacts], workdir: Path) -> str:
    stages, ln, d = plan(config, jobs, workdir)
    head = ("stage", "jobs", "gpu", "loads", "generated", "forced", "cache B", "surrogate B", "GPU-h")
    rows = [head]
    total = Stage()
    for name, s in stages.items():
        rows.append((name, str(s.jobs), str(s.gpu_jobs), str(s.loads), _fmt(s.generated), _fmt(s.forced),
                     _fmt(s.disk_bytes.get("cache", 0)), _fmt(s.disk_bytes.get("surrogate", 0)), f"{s.gpu_hours():.2f}"))
        for key in ("jobs", "gpu_jobs", "loads", "generated", "forced", "surrogate_rows"):
            setattr(total, key, getattr(total, key) + getattr(s, key))
        for key, value in s.disk_bytes.items():
            total.disk_bytes[key] = total.disk_bytes.get(key, 0) + value
    rows.append(("total", str(total.jobs), str(total.gpu_jobs), str(total.loads), _fmt(total.generated),
                 _fmt(total.forced), _fmt(total.disk_bytes.get("cache", 0)), _fmt(total.disk_bytes.get("surrogate", 0)),
                 f"{total.gpu_hours():.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    gpu, loads = per_seed(jobs, "gpu"), per_seed(jobs, "loads")
    seeds = sorted(s for s in gpu if s is not None)
    lines += [
        "",
        f"run {config['run']}: shared by every seed {gpu.get(None, 0)} GPU jobs / {loads.get(None, 0)} model loads; "
        + "; ".join(f"seed {s} {gpu[s]} / {loads[s]}" for s in seeds),
        f"lengths: prefix {ln.prefix:.1f}, answer {ln.answer:.1f} tokens per prompt ({ln.source})",
        f"width: {d if d is not None else 'unknown (the pair config is not in the local cache)'}",
        "assumptions (estimates for one H100 in bf16 at 4B size, not measured): "
        + ", ".join(f"{k} {v:,.0f}/s" for k, v in THROUGHPUT.items()) + f", {LOAD_S:.0f} s per model load",
        "generated/forced count decoding steps x rows / tokens in forward passes of both models; "
        "selection and gate searches are upper bounds (they may stop early)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m postdiff.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", nargs="+", type=Path, default=[], help="as for snakemake (merged over config/config.yaml)")
    parser.add_argument("--directory", type=Path, default=Path.cwd(), help="the workflow's directory (default: here)")
    args = parser.parse_args(argv)
    workdir = args.directory.resolve()
    config, jobs = dag_jobs(workdir, args.configfile)
    print(report(config, jobs, workdir))


if __name__ == "__main__":
    main()
