"""The package layout of docs/architecture.md holds: imports only run down the pipeline's layers.

Every `from ..x import y` / `from .x import y` inside chanprune_cli is resolved to its target
package; a module may import its own layer or any layer below it, never one above. This keeps the
engine free of criteria and the CLI, the library free of the CLI, and so on.

Size goals: a library function past 100 lines or 15 parameters, or a module past 700 lines, is
split.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "chanprune_cli"

# Lowest first. A top-level module or package name -> its layer.
LAYERS = [
    {"errors"},
    {"support"},
    {"models"},
    {"engine"},
    {"checkpoint", "data", "measure"},
    {"criteria"},
    {"prune"},
    {"train"},
    {"deploy"},
    {"latency"},
    {"recipes"},
    {"project"},
    {"report"},
    {"cli"},
    {"demo", "__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _unit(module_path: Path) -> str:
    """The top-level unit (first component under chanprune_cli) a file belongs to."""
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[str, int]]:
    """(target top-level unit, line) of every intra-package import in `path`."""
    rel_parts = path.relative_to(PACKAGE).with_suffix("").parts
    package = list(rel_parts[:-1]) if rel_parts[-1] != "__init__" else list(rel_parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            if target:
                out.append((target[0], node.lineno))
            else:  # `from .. import x`: x may be a unit itself, or a name of the package root
                out.extend((alias.name, node.lineno) for alias in node.names if alias.name in LAYER)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chanprune_cli."):
            out.append((node.module.split(".")[1], node.lineno))
    return out


def test_every_unit_has_a_layer() -> None:
    units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert units <= set(LAYER), f"add these to LAYERS (and docs/architecture.md): {sorted(units - set(LAYER))}"


def test_imports_never_run_upward() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = _unit(path)
        if unit == "__init__":
            continue  # the package root only re-exports (lazily)
        for target, line in _imports(path):
            if target in LAYER and LAYER[target] > LAYER[unit]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {unit} -> {target}")
    assert not upward, "imports running up the layers:\n" + "\n".join(upward)


# A function past these is hard to read whole and to test in parts; a module past the last one
# holds more than one concern. cli/ is exempt from the function limits: a command function takes
# one parameter per option, as Typer declares options.
MAX_FUNCTION_LINES = 100
MAX_FUNCTION_PARAMETERS = 15
MAX_MODULE_LINES = 700


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function, method and nested function in `tree`."""

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + child.name, child
                yield from walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters a caller can pass (`*args` and `**kwargs` count one each), `self`/`cls` not counted."""
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    count = len(names) + len(args.kwonlyargs) + (args.vararg is not None) + (args.kwarg is not None)
    return count - (1 if names and names[0] in ("self", "cls") else 0)


def _lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """From the `def` line (decorators not counted) to the last line, docstring included."""
    return (node.end_lineno or node.lineno) - node.lineno + 1


def test_library_functions_stay_small() -> None:
    too_big = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli":
            continue
        for name, node in _functions(ast.parse(path.read_text(encoding="utf-8"))):
            where = f"chanprune_cli/{rel.as_posix()}:{node.lineno} {name}"
            if _lines(node) > MAX_FUNCTION_LINES:
                too_big.append(f"{where}: {_lines(node)} lines (at most {MAX_FUNCTION_LINES})")
            if _parameters(node) > MAX_FUNCTION_PARAMETERS:
                too_big.append(f"{where}: {_parameters(node)} parameters (at most {MAX_FUNCTION_PARAMETERS})")
    assert not too_big, "functions outside cli/ to split:\n" + "\n".join(too_big)


def test_modules_stay_small() -> None:
    too_big = [f"chanprune_cli/{path.relative_to(PACKAGE).as_posix()}: {n} lines (at most {MAX_MODULE_LINES})"
               for path in sorted(PACKAGE.rglob("*.py"))
               if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES]
    assert not too_big, "modules to split:\n" + "\n".join(too_big)
