"""chanprune: structured channel pruning for trained CNNs (checkpoint in, smaller verified checkpoint out)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    # One source of truth: the version in pyproject.toml, as installed.
    __version__: str = version("chanprune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
