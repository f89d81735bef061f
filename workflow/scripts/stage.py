# Every rule runs this one script; the stage itself is `params.entry` in src/postdiff/.
from postdiff.runtime import run_stage

run_stage(snakemake)  # noqa: F821 (injected by Snakemake)
