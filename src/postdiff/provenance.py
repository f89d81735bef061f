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
from postdiff.io import sha256_file, write_json, write_parquet, write_text
from postdiff.preflight import fingerprints
from postdiff.runtime import Job

log = logging.getLogger(__name__)


def _files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly, and every file inside named directories (HF model dirs)."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    return out


def manifest(paths: Iterable[str | Path]) -> pl.DataFrame:
    rows = [{"path": str(f), "bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in _files(paths)]
    return pl.DataFrame(rows, schema={"path": pl.String, "bytes": pl.Int64, "sha256": pl.String}).sort("path")


def run_id(config: Mapping[str, Any], fingerprints: Mapping[str, str], code_version: str = __version__) -> str:
    """Hash of the resolved config, the code version and the model fingerprints."""
    blob = json.dumps({"config": config, "code": code_version, "models": dict(fingerprints)}, sort_keys=True, default=str)
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
    """Stage: the resolved config, run id, manifest of ``input.artifacts`` and the runtime table
    of every job that has a benchmark file under ``params.benchmark_root``."""
    config = job.params["config"]
    models = fingerprints(job)
    identity = {"run_id": run_id(config, models), "code_version": __version__, "models": models}
    log.info("run id %s", identity["run_id"])
    write_json(config, job.output["config"])
    write_json(identity, job.output["run_id"])
    write_parquet(manifest(job.input["artifacts"]), job.output["manifest"])
    runtimes = runtime_table(job.params["benchmark_root"])
    log.info("%d jobs, %.1f s of job time in all", runtimes.height, runtimes["seconds"].sum())
    write_text(runtimes.write_csv(), job.output["runtimes"])
