"""The PT-to-IT gap of a pair on the test split: the premise every recovery figure rests on."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import polars as pl

from postdiff.stats import metrics
from postdiff.workflow.io import write_json
from postdiff.workflow.runtime import Job

log = logging.getLogger(__name__)

# The embedded pair's promise (issue 2): IT's Cap at least this far above PT's, PT this much longer.
MIN_CAP_GAP = 0.3
MIN_LEN_RATIO = 3.0
# Teacher completions cut at max_new_tokens shorten IT's Len and skew VerbCarry; above this share, warn.
MAX_TRUNCATED = 0.05


def gap(pt: Mapping[str, float], it: Mapping[str, float]) -> dict[str, float]:
    return {
        "cap_pt": pt["Cap"],
        "cap_it": it["Cap"],
        "cap_gap": it["Cap"] - pt["Cap"],
        "len_pt": pt["Len"],
        "len_it": it["Len"],
        "len_ratio": pt["Len"] / it["Len"] if it["Len"] > 0 else float("inf"),
    }


def truncated_share(teacher: pl.DataFrame) -> float:
    """Share of teacher completions that ran out of tokens before IT's stop set ended them."""
    return float((~teacher["eos"]).mean()) if teacher.height else 0.0


def pair_gap(job: Job) -> None:
    """Stage: input ``pt`` and ``it`` test records and ``<split>_teacher`` for each of
    ``params.splits``; output ``gap`` (JSON), printed to the log."""
    frames = metrics.read_eval([job.input["pt"], job.input["it"]])
    names = list(frames)
    summary = metrics.summary(metrics.align(frames), pt=names[0], it=names[1])
    result = gap(summary[names[0]], summary[names[1]])
    for name in names:
        log.info("%s: %s", name, {k: round(v, 4) for k, v in summary[name].items()})
    log.info("PT-to-IT gap: Cap %.3f -> %.3f (gap %.3f), Len %.1f -> %.1f (PT/IT %.2fx)",
             result["cap_pt"], result["cap_it"], result["cap_gap"], result["len_pt"], result["len_it"], result["len_ratio"])
    if result["cap_gap"] < MIN_CAP_GAP or result["len_ratio"] < MIN_LEN_RATIO:
        log.warning("small PT-to-IT gap (want Cap gap >= %.1f and Len ratio >= %.0fx): recovery figures will be noisy",
                    MIN_CAP_GAP, MIN_LEN_RATIO)
    result["teacher_truncated"] = {
        split: truncated_share(pl.read_parquet(job.input[f"{split}_teacher"])) for split in job.params["splits"]
    }
    for split, share in result["teacher_truncated"].items():
        if share > MAX_TRUNCATED:
            log.warning("teacher %s: %.1f%% of IT completions hit max_new_tokens (> %.0f%%): Len and VerbCarry are "
                        "skewed; raise teacher.max_new_tokens", split, 100 * share, 100 * MAX_TRUNCATED)
    write_json(result, job.output["gap"])
