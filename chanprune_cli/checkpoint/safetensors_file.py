"""Reading safetensors files: the header is validated here first, so a lying header becomes a
UserError instead of a huge allocation or a crash inside the safetensors library."""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .sniff import check_input, sniff

__all__ = ["read_safetensors", "safetensors_metadata"]

_ST_DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}  # fmt: skip
_ST_MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


def _read_safetensors_header(p: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Validated (tensor entries, metadata) of a safetensors file. UserError on any inconsistency."""
    try:
        return _parse_safetensors_header(p)
    except UserError as exc:
        raise UserError(f"{exc}; fetch or re-create the file") from None


def _parse_safetensors_header(p: Path) -> tuple[dict[str, Any], dict[str, str]]:
    size = p.stat().st_size
    bad = f"{p} is not a valid safetensors file"
    if size < 10:
        raise UserError(f"{bad}: only {size} bytes (truncated?)")
    with p.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n < 2 or n > _ST_MAX_HEADER:
            raise UserError(f"{bad}: implausible header length {n}")
        if n > size - 8:
            raise UserError(f"{bad}: header says {n} bytes but the file has {size - 8} (truncated?)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{bad}: header is not valid JSON (corrupt or truncated)") from None
    if not isinstance(header, dict):
        raise UserError(f"{bad}: header is not a JSON object")
    data_len = size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UserError(f"{bad}: __metadata__ must map strings to strings")
    for name, entry in header.items():
        where = f"{bad}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise UserError(f"{where} has a malformed entry")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ST_DTYPE_SIZES:
            raise UserError(f"{where} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise UserError(f"{where} has a malformed shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise UserError(f"{where} points outside the file (offsets {offsets!r}, {data_len} data bytes; truncated?)")
        if offsets[1] - offsets[0] != math.prod(shape) * _ST_DTYPE_SIZES[dtype]:
            raise UserError(f"{where}: byte range does not match shape {shape} and dtype {dtype}")
    return header, metadata


def read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on CPU, metadata) of a safetensors file. UserError on any damage."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = _read_safetensors_header(p)
    try:
        tensors = load_file(str(p), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"{p} is not a valid safetensors file: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "fetch or re-create the file"
        ) from None
    return dict(tensors), metadata


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """The metadata of a safetensors file (validated header), or None for any other file."""
    p = check_input(path)
    if sniff(p) != "safetensors":
        return None
    return _read_safetensors_header(p)[1]
