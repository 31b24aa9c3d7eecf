"""Safe output files: refuse surprise overwrites, check writability early, write atomically."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import UserError


def check_output(path: str | os.PathLike[str], force: bool = False) -> Path:
    """Fail fast (before any long computation) if `path` cannot or should not be written."""
    out = Path(path)
    if out.exists() and out.is_dir():
        raise UserError(f"output {out} is a directory; give a file path")
    if out.exists() and not force:
        raise UserError(f"output {out} already exists; pass --force to overwrite it")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination's directory; rename it over `path` on success.

    On any exception (Ctrl-C included) the temporary file is removed, so no partial output remains.
    """
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates files 0600, and some writers (safetensors' save_file) replace the file
        # with a private one of their own: the finished output gets the usual permissions of a new
        # file (0666 - umask) just before it is renamed into place.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, out)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """`safetensors.torch.save_file`, but with the metadata keys in sorted order: the library
    writes them in hash order, so the same model gave different bytes from one run to the next.
    The header is re-serialised the way the library writes it (compact JSON, space padding)."""
    from safetensors.torch import save

    data = save(dict(tensors), metadata=dict(metadata))
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    if "__metadata__" in header:
        header = {"__metadata__": dict(sorted(header["__metadata__"].items())),
                  **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= size:  # the same content in another order: the same length
        data = data[:8] + text.ljust(size, b" ") + data[8 + size:]
    Path(path).write_bytes(data)
