"""Per-prompt metrics and their paired bootstrap, the tables and figures of workflow/rules/report.smk."""
