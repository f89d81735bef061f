"""The rules' code hashes (postdiff.workflow.codehash), on small hand-made packages and on postdiff."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from postdiff.workflow.codehash import closure, code_hash, imported, tree_hash

SRC = Path(__file__).resolve().parents[1] / "src"


def tree(root: Path, files: dict[str, str]) -> Path:
    """A source tree under ``root``: {relative path: text}."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


BASE = {
    "pkg/__init__.py": '"""A package."""\n',
    "pkg/a.py": "import json\n\ndef run(job):\n    return json.dumps(job)\n",
    "pkg/b.py": "X = 1\n",
    "pkg/c.py": "Y = 2\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/d.py": "from .e import Z\n",
    "pkg/sub/e.py": "Z = 3\n",
}


def edited(root: Path, src: Path, changes: dict[str, str]) -> Path:
    """A copy of ``src`` with ``changes`` written over it (hashes are cached per tree)."""
    shutil.copytree(src, root)
    return tree(root, changes)


def test_an_added_import_reruns_the_importer_and_an_edit_reruns_only_importers(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", BASE)
    assert closure(v1, "pkg.a") == {"pkg", "pkg.a"}  # json is not the package's
    v2 = edited(tmp_path / "v2", v1, {"pkg/a.py": "import json\nfrom pkg.b import X\n\ndef run(job):\n    return X\n"})
    assert closure(v2, "pkg.a") == {"pkg", "pkg.a", "pkg.b"}
    assert code_hash(v2, "pkg.a:run") != code_hash(v1, "pkg.a:run")
    assert code_hash(v2, "pkg.c:f") == code_hash(v1, "pkg.c:f")
    v3 = edited(tmp_path / "v3", v2, {"pkg/b.py": "X = 10\n"})
    assert code_hash(v3, "pkg.a:run") != code_hash(v2, "pkg.a:run")  # through the import
    assert code_hash(v3, "pkg.c:f") == code_hash(v2, "pkg.c:f")


def test_imports_inside_functions_and_submodules_named_by_from_import_count(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", {**BASE, "pkg/a.py": "def run(job):\n    from pkg import b, missing\n    return b.X\n"})
    assert imported(v1, "pkg.a") == frozenset({"pkg", "pkg.b"})  # no module pkg.missing: not a file to hash
    v2 = tree(tmp_path / "v2", {**BASE, "pkg/a.py": "from pkg.b import X\n"})
    assert imported(v2, "pkg.a") == frozenset({"pkg.b"})  # X is a name, not a module


def test_relative_imports_resolve_against_the_module_package(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", {**BASE, "pkg/sub/f.py": "from .. import c\nfrom . import e\nfrom ..b import X\n"})
    assert imported(v1, "pkg.sub.d") == frozenset({"pkg.sub.e"})
    assert imported(v1, "pkg.sub.f") == frozenset({"pkg", "pkg.c", "pkg.sub", "pkg.sub.e", "pkg.b"})
    # A package's own __init__: `from .e import Z` there is pkg.sub.e, not pkg.e.
    v2 = tree(tmp_path / "v2", {**BASE, "pkg/sub/__init__.py": "from .e import Z\n"})
    assert imported(v2, "pkg.sub") == frozenset({"pkg.sub.e"})


def test_the_packages_around_a_module_are_part_of_its_code(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", BASE)
    assert closure(v1, "pkg.sub.d") == {"pkg", "pkg.sub", "pkg.sub.d", "pkg.sub.e"}
    v2 = edited(tmp_path / "v2", v1, {"pkg/sub/__init__.py": '"""Runs on every import of pkg.sub."""\n'})
    assert code_hash(v2, "pkg.sub.d:f") != code_hash(v1, "pkg.sub.d:f")
    assert code_hash(v2, "pkg.a:run") == code_hash(v1, "pkg.a:run")
    v3 = edited(tmp_path / "v3", v1, {"pkg/__init__.py": '"""Edited."""\n'})
    assert code_hash(v3, "pkg.a:run") != code_hash(v1, "pkg.a:run")


def test_a_module_that_does_not_exist_is_named(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", BASE)
    with pytest.raises(ValueError, match=r"stage entry 'pkg\.nowhere:run': no module pkg\.nowhere under "):
        code_hash(v1, "pkg.nowhere:run")


def test_a_hash_covers_paths_as_well_as_bytes(tmp_path: Path) -> None:
    v1 = tree(tmp_path / "v1", {"x/a.py": "A = 1\n", "x/b.py": "A = 1\n"})
    assert tree_hash(v1, ["x/a.py"]) != tree_hash(v1, ["x/b.py"])  # same bytes, another file
    assert tree_hash(v1, ["x/a.py"]) == tree_hash(v1, [v1 / "x/a.py"])


def test_postdiffs_table_stage_hashes_no_model_code() -> None:
    """Editing the model code must not rerun the tables: their stage reaches only stats and plumbing."""
    code = closure(SRC, "postdiff.stats.tables")
    assert {"postdiff.stats.bootstrap", "postdiff.stats.metrics", "postdiff.workflow.io"} <= code
    assert not [m for m in code if m.startswith(("postdiff.models", "postdiff.method"))]
    assert "postdiff.method.surrogate" in closure(SRC, "postdiff.method.gates")
