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
GPU-hours are the tokens over :class:`Estimates`' throughputs plus a model-load time per model
job, as a low-high band: estimates, not measurements. With ``selection.verify`` a selection
generates only the candidates that verification does not settle; that share is measured
(:func:`verified_share`, from ``bench/selection.py``'s results), not estimated. The same figures,
less that share (a selection asks for the time of generating every candidate, which a
verification that settles nothing could need), set each model job's ``runtime`` request (its
high estimate times ``resources.runtime_margin``; common.smk), and the preview prints what the
DAG asks per rule. SLURM submissions are counted with the profile's job groups (``groups``,
``group-components``, ``resources``) and without, with what each group asks. It also names each
SLURM site setting that is unset or still a ``SET_ME`` placeholder. Nothing here imports torch
or transformers: it runs on a login node.
"""

from __future__ import annotations

import argparse
import io
import json
import math
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
from postdiff.workflow.config import group_problems

# Estimates for one H100 in bf16 at Gemma 3 4B's size (config/gemma3-4b.yaml's header): not
# measured, no GPU was lent when they were set (issues 20, 27). Each is a (low, high) range;
# `--estimates FILE` replaces any of them (README, "The cost of a run").
LOW, HIGH = 0, 1


@dataclass(frozen=True)
class Estimates:
    """Throughputs in tokens or rows per second and ``load_s`` in seconds per model job, each a
    (low, high) range. A job's time is high with the low throughputs and the high load time."""

    # Greedy decoding with the KV cache, by batch size: a step's latency barely grows with the
    # batch at this size, so the rate does (interpolated between sizes, held beyond the ends).
    generated: Mapping[int, tuple[float, float]] = field(default_factory=lambda: {
        8: (300.0, 450.0), 16: (600.0, 900.0), 32: (1_000.0, 1_600.0), 64: (1_800.0, 2_500.0),
        128: (3_000.0, 4_500.0)})
    forced: tuple[float, float] = (40_000.0, 60_000.0)  # through one model's forward pass
    surrogate_rows: tuple[float, float] = (25_000.0, 34_000.0)  # TopK training, 1,024-row batches
    # Imports, CUDA start-up and both 4B models (~8.6 GB each in bf16) from a shared filesystem.
    load_s: tuple[float, float] = (60.0, 120.0)

    def rate(self, batch: int, bound: int) -> float:
        """Generated tokens/s at ``batch``; ``bound`` LOW or HIGH."""
        sizes = sorted(self.generated)
        lo = max([b for b in sizes if b <= batch], default=sizes[0])
        hi = min([b for b in sizes if b >= batch], default=sizes[-1])
        if lo == hi:
            return self.generated[lo][bound]
        t = (batch - lo) / (hi - lo)
        return (1 - t) * self.generated[lo][bound] + t * self.generated[hi][bound]

    def line(self) -> str:
        gen = ", ".join(f"{b}: {lo:,.0f}-{hi:,.0f}" for b, (lo, hi) in sorted(self.generated.items()))
        return (f"generated tokens/s by batch size {{{gen}}}, forced {self.forced[0]:,.0f}-{self.forced[1]:,.0f}/s, "
                f"surrogate rows {self.surrogate_rows[0]:,.0f}-{self.surrogate_rows[1]:,.0f}/s, "
                f"{self.load_s[0]:.0f}-{self.load_s[1]:.0f} s per model load")


def read_estimates(path: Path | None) -> Estimates:
    """The default estimates, with each figure that the YAML file at ``path`` gives instead."""
    if path is None:
        return Estimates()
    import yaml

    given = yaml.safe_load(path.read_text()) or {}
    unknown = set(given) - {"generated", "forced", "surrogate_rows", "load_s"}
    if unknown:
        raise ValueError(f"{path}: unknown estimates {sorted(unknown)}")
    figures: dict = {k: tuple(float(x) for x in v) for k, v in given.items() if k != "generated"}
    if "generated" in given:
        figures["generated"] = {int(b): tuple(float(x) for x in v) for b, v in given["generated"].items()}
    return Estimates(**figures)


# bench/selection.py's results (bench/results/README.md): the share of candidate rows verified.
VERIFY_RESULTS = "bench/results/selection_verify*.json"


