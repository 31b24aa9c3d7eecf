"""Checking a checkpoint path is a readable, non-empty file and telling its form by content."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError

__all__ = ["check_input", "sniff"]


def check_input(path: str | os.PathLike[str]) -> Path:
    """The path of a readable, non-empty file; UserError naming what is wrong otherwise."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"checkpoint {p} does not exist; check the path")
    if p.is_dir():
        raise UserError(f"checkpoint {p} is a directory; pass a checkpoint file")
    try:
        size = p.stat().st_size
        with p.open("rb"):
            pass
    except OSError as exc:
        raise UserError(f"cannot read checkpoint {p}: {exc.strerror or exc}") from None
    if size == 0:
        raise UserError(f"checkpoint {p} is empty (0 bytes); the download or save did not finish, fetch or save it again")
    return p


def sniff(p: Path) -> str:
    """'safetensors' | 'zip' | 'pickle' | 'unknown', decided by content, never by extension."""
    with p.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: torch's legacy (pre-zip) format
        return "pickle"
    return "unknown"
