"""Mask selection (workflow/rules/selection.smk): feature scores, forward selection, its jobs, baselines, the sweep."""
