"""What each stage's job imports before it does any work: a tiny-config job is ~3 s of CPU, mostly
imports, so a stage that needs no model must not pull torch (1.3 s) or transformers, and only
figures may pull seaborn (1.5 s). Stages are found in the rules, so a new one is checked too."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "seaborn", "matplotlib")
# Stages that run a model or read tensors, and what else they may import beyond torch.
TORCH = {
    "postdiff.method.cache", "postdiff.method.evaluate", "postdiff.method.gates",
    "postdiff.method.selection.scoring", "postdiff.method.standardise", "postdiff.method.surrogate",
    "postdiff.method.teacher", "postdiff.outputs.export", "postdiff.outputs.features", "postdiff.outputs.planted",
    "postdiff.outputs.plant_activity",
    "postdiff.outputs.stability",
}
TRAINING = {"postdiff.models.toy.plant", "postdiff.models.toy.train"}
FIGURES = {"postdiff.stats.figures", "postdiff.method.selection.scoreplot"}


def stage_modules() -> set[str]:
    text = "".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    return set(re.findall(r'"(postdiff\.[a-z_.]+):[a-z_0-9]+"', text)) - {"postdiff.module"}


def allowed(module: str) -> frozenset[str]:
    if module in TRAINING:
        return frozenset({"torch", "transformers"})
    if module in TORCH:
        return frozenset({"torch"})
    if module in FIGURES:
        return frozenset({"seaborn", "matplotlib"})
    return frozenset()


def test_every_listed_stage_module_is_a_stage() -> None:
    assert TORCH | TRAINING | FIGURES <= stage_modules()


@pytest.mark.parametrize("libs", sorted({allowed(m) for m in stage_modules()}, key=sorted),
                         ids=lambda libs: "+".join(sorted(libs)) or "light")
def test_a_stage_imports_only_what_it_uses(libs: frozenset[str]) -> None:
    # One interpreter per group of stages allowed the same libraries: the group's imports together
    # must stay within them.
    modules = sorted(m for m in stage_modules() if allowed(m) == libs)
    script = (f"import importlib, json, sys; [importlib.import_module(m) for m in {modules!r}]; "
              f"print(json.dumps([h for h in {HEAVY!r} if h in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert set(json.loads(proc.stdout.splitlines()[-1])) <= libs, modules


def test_the_collector_is_paused_for_a_stage_import_and_a_model_load_then_restored(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    from postdiff.models import loading
    from postdiff.workflow.runtime import gc_paused, resolve

    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the inner block leaves it paused
            pass
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled(), "a collector that was off stays off"
    finally:
        gc.enable()

    seen: list[bool] = []
    real = loading.load_tokenizer
    monkeypatch.setattr(loading, "load_tokenizer", lambda *a, **k: (seen.append(gc.isenabled()), real(*a, **k))[1])
    loading.load_model(str(REPO / "workflow/resources/embedded_pair/pt"))
    assert seen == [False] and gc.isenabled()
    assert resolve("postdiff.workflow.runtime:gc_paused") is gc_paused and gc.isenabled()
