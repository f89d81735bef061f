"""What publishing a run's SAELens exports needs, written locally: the Hugging Face Hub repository
(one folder per seed and layer, as SAELens's ``sae_lens`` loader reads them, and a model card)
and the entry of SAELens's ``pretrained_saes.yaml`` that names them, and the SAEDashboard command
for each SAE (the Neuronpedia dashboards). Pushing and running are left to the user
(``huggingface-cli upload``, SAEDashboard's own environment); nothing here touches the network.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from postdiff.workflow.io import read_json, write_json, write_text
from postdiff.workflow.runtime import Job

# The files of a SAELens export folder besides cfg.json (postdiff.outputs.export, workflow/rules/export.smk).
SAELENS_WEIGHTS = ("sae_weights.safetensors", "sparsity.safetensors")


@dataclass(frozen=True)
class Published:
    """One exported SAE: its folder in the repository and what its ``cfg.json`` says."""

    seed: int
    layer: int
    cfg: Mapping[str, Any]

    @property
    def path(self) -> str:
        return f"seed{self.seed}/L{self.layer}"


def neuronpedia_id(model_id: str, sae: Published) -> str:
    """A proposal in Neuronpedia's ``<model>/<layer>-<set>`` form; Neuronpedia assigns the real one."""
    return f"{model_id.rsplit('/', 1)[-1].lower()}/{sae.layer}-postdiff-delta-s{sae.seed}"


def release_entry(release: str, repo_id: str, model_id: str, saes: Sequence[Published]) -> dict[str, Any]:
    """``{release: ...}`` in the format of SAELens's ``pretrained_saes.yaml``. ``l0`` is ``k``: TopK
    keeps k features, and a row has fewer only where ReLU zeroes one of them."""
    return {release: {
        "repo_id": repo_id,
        "model": model_id,
        "saes": [{"id": sae.path, "path": sae.path, "l0": int(sae.cfg["k"]),
                  "neuronpedia": neuronpedia_id(model_id, sae)} for sae in saes],
    }}


def model_card(release: str, repo_id: str, model_id: str, saes: Sequence[Published]) -> str:
    """The repository's README.md: what the SAEs compute and how to load them."""
    about = saes[0].cfg["metadata"]["postdiff"]
    rows = "\n".join(f"| `{sae.path}` | {sae.layer} | `{sae.cfg['metadata']['hook_name']}` | {sae.cfg['d_sae']} | "
                     f"{sae.cfg['k']} | {sae.cfg['metadata']['postdiff'].get('surrogate', {}).get('train_r2', '')} |"
                     for sae in saes)
    return f"""---
library_name: saelens
tags: [sae_lens, postdiff]
base_model: {model_id}
---

# {release}

Sparse TopK surrogates of the residual-stream change that instruction tuning makes to
`{model_id}` (PT) to give `{about['it']}` (IT), one per surrogate seed and decoder layer, written by
postdiff. Each reads PT's raw residual stream after block `l` and outputs `delta_hat`, an estimate of
`h_IT - h_PT` there: **not a reconstruction of the hook**. Attach with `use_error_term=True` to keep
PT's own output, and steer by adding `alpha * sae.decode(z)` to the stream. Trained on answer-phase
positions only; `cfg.json` holds the rest (`metadata.postdiff`, with `input_hook` and `output_hook`).

| SAE id | layer | hook | features | k | train R² |
|---|---|---|---|---|---|
{rows}

```python
from sae_lens import SAE
sae = SAE.from_pretrained("{repo_id}", "{saes[0].path}")
```
"""


def dashboard_script(release: str, saes: Sequence[Published]) -> str:
    """A shell script running SAEDashboard's Neuronpedia runner on each SAE of the repository.

    The flags are those of ``sae_dashboard.neuronpedia.neuronpedia_runner``'s argument parser
    (sae-dashboard 0.8); it cannot run in this project's environment (it pins TransformerLens 2
    and transformers 4), so the script is written, not run. The text dataset is the user's."""
    lines = [
        "#!/usr/bin/env bash",
        "# SAEDashboard's Neuronpedia runner on each SAE of hub/ (written by postdiff; run it from",
        "# results/<run>/publish/ in an environment with sae-dashboard installed).",
        "set -euo pipefail",
        ': "${DATASET:?set DATASET to a Hugging Face text dataset, e.g. monology/pile-uncopyrighted}"',
        'MODEL_DTYPE="${MODEL_DTYPE:-bfloat16}"',
    ]
    lines += [
        f"python -m sae_dashboard.neuronpedia.neuronpedia_runner --from-local-sae --sae-set {release} "
        f"--sae-path hub/{sae.path} --np-set-name postdiff-delta-s{sae.seed} --dataset-path \"$DATASET\" "
        f"--sae_dtype float32 --model_dtype \"$MODEL_DTYPE\" --output-dir dashboards/"
        for sae in saes
    ]
    return "\n".join(lines) + "\n"


def publish(job: Job) -> None:
    """Stage. input: ``cfgs``, the SAELens ``cfg.json`` of each seed and layer (in the order of
    params ``saes``, ``[seed, layer]`` pairs); params: repo_id, release, model_id. output:
    ``hub`` (the repository's directory) and ``snippet`` (``pretrained_saes.yaml``'s entry)."""
    p = job.params
    pairs, cfgs = [(int(s), int(layer)) for s, layer in p["saes"]], list(job.input["cfgs"])
    if len(pairs) != len(cfgs):
        raise ValueError(f"publish: {len(cfgs)} exports for {len(pairs)} (seed, layer) pairs")
    saes = [Published(seed, layer, read_json(cfg)) for (seed, layer), cfg in zip(pairs, cfgs)]
    hub = Path(job.output["hub"])
    for sae, cfg in zip(saes, cfgs):
        (hub / sae.path).mkdir(parents=True, exist_ok=True)
        for name in SAELENS_WEIGHTS:
            shutil.copyfile(Path(cfg).parent / name, hub / sae.path / name)
        # SAELens 6.54 drops the registry's Neuronpedia id for a config with a metadata block:
        # the loaded SAE carries it only if cfg.json does.
        metadata = {**sae.cfg["metadata"], "neuronpedia_id": neuronpedia_id(p["model_id"], sae)}
        write_json({**sae.cfg, "metadata": metadata}, hub / sae.path / "cfg.json")
    write_text(model_card(p["release"], p["repo_id"], p["model_id"], saes), hub / "README.md")
    entry = release_entry(p["release"], p["repo_id"], p["model_id"], saes)
    write_text(yaml.safe_dump(entry, sort_keys=False), job.output["snippet"])
    write_text(dashboard_script(p["release"], saes), job.output["dashboards"])