@dataclass(frozen=True)
class VerifiedShare:
    """The share of candidate rows that verification settles without generating them, and its source."""

    share: float
    source: str


def verified_share(workdir: Path, margin: float) -> VerifiedShare | None:
    """Candidate rows verified over all candidate rows in the benchmark results measured at
    ``margin`` (``selection.verify_margin``: it decides the share), every step and batch size
    pooled; None when no result was measured at that margin."""
    rows, verified, sources = 0.0, 0.0, []
    for path in sorted(workdir.glob(VERIFY_RESULTS)):
        result = json.loads(path.read_text())
        if not math.isclose(float(result.get("verify_margin", math.nan)), margin):
            continue
        steps = [step for by_step in result["verify_vs_plain"].values() for step in by_step.values()]
        rows += sum(step["candidate_rows"] for step in steps)
        verified += sum(step["share_verified"] * step["candidate_rows"] for step in steps)
        sources.append(f"{path.relative_to(workdir)} ({result['run']} seed {result['seed']}, {result['device']}, "
                       f"torch {result['torch']})")
    return VerifiedShare(verified / rows, "measured: " + "; ".join(sources)) if rows else None


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
    runtime: int | None = None  # minutes it asks for at its first attempt
    submitted: bool = True  # on a cluster it is a submitted job (not a localrule)
    group: str | None = None  # the group job it is submitted in, with the profile's groups

    @property
    def seed(self) -> int | None:
        text = self.wildcards.get("seed") or self.wildcards.get("seeddir", "").removeprefix("seed").rstrip("/")
        return int(text) if text else None


def requests_gpu(resources: Mapping) -> bool:
    """A job asks SLURM for a GPU by ``gpu`` (--gpus) or by ``gres`` (--gres=gpu:...):
    ``resources.gpu_flag`` picks one (postdiff.workflow.config.gpu_request)."""
    return bool(resources.get("gpu", 0)) or str(resources.get("gres", "")).startswith("gpu")


@dataclass(frozen=True)
class Grouping:
    """A profile's job groups: rule -> group id (``groups``), group id -> how many unconnected
    parts it may join (``group-components``), and the ``resources`` limits that size a group."""

    groups: Mapping[str, str] = field(default_factory=dict)
    components: Mapping[str, int] = field(default_factory=dict)
    limits: Mapping[str, int] = field(default_factory=dict)


def _pairs(entries: Sequence[str] | None) -> dict[str, str]:
    """A profile's ``KEY=VALUE`` list as Snakemake's command line reads it."""
    return dict(str(e).split("=", 1) for e in entries or [])


def read_grouping(profile: Path) -> Grouping:
    """The job groups a run with the SLURM ``profile`` submits (none without the file)."""
    import yaml

    given = (yaml.safe_load(profile.read_text()) if profile.is_file() else None) or {}
    return Grouping(groups=_pairs(given.get("groups")),
                    components={k: int(v) for k, v in _pairs(given.get("group-components")).items()},
                    limits={k: int(v) for k, v in _pairs(given.get("resources")).items()})


@dataclass(frozen=True)
class GroupFacts:
    """One group job: its id, jobs and what it asks SLURM for (as Snakemake sizes it on a cluster)."""

    name: str
    jobs: int
    resources: Mapping[str, int | str]


