"""The package layout of docs/architecture.md holds: imports only run down the pipeline's layers.

Every `from ..x import y` / `from .x import y` inside chanprune_cli is resolved to its target
package; a module may import its own layer or any layer below it, never one above. This keeps the
engine free of criteria and the CLI, the library free of the CLI, and so on.
"""

from __future__ import annotations

import ast
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
