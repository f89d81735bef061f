"""The PT/IT pair (workflow/rules/pair.smk): loading, chat templates, hooks, teacher-forced passes, generation, families."""