def dag_jobs(workdir: Path, configfiles: Sequence[Path],
             grouping: Grouping = Grouping()) -> tuple[dict, list[JobFacts], list[GroupFacts]]:
    """The resolved config, every job a run from scratch would run (a dry run in `workdir`) and
    the group jobs that `grouping` makes of them."""
    from snakemake.api import SnakemakeApi
    from snakemake.resources import GroupResources
    from snakemake.settings.types import ConfigSettings, DAGSettings, GroupSettings, OutputSettings, ResourceSettings

    # The workflow sets HF_HOME / HF_HUB_OFFLINE from its config in this process: keep ours.
    # Snakemake's own dry-run listing goes to the (discarded) stderr: the table is the output.
    with mock.patch.dict(os.environ), redirect_stderr(io.StringIO()), SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=None, resources=dict(grouping.limits)),
            config_settings=ConfigSettings(configfiles=[Path(c).resolve() for c in configfiles]),
            snakefile=workdir / "Snakefile",
            workdir=workdir,
        )
        # As if nothing had run: the cost of the whole run, whatever is on disk. A dry run forms
        # groups as a cluster run does (a local run ignores them).
        workflow.dag(DAGSettings(forceall=True)).execute_workflow(
            executor="dryrun",
            group_settings=GroupSettings(overwrite_groups=dict(grouping.groups), group_components=dict(grouping.components)))
        inner = workflow._workflow  # the API hands out no job list; the DAG after the dry run holds it
        # Stages in the order the Snakefile includes their rule files.
        order = {stage: i for i, stage in enumerate(dict.fromkeys(Path(r.snakefile).stem for r in inner.rules))}
        groups = {job: inner.dag.get_job_group(job) for job in inner.dag.jobs}
        jobs = [
            JobFacts(
                rule=job.rule.name,
                stage=Path(job.rule.snakefile).stem,
                wildcards=dict(job.wildcards_dict),
                gpu=requests_gpu(dict(job.resources.items())),
                loads="device" in dict(job.params.items()),
                runtime=dict(job.resources.items()).get("runtime"),
                submitted=not (job.rule.name in inner._localrules or job.rule.norun),
                group=groups[job].jobid if groups[job] is not None else None,
            )
            for job in inner.dag.jobs
        ]
        # Sized as the submitting process does (run_local False: levels of a chain take the max,
        # not the sum); the dry run's own sizing is the local one.
        group_facts = [
            GroupFacts(group.groupid, len(group.jobs), GroupResources.basic_layered(
                toposorted_jobs=group.toposorted, constraints=inner.global_resources, run_local=False,
                additive_resources=["runtime"], sortby=["runtime"]))
            for group in {g.jobid: g for g in groups.values() if g is not None}.values()
        ]
        return (dict(inner.config), sorted(jobs, key=lambda j: (order[j.stage], j.rule)),
                sorted(group_facts, key=lambda g: g.name))


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

    home = config["hf"]["home"] or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    local = workdir / spec if (workdir / spec).is_dir() else None
    cached = None if local else try_to_load_from_cache(spec, "config.json", cache_dir=workdir / Path(home).expanduser() / "hub")
    folder = local or (Path(cached).parent if isinstance(cached, str) else None)
    if folder is None:
        return PUBLISHED_WIDTHS.get(spec)
    model = json.loads((folder / "config.json").read_text())
    return int(model.get("text_config", model)["hidden_size"])  # a multimodal wrapper keeps its text model's


@dataclass
class Stage:
    jobs: int = 0
    gpu_jobs: int = 0
    loads: int = 0
    generated: float = 0.0
    forced: float = 0.0
    surrogate_rows: float = 0.0
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0])  # GPU time, low and high
    disk_bytes: dict[str, float] = field(default_factory=dict)

    def gpu_hours(self) -> str:
        return f"{self.seconds[LOW] / 3600:.2f}-{self.seconds[HIGH] / 3600:.2f}"


REFINE_PASSES = 12


def _shard_share(n: int, n_shards: int) -> float:
    return n / max(1, n_shards)


def selection_work(groups: Sequence[float], n: int, max_new_tokens: int, ln: Lengths,
                   verified: float | None) -> tuple[float, float, float]:
    """(generated, forced, 0) of selection calls over ``n`` prompts, each call with ``groups[k]``
    masks, the incumbent first. Plainly every row decodes to the budget. With the share
    ``verified`` of candidate rows settled by verification, the incumbent decodes, every row is
    teacher-forced on its tokens (prefix and answer; an upper bound, as a row whose added
    features stay silent needs no pass), and a prompt with unsettled rows decodes them again
    beside its incumbent: at most one more incumbent row per unsettled row or prompt."""
    rows = sum(groups) * n
    if verified is None:
        return rows * max_new_tokens, rows * ln.prefix, 0
    unsettled = [(1 - verified) * (g - 1) * n for g in groups]
    decoded = sum(n + u + min(n, u) for u in unsettled)
    return decoded * max_new_tokens, decoded * ln.prefix + rows * (ln.prefix + max_new_tokens), 0


