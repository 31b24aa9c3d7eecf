"""Which folder entries a data source sees: hidden names are skipped everywhere.

Owns the hidden-name rule (dot files, macOS `__MACOSX` folders) shared by image folders and the
MNIST IDX search, and the sorted listing of visible subfolders.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["is_hidden", "visible_subdirs"]


def is_hidden(name: str) -> bool:
    """Dot files and folders, and the `__MACOSX` folder macOS archivers add."""
    return name.startswith(".") or name == "__MACOSX"


def visible_subdirs(path: Path) -> list[Path]:
    """The non-hidden subfolders of `path` (symlinks followed), sorted by name."""
    with os.scandir(path) as it:
        return sorted(
            (Path(e.path) for e in it if not is_hidden(e.name) and e.is_dir()), key=lambda p: p.name
        )
