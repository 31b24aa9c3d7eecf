"""Checking a checkpoint path is a readable, non-empty file, telling its form by content, and
naming the forms that are not checkpoints at all (NumPy arrays)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from ..errors import UserError

__all__ = ["check_input", "not_a_checkpoint", "sniff"]

_NPY_MAGIC = b"\x93NUMPY"


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


def _npz_members(p: Path) -> list[str] | None:
    """The array names of a NumPy `.npz` (a zip of `.npy` files only), else None."""
    try:
        with zipfile.ZipFile(p) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError):
        return None  # damaged: the torch reader reports it
    if not names or not all(n.endswith(".npy") for n in names):
        return None
    return [n[: -len(".npy")] for n in names]


def sniff(p: Path) -> str:
    """'safetensors' | 'zip' | 'pickle' | 'npy' | 'npz' | 'unknown', decided by content, never by
    extension (torch.save files are zips too, but never of `.npy` members only)."""
    with p.open("rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "npz" if _npz_members(p) is not None else "zip"
    if head[:6] == _NPY_MAGIC:
        return "npy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: torch's legacy (pre-zip) format
        return "pickle"
    return "unknown"


def not_a_checkpoint(p: Path, kind: str) -> str | None:
    """What a file of form `kind` (`sniff`) is when it is no checkpoint, said as the error does;
    None for the checkpoint forms and unknown content."""
    if kind not in ("npy", "npz"):
        return None
    if kind == "npz":
        names = _npz_members(p) or []
        what = f"a NumPy .npz archive of arrays ({', '.join(names[:4])}{', …' if len(names) > 4 else ''})"
    else:
        what = "a NumPy .npy array"
    return (f"{p} is {what}, not a model checkpoint; pass the model's weights (a torch.save file or safetensors); "
            "image arrays are data: give them to --data")
