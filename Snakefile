# postdiff: surgical post-training diffing of a PT/IT model pair.
# Stages live in workflow/rules/ (one file each); each rule calls one function of src/postdiff/.
from snakemake.utils import min_version, validate

min_version("9.20")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/pair.smk"
include: "workflow/rules/suite.smk"
include: "workflow/rules/teacher.smk"
include: "workflow/rules/caches.smk"
include: "workflow/rules/surrogate.smk"
include: "workflow/rules/gates.smk"
include: "workflow/rules/variants.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/selection.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/report.smk"


# A rule that runs a stage takes its params from stage() (common.smk), which adds the hash of the
# stage's code: without it, editing the code would not rerun the rule.
for _rule in workflow.rules:
    if _rule.script == STAGE and (_rule.params.get("entry") is None
                                  or _rule.params.get("code") != code_hash(_rule.params.entry)):
        raise WorkflowError(f"rule {_rule.name}: take its params from stage(entry, ...) (workflow/rules/common.smk)")


# A group job (slurm/config.yaml's `groups:`) is one submission; the cap on GPU_SLOT applies
# inside each group only, never to how many jobs the cluster runs at once.
resource_scopes:
    **{GPU_SLOT: "local"},


onstart:
    from postdiff.models.preflight import exit_on_problems
    from postdiff.workflow.config import group_problems, placeholder_problems

    # Locally the SLURM keys are ignored; on a cluster a placeholder would reach sbatch.
    if not workflow.local_exec and (site := placeholder_problems(config)):
        print("\n".join(["postdiff: the cluster settings are not filled in:", *site]), file=sys.stderr)
        sys.exit(1)
    # Locally groups are ignored; on a cluster, without the cap, a group would ask for a GPU per job.
    groups = {rule.name: str(rule.group) for rule in workflow.rules if rule.group is not None}
    if not workflow.local_exec and (unsafe := group_problems(groups, dict(workflow.global_resources.unwrapped_items()))):
        print("\n".join(["postdiff: the job groups are unsafe:", *unsafe]), file=sys.stderr)
        sys.exit(1)
    exit_on_problems(config)


# Light rules run in the Snakemake process's node: on a cluster each job costs seconds of startup.
localrules:
    all,
    suite,
    split,
    standardiser,
    variant_spec,
    evaluate_teacher,
    baseline_masks,
    sweep_summary,
    pair_gap,
    r2_table,
    table1,
    table2,
    figure1,
    figure2,
    qualitative,
    seed_table,
    seed_figure,
    mask_stability,
    feature_page,
    provenance,


rule all:
    input:
        default_targets(),
    default_target: True
