# Every rule runs this one script; the stage itself is `params.entry` in src/postdiff/.
# The workflow's own src/ goes first on the path: a job runs the code that its rule's `code` param
# hashed (workflow/rules/common.smk), and needs no installed package (e.g. under --sdm conda).
import sys
from pathlib import Path

SRC = Path(snakemake.scriptdir).resolve().parents[1] / "src"  # noqa: F821 (injected by Snakemake)
if (SRC / "postdiff" / "__init__.py").is_file():
    sys.path.insert(0, str(SRC))

from postdiff.workflow.runtime import run_stage  # noqa: E402

run_stage(snakemake)  # noqa: F821
