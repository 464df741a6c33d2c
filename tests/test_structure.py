"""The package's structure, read from the source: import floors (no import runs upward, none sits
inside a function to dodge a circle) and the docstrings of public definitions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import vistok

SRC = Path(vistok.__file__).parent
# floors, lowest first: a module may import from its own floor and the ones below, never above
FLOORS = [
    {"_version", "weights", "fileio", "images", "schema", "rng", "builtin", "progress"},
    {"tokenizers", "losses"},  # losses/diffusion.py holds MAR's diffusion head, which tokenizers/mar.py builds
    {"train", "convert", "bench"},
    {"cli", "__main__"},
]
# the command line imports inside its commands on purpose: `vistok --help` must not pay for torch
LAZY_BY_DESIGN = {"cli"}
# public definitions without a docstring: the counts this code has reached; lower them, never raise them
MAX_UNDOCUMENTED = {"tokenizers": 0, "convert": 0, "bench": 0, "cli": 0, None: 81}


def _part(module: str) -> str:
    """'vistok.tokenizers.base' -> 'tokenizers'; 'vistok.weights' -> 'weights'."""
    return module.split(".")[1] if module.count(".") else "__init__"


def _floor(part: str) -> int:
    return next(i for i, names in enumerate(FLOORS) if part in names)


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), is_package, ast.parse(path.read_text())


def _vistok_imports(module: str, is_package: bool, tree: ast.Module):
    """(imported vistok module, line, inside a function?) for every import in `tree`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
        elif isinstance(node, ast.Import):
            target = next((a.name for a in node.names if a.name.startswith("vistok")), "")
        else:
            continue
        if target.startswith("vistok"):
            yield target, node.lineno, id(node) in functions


def test_no_import_runs_upward_or_hides_in_a_function():
    upward, hidden = [], []
    for module, is_package, tree in _modules():
        mine = _part(module)
        if mine == "__init__":
            continue
        for target, line, in_function in _vistok_imports(module, is_package, tree):
            theirs = _part(target)
            if theirs == "__init__":
                upward.append(f"{module}:{line} imports the package root")
            elif _floor(theirs) > _floor(mine):
                upward.append(f"{module}:{line} -> {target}")
            elif in_function and theirs != mine and mine not in LAZY_BY_DESIGN:
                hidden.append(f"{module}:{line} -> {target}")
    assert not upward, "imports that run upward: " + "; ".join(upward)
    assert not hidden, "function-local imports of another package (import at the top of the file): " + "; ".join(hidden)


def test_the_bottom_floor_imports_nothing_above_it():
    """vistok.weights is what tokenizers/, losses/, train/ and convert/ load weights with: it must stand alone."""
    for module, is_package, tree in _modules():
        if _part(module) in FLOORS[0]:
            above = [t for t, _, _ in _vistok_imports(module, is_package, tree) if _part(t) not in FLOORS[0]]
            assert not above, f"{module} imports {above}"


def _undocumented(tree: ast.Module) -> list[str]:
    """Public module-level functions and classes, and the public methods of public classes, without a docstring."""
    missing = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(node.name)
            if isinstance(node, ast.ClassDef):
                missing += [f"{node.name}.{m.name}" for m in node.body
                            if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith("_")
                            and ast.get_docstring(m) is None]
    return missing


@pytest.mark.parametrize("part", list(MAX_UNDOCUMENTED))
def test_public_definitions_have_docstrings(part):
    missing = [f"{module}.{name}" for module, _, tree in _modules()
               if part is None or _part(module) == part for name in _undocumented(tree)]
    where = f"vistok.{part}" if part else "vistok"
    assert len(missing) <= MAX_UNDOCUMENTED[part], (
        f"{len(missing)} public definitions in {where} lack a docstring (at most {MAX_UNDOCUMENTED[part]}): "
        + ", ".join(missing[:40]))


def test_the_version_has_one_source():
    import tomllib

    from vistok._version import __version__

    project = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert vistok.__version__ == __version__
