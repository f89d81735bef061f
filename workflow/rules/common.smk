# Paths, parameters and resources shared by every stage.
import json
import re

RUN = f"results/{config['run']}"
SPLITS = ["train", "calib", "selector", "test"]
STAGE = "../scripts/stage.py"
ENV = "../../envs/postdiff.yaml"
BUILTIN = "builtin"


wildcard_constraints:
    split="|".join(SPLITS),


def model_spec(role):
    """The model that `role` ("pt" or "it") names: the embedded pair's directory or a hub id/path."""
    spec = config["pair"][role]
    return f"{RUN}/pair/{role}" if spec == BUILTIN else spec


def model_input(role):
    """The pair directory as an input when the workflow builds it, so the DAG orders the jobs."""
    return [model_spec(role)] if config["pair"][role] == BUILTIN else []


def model_params():
    return {
        "pt": model_spec("pt"),
        "it": model_spec("it"),
        "dtype": config["pair"]["dtype"],
        "device": config["pair"]["device"],
    }


def gpu_resources():
    return config["resources"]["gpu"]


def default_targets():
    return [f"{RUN}/provenance/run_id.json"]
