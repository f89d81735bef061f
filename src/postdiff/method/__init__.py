"""The paper's method, stage by stage: teacher, caches, surrogates, gates, variants, evaluation and selection."""
