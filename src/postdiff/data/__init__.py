"""The prompt suite and its splits (workflow/rules/suite.smk): the made-up world, real-world facts, checkers."""