def job_work(job: JobFacts, config: Mapping, sizes: Mapping[str, int], ln: Lengths,
             verified: float | None = None) -> tuple[float, float, float]:
    """(generated, forced, surrogate rows) of one job; ``verified``: the share of candidate rows
    that selection's verification settles when ``selection.verify`` is on (None: all generated)."""
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
        # The refinement: a Powell round is a line search (about 12 KL passes to tol 0.01) along
        # each layer's direction and one more along the round's move, for at most max_rounds.
        passes += REFINE_PASSES * (n_layers + 1) * max(rounds, 1) if gates.get("refine", True) else 0
        return 0, sizes["calib"] * seq * (1 + passes), 0  # IT's reference once, then each KL pass
    if rule == "score_features":
        return 0, 2 * sizes["selector"] * seq, 0
    if rule == "plant_activity":
        return 0, sizes["selector"] * seq, 0
    # Every step evaluates the incumbent and each remaining candidate (an upper bound: a pool
    # smaller than max_candidates, or a selection that stops, does less).
    steps = range(min(sel["size_cap"], sel["max_candidates"]))
    share = verified if sel.get("verify") else None
    if rule in ("select_cap", "select_vmask") and job.gpu:
        groups = [sel["max_candidates"] - t + 1 for t in steps]
        return selection_work(groups, sizes["selector"], sel["max_new_tokens"], ln, share)
    if rule.endswith("_shard") and rule.startswith("select_"):
        groups = [_shard_share(sel["max_candidates"], sel["n_shards"]) + 1]
        return selection_work(groups, sizes["selector"], sel["max_new_tokens"], ln, share)
    return 0, 0, 0


# The config section whose batch size a rule's generation runs at.
GENERATING = {"teacher": "teacher", "evaluate": "evaluate"}


def job_seconds(job: JobFacts, config: Mapping, sizes: Mapping[str, int], ln: Lengths, est: Estimates,
                bound: int, verified: float | None = None) -> float:
    """GPU seconds of one job at ``bound`` (LOW: the high throughputs and the low load time)."""
    generated, forced, rows = job_work(job, config, sizes, ln, verified)
    slow = HIGH - bound  # the high time takes the low throughputs
    section = GENERATING.get(job.rule, "selection")
    rate = est.rate(int(config[section]["batch_size"]), slow) if generated else 1.0
    return (generated / rate + forced / est.forced[slow] + rows / est.surrogate_rows[slow]
            + job.loads * est.load_s[bound])


MIN_RUNTIME = 10  # minutes: below this, queue start-up and node variance dominate


def runtime_request(seconds: float, margin: float) -> int:
    """Minutes to ask for a job whose high estimate is ``seconds``: ``margin`` times it, in 5-minute steps."""
    return max(MIN_RUNTIME, 5 * math.ceil(margin * seconds / 300))


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def cache_itemsize(config: Mapping) -> int:
    """Bytes per cached number: `cache.dtype`, its "auto" resolved as the jobs do: bf16 on a CUDA
    device, fp32 on a CPU (`pair.device: auto` as on this machine: a GPU driver's device file
    present, without importing torch)."""
    dtype, device = config["cache"]["dtype"], str(config["pair"]["device"])
    if dtype != "auto":
        return ITEMSIZE[dtype]
    cuda = device.startswith("cuda") or (device == "auto" and Path("/dev/nvidiactl").exists())
    return ITEMSIZE["bfloat16" if cuda else "float32"]


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


def plan(config: Mapping, jobs: Sequence[JobFacts], workdir: Path, est: Estimates,
         verified: float | None = None) -> tuple[dict[str, Stage], Lengths, int | None]:
    """Per stage, in the order of `jobs`: counts, work, GPU time and bytes of a run in `workdir`;
    ``verified`` as for :func:`job_work`."""
    run_dir = workdir / "results" / str(config["run"])
    sizes, ln, d = split_sizes(config, run_dir), lengths(config, run_dir), width(config, workdir)
    stages: dict[str, Stage] = {}
    for job in jobs:
        stage = stages.setdefault(job.stage, Stage())
        generated, forced, rows = job_work(job, config, sizes, ln, verified)
        stage.jobs += 1
        stage.gpu_jobs += job.gpu
        stage.loads += job.loads
        stage.generated += generated
        stage.forced += forced
        stage.surrogate_rows += rows
        if job.gpu:
            for bound in (LOW, HIGH):
                stage.seconds[bound] += job_seconds(job, config, sizes, ln, est, bound, verified)
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


