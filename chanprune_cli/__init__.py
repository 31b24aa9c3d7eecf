"""chanprune: structured channel pruning for trained CNNs (checkpoint in, smaller verified checkpoint out).

The recipes behind the commands (`prune_checkpoint`, `score_checkpoint`, ...; see `recipes`) are
importable from here; they load on first use, so that `chanprune --help` does not import torch.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    # One source of truth: the version in pyproject.toml, as installed.
    __version__: str = version("chanprune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "AnalyzeResult",
    "BenchResult",
    "ExportOutcome",
    "FinetuneOptions",
    "FinetuneResult",
    "PruneResult",
    "ResolvedCriterion",
    "ScoreResult",
    "__version__",
    "analyze_checkpoint",
    "bench_checkpoints",
    "export_checkpoint",
    "export_format",
    "finetune_checkpoint",
    "prune_checkpoint",
    "score_checkpoint",
]
_RECIPES = frozenset(__all__) - {"__version__"}  # loaded from .recipes on first use


def __getattr__(name: str) -> Any:
    if name in _RECIPES:
        from . import recipes

        return getattr(recipes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_RECIPES})
