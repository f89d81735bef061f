"""postdiff: surgical post-training diffing of a pretrained/instruction-tuned model pair."""

__version__ = "0.1.0"