def submissions(jobs: Sequence[JobFacts]) -> int:
    """SLURM submissions: one per group job, and one per submitted job in no group."""
    return len({j.group for j in jobs if j.submitted and j.group}) + sum(j.submitted and not j.group for j in jobs)


def group_requests(groups: Sequence[GroupFacts]) -> list[str]:
    """Per group job: its jobs, the GPU it asks for and its runtime (minutes, at attempt 1)."""
    def gpus(res: Mapping[str, int | str]) -> str:
        return f"gres {res['gres']}" if "gres" in res else f"gpu {res.get('gpu', 0)}"

    return [f"  {g.name}: {g.jobs} jobs, {gpus(g.resources)}, {g.resources.get('runtime')} min" for g in groups]


def runtimes(jobs: Sequence[JobFacts]) -> list[str]:
    """Per GPU rule: its jobs and the minutes they ask for (the DAG's own requests)."""
    asked: dict[str, list[int]] = {}
    for job in jobs:
        if job.gpu and job.runtime is not None:
            asked.setdefault(job.rule, []).append(int(job.runtime))
    return [f"  {rule}: {len(m)} jobs, {min(m)}" + (f"-{max(m)}" if max(m) > min(m) else "") + " min"
            for rule, m in asked.items()]


PLACEHOLDER = "SET_ME"


def _unset(value: object) -> bool:
    return value is None or str(value).startswith(PLACEHOLDER)


def site_problems(config: Mapping, profile: Path) -> list[str]:
    """One line per SLURM site setting that is unset or still a placeholder: the partition and
    account of every job (the profile's ``default-resources``), and the model jobs' partition,
    account and GPU type (``resources.gpu``). Unset, SLURM picks its default partition, the
    plugin guesses the account from the user's last job, and any GPU may come, too small or not."""
    import yaml

    profiled = yaml.safe_load(profile.read_text()) if profile.is_file() else None
    defaults = (profiled or {}).get("default-resources") or {}
    gpu = config["resources"]["gpu"]
    wanted = {
        f"{profile} default-resources: slurm_partition": defaults.get("slurm_partition"),
        f"{profile} default-resources: slurm_account": defaults.get("slurm_account"),
        "resources.gpu.slurm_partition": gpu.get("slurm_partition"),
        "resources.gpu.slurm_account": gpu.get("slurm_account", defaults.get("slurm_account")),
        "resources.gpu.gpu_model (or constraint)": gpu.get("gpu_model") or gpu.get("constraint"),
    }
    return [f"{key}: {'unset' if value is None else repr(value)}" for key, value in wanted.items() if _unset(value)]


def selection_share(config: Mapping, workdir: Path, given: float | None) -> tuple[float | None, str]:
    """The verified share that selection's work is counted with (None: verification is off, all
    generated) and a line saying where it comes from: ``given``, else measured at the config's
    ``verify_margin``, else none verified (an upper bound)."""
    sel = config["selection"]
    if not sel.get("verify"):
        return None, "selection.verify off: every candidate is generated"
    margin = float(sel["verify_margin"])
    if given is not None:
        return given, (f"selection.verify on: {given:.1%} of candidate rows verified, not generated "
                       "(given by --verified-share)")
    found = verified_share(workdir, margin)
    if found is None:
        return 0.0, (f"selection.verify on: no {VERIFY_RESULTS} measured at verify_margin {margin}: counted as "
                     "none verified, every candidate generated and teacher-forced (an upper bound)")
    return found.share, (f"selection.verify on: {found.share:.1%} of candidate rows verified, not generated, at "
                         f"verify_margin {margin} ({found.source}; another pair, device or dtype may settle "
                         "another share: --verified-share replaces it)")


