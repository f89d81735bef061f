"""The package's shape: one subpackage per group of stages, imports only downward, no circles,
and every stage a rule names is a function of the module it names (read statically)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from postdiff.workflow.codehash import imported, module_file

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
# Lowest first: a module imports its own subpackage and the ones before it, never one after.
LAYERS = ("postdiff.workflow", "postdiff.data", "postdiff.models", "postdiff.stats", "postdiff.method",
          "postdiff.outputs", "postdiff.plan")


def modules() -> list[str]:
    return sorted(".".join(p.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
                  for p in (SRC / "postdiff").rglob("*.py"))


def rule_entries() -> list[tuple[str, str]]:
    """(module, function) of every ``stage("postdiff.module:function", ...)`` in the rule files."""
    text = "\n".join(p.read_text() for p in sorted((REPO / "workflow" / "rules").glob("*.smk")))
    return sorted(set(re.findall(r'stage\(\s*"(postdiff(?:\.\w+)+):(\w+)"', text)))


def layer(module: str) -> int:
    return next((i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")), -1)


def test_the_package_has_a_few_stage_groups_each_saying_what_it_is() -> None:
    top = sorted(p.name for p in (SRC / "postdiff").iterdir() if p.name != "__pycache__")
    assert top == ["__init__.py", "data", "method", "models", "outputs", "plan.py", "py.typed", "stats", "workflow"]
    for package in (SRC / "postdiff").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(package.read_text())) or ""
        assert doc and "\n" not in doc, f"{package}: its docstring is to say in one line what it holds"
    assert [m for m in modules() if layer(m) < 0] == ["postdiff"]


def test_imports_go_downward_only() -> None:
    upward = [(m, dep) for m in modules() for dep in imported(SRC, m) if layer(dep) > layer(m)]
    assert not upward, f"modules importing a later stage group: {upward}"


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A path that comes back to where it started, or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return [*path, m, d]
            if d not in state and (circle := visit(d, [*path, m])):
                return circle
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if m not in state and (c := visit(m, []))), None)


def test_no_import_circle() -> None:
    names = set(modules())
    circle = find_circle({m: {d for d in imported(SRC, m) if d in names and d != m} for m in names})
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_the_circle_check_finds_one() -> None:
    """The suite/real-world circle that the regrouping removed, and one through a third module."""
    assert find_circle({"suite": {"realworld", "checkers"}, "realworld": {"suite"}, "checkers": set()}) == \
        ["realworld", "suite", "realworld"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_stage_entry_of_the_rules_is_a_function_of_its_module() -> None:
    entries = rule_entries()
    assert len(entries) >= 30
    for module, function in entries:
        path = module_file(SRC, module)
        assert path is not None, f"{module}:{function}: no module {module}"
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        assert function in defined, f"{module}:{function}: {path} defines no {function}"


# Public functions that read a job's files for several entries (not method: they return its inputs).
JOB_READERS = {"postdiff.method.surrogate:cache_expect", "postdiff.method.selection.inputs:selector_inputs",
               "postdiff.models.preflight:fingerprints", "postdiff.method.records:variant_rows"}


def test_only_stage_entries_take_a_job() -> None:
    """The method is functions of arrays and plain values: a public function that takes a ``Job``
    is a rule's stage entry (reads inputs, calls the method, writes outputs) or a named reader."""
    entries = {f"{m}:{f}" for m, f in rule_entries()}
    takers = set()
    for module in modules():
        for node in ast.parse(module_file(SRC, module).read_text()).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                annotations = [ast.unparse(a.annotation) for a in node.args.args if a.annotation is not None]
                if "Job" in annotations:
                    takers.add(f"{module}:{node.name}")
    assert takers - entries - JOB_READERS == set()
    assert JOB_READERS <= takers
