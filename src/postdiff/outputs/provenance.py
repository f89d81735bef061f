"""Reproducibility records (SPEC §10): resolved config, run id, artifact manifest, runtimes."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import polars as pl

from postdiff import __version__
from postdiff.models.preflight import fingerprints
from postdiff.workflow.io import sha256_file, write_json, write_parquet, write_text
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)


def _files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, and every file inside named directories (HF model dirs)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


MANIFEST_SCHEMA = {"path": pl.String, "kind": pl.String, "bytes": pl.Int64, "sha256": pl.String}
SKIPPED = ("provenance", "logs")  # top-level folders of a run that the manifest leaves out
BOOKKEEPING = ".snakemake_timestamp"  # Snakemake's marker inside directory outputs


def manifest(paths: Iterable[str | Path]) -> pl.DataFrame:
    """One row per file (files named directly, and every file in named directories)."""
    rows = [{"path": str(f), "kind": "artifact", "bytes": f.stat().st_size, "sha256": sha256_file(f)}
            for f in _files(paths)]
    return pl.DataFrame(rows, schema=MANIFEST_SCHEMA).sort("path")


def run_manifest(run_dir: str | Path, skip: Iterable[str | Path] = ()) -> pl.DataFrame:
    """Every file under ``run_dir`` except ``provenance/``, ``logs/`` and the paths in ``skip``;
    ``kind`` is ``benchmark`` for Snakemake's per-job benchmark files, ``artifact`` otherwise."""
    root = Path(run_dir)
    skipped = {Path(p) for p in skip}
    rows = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root)
        if rel.parts[0] in SKIPPED or f.name == BOOKKEEPING or f in skipped:
            continue
        kind = "benchmark" if rel.parts[0] == "benchmarks" else "artifact"
        rows.append({"path": str(f), "kind": kind, "bytes": f.stat().st_size, "sha256": sha256_file(f)})
    return pl.DataFrame(rows, schema=MANIFEST_SCHEMA).sort("path")


def run_id(config: Mapping[str, Any], fingerprints: Mapping[str, str], code_hash: str) -> str:
    """Hash of the resolved config, the code's content hash and the model fingerprints."""
    blob = json.dumps({"config": config, "code": code_hash, "models": dict(fingerprints)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def runtime_table(root: str | Path) -> pl.DataFrame:
    """Snakemake's per-job benchmark TSVs under ``root`` gathered into one table, one row per job."""
    frames = []
    for path in sorted(Path(root).rglob("*.tsv")):
        df = pl.read_csv(path, separator="\t", null_values=["NA", "-"], infer_schema_length=0)
        job = str(path.relative_to(root)).removesuffix(".tsv")
        frames.append(df.select(pl.lit(job).alias("job"), pl.col("s").cast(pl.Float64).alias("seconds"),
                                pl.col("max_rss").cast(pl.Float64).alias("max_rss_mb")))
    schema = {"job": pl.String, "seconds": pl.Float64, "max_rss_mb": pl.Float64}
    return pl.concat(frames).sort("seconds", descending=True) if frames else pl.DataFrame(schema=schema)


def record(job: Job) -> None:
    """Stage: the resolved config, the run id (config, ``params.code_hash``, fingerprints), the
    manifest of every file under ``params.run_dir`` (or of ``input.artifacts`` without one) and
    the runtime table of every job that has a benchmark file under ``params.benchmark_root``."""
    config = job.params["config"]
    models = fingerprints(job)
    code = job.params["code_hash"]
    identity = {"run_id": run_id(config, models, code), "code_hash": code, "code_version": __version__, "models": models}
    log.info("run id %s", identity["run_id"])
    write_json(config, job.output["config"])
    write_json(identity, job.output["run_id"])
    if job.params.get("run_dir"):
        # This job's own benchmark is written after it ends: an old one would be stale.
        own = Path(job.params["benchmark_root"]) / "provenance.tsv"
        table = run_manifest(job.params["run_dir"], skip=[own])
    else:
        table = manifest(job.input["artifacts"])
    log.info("manifest: %d files (%d benchmarks)", table.height, (table["kind"] == "benchmark").sum())
    write_parquet(table, job.output["manifest"])
    runtimes = runtime_table(job.params["benchmark_root"])
    log.info("%d jobs, %.1f s of job time in all", runtimes.height, runtimes["seconds"].sum())
    write_text(runtimes.write_csv(), job.output["runtimes"])
