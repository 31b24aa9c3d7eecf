"""chanprune: structured channel pruning for trained CNNs (checkpoint in, smaller verified checkpoint out).

The recipes behind the commands (`prune_checkpoint`, `score_checkpoint`, ...) and their options
objects (`PruneOptions`, `ModelOptions`, ...) are importable from here: every name of
`recipes.__all__`. They load on first use, so that `chanprune --help` does not import torch.
"""

from __future__ import annotations

import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    # One source of truth: the version in pyproject.toml, as installed.
    __version__: str = version("chanprune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__all__":
        from . import recipes

        return ["__version__", *recipes.__all__]
    # A submodule (`from chanprune_cli import measure`) or a private name is no recipe: looking it
    # up must not import the recipes (and torch).
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is None:
        from . import recipes

        if name in recipes.__all__:
            return getattr(recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    from . import recipes

    return sorted({*globals(), *recipes.__all__})