def report(config: Mapping, jobs: Sequence[JobFacts], workdir: Path, est: Estimates, profile: Path,
           groups: Sequence[GroupFacts] = (), grouping: Grouping = Grouping(), given_share: float | None = None) -> str:
    share, share_line = selection_share(config, workdir, given_share)
    stages, ln, d = plan(config, jobs, workdir, est, share)
    head = ("stage", "jobs", "gpu", "loads", "generated", "forced", "cache B", "surrogate B", "GPU-h low-high")
    rows = [head]
    total = Stage()
    for name, s in stages.items():
        rows.append((name, str(s.jobs), str(s.gpu_jobs), str(s.loads), _fmt(s.generated), _fmt(s.forced),
                     _fmt(s.disk_bytes.get("cache", 0)), _fmt(s.disk_bytes.get("surrogate", 0)), s.gpu_hours()))
        for key in ("jobs", "gpu_jobs", "loads", "generated", "forced", "surrogate_rows"):
            setattr(total, key, getattr(total, key) + getattr(s, key))
        total.seconds = [a + b for a, b in zip(total.seconds, s.seconds, strict=True)]
        for key, value in s.disk_bytes.items():
            total.disk_bytes[key] = total.disk_bytes.get(key, 0) + value
    rows.append(("total", str(total.jobs), str(total.gpu_jobs), str(total.loads), _fmt(total.generated),
                 _fmt(total.forced), _fmt(total.disk_bytes.get("cache", 0)), _fmt(total.disk_bytes.get("surrogate", 0)),
                 total.gpu_hours()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    gpu, loads = per_seed(jobs, "gpu"), per_seed(jobs, "loads")
    seeds = sorted(s for s in gpu if s is not None)
    lines += [
        "",
        f"run {config['run']}: shared by every seed {gpu.get(None, 0)} GPU jobs / {loads.get(None, 0)} model loads; "
        + "; ".join(f"seed {s} {gpu[s]} / {loads[s]}" for s in seeds),
        f"SLURM submissions: {submissions(jobs)} with {profile}'s job groups, {sum(j.submitted for j in jobs)} "
        f"without ({total.gpu_jobs} GPU jobs and {sum(j.submitted and not j.gpu for j in jobs)} CPU jobs; the other "
        f"{total.jobs - sum(j.submitted for j in jobs)} jobs are localrules, run by Snakemake itself)",
        f"lengths: prefix {ln.prefix:.1f}, answer {ln.answer:.1f} tokens per prompt ({ln.source})",
        share_line,
        f"width: {d if d is not None else 'unknown (the pair config is not in the local cache)'}",
        "assumptions (estimates for one H100 in bf16 at 4B size, not measured; --estimates FILE replaces them): "
        + est.line(),
        "generated/forced count decoding steps x rows / tokens in forward passes of both models; "
        "selection and gate searches are upper bounds (they may stop early)",
        f"runtime requests per GPU rule at attempt 1 (high estimate x resources.runtime_margin "
        f"{config['resources']['runtime_margin']}, or resources.gpu.runtime when set):",
        *runtimes(jobs),
        f"group jobs ({len(groups)}; a group is one submission, and each of its jobs still loads the pair):",
        *group_requests(groups),
    ]
    lines += [f"  unsafe: {problem}" for problem in group_problems(grouping.groups, grouping.limits)]
    missing = site_problems(config, profile)
    lines += ["SLURM site settings to fill in before submitting (slurm/README.md):", *(f"  {m}" for m in missing)] \
        if missing else ["SLURM site settings: partition, account and GPU type all set"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m postdiff.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configfile", nargs="+", type=Path, default=[], help="as for snakemake (merged over config/config.yaml)")
    parser.add_argument("--directory", type=Path, default=Path.cwd(), help="the workflow's directory (default: here)")
    parser.add_argument("--estimates", type=Path, help="YAML of figures replacing the default estimates "
                        "(generated: {batch: [low, high]}, forced, surrogate_rows, load_s: [low, high])")
    parser.add_argument("--verified-share", type=float, help="with selection.verify: the share of candidate rows "
                        "that verification settles (default: measured, " + VERIFY_RESULTS + " at the config's verify_margin)")
    parser.add_argument("--profile", type=Path, default=Path("slurm/config.yaml"),
                        help="the SLURM profile whose site settings to check and job groups to count (relative to --directory)")
    args = parser.parse_args(argv)
    workdir = args.directory.resolve()
    if args.verified_share is not None and not 0 <= args.verified_share <= 1:
        parser.error(f"--verified-share must be between 0 and 1, got {args.verified_share}")
    profile = workdir / args.profile
    grouping = read_grouping(profile)
    config, jobs, groups = dag_jobs(workdir, args.configfile, grouping)
    print(report(config, jobs, workdir, read_estimates(args.estimates), profile, groups, grouping, args.verified_share))


if __name__ == "__main__":
    main()
