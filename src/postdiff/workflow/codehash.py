"""Content hashes of the code a rule runs, read from the source tree with ``ast`` (nothing imported).

A rule's ``code`` param is :func:`code_hash` of its stage's entry: the stage's module, every
module of the same package that it imports anywhere in the file (directly or through other
modules), and the packages around each, whose ``__init__`` runs on import. Snakemake reruns a
job whose params changed, so editing a module reruns exactly the jobs that import it.
:func:`tree_hash` hashes whole files: the run id's code.

Only the standard library: ``workflow/rules/common.smk`` imports this in the Snakemake process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from collections.abc import Iterable
from pathlib import Path


def module_file(src: Path, module: str) -> Path | None:
    """The source of dotted ``module`` under ``src`` (``m.py`` or ``m/__init__.py``), or None."""
    base = Path(src).joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


# Cached: every stage's hash walks the same modules, and parsing them all again for each of ~40
# stages was most of the time a dry run took (and every SLURM job re-reads the Snakefile).
@functools.cache
def imported(src: Path, module: str) -> frozenset[str]:
    """Modules of ``module``'s own top-level package that its source imports, anywhere in the file
    (function-level imports too), as dotted names that exist under ``src``."""
    path = module_file(src, module)
    if path is None:
        raise ModuleNotFoundError(f"no module {module} under {src}")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(p for p in [*parts[: len(parts) - node.level + 1], base] if p)
            found.add(base)
            # `from pkg import mod` imports the submodule pkg.mod when there is one
            found.update(f"{base}.{alias.name}" for alias in node.names)
    top = module.split(".")[0]
    return frozenset(m for m in found if m.split(".")[0] == top and module_file(src, m))


def closure(src: Path, module: str) -> set[str]:
    """``module``, every module it imports directly or indirectly, and the packages of each."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
        todo.extend(imported(src, name))
    return seen


def _digest(files: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def _module_hash(src: Path, module: str) -> str:
    if module_file(src, module) is None:
        raise ValueError(f"no module {module} under {src}")
    return _digest([module_file(src, name) for name in sorted(closure(src, module))], src)


def code_hash(src: str | Path, entry: str) -> str:
    """sha256 of the source of ``entry``'s module ("pkg.module:function") and of its
    :func:`closure`, each file with its path below ``src``."""
    module = entry.partition(":")[0]
    try:
        return _module_hash(Path(src).resolve(), module)
    except ValueError as err:
        raise ValueError(f"stage entry {entry!r}: {err}") from None


def tree_hash(root: str | Path, files: Iterable[str | Path]) -> str:
    """sha256 of ``files`` (in the order given), each with its path below ``root``."""
    root = Path(root)
    return _digest((root / f for f in files), root)
