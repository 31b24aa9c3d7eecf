"""torch.load made safe: always `weights_only=True` (plus an allow-list of harmless types) and a
zip-bomb check first; a full unpickle only when the user trusts the file (`--trust-pickle`)."""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..models import ensure_cwd_importable
from . import moved_classes
from .messages import first_line

__all__ = ["torch_load"]


def _safe_globals() -> list[Any]:
    """Harmless non-tensor types training scripts often store next to weights (accuracy, args)."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        try:
            from numpy._core import multiarray as ma  # numpy >= 2
        except ImportError:  # pragma: no cover - numpy 1.x
            from numpy.core import multiarray as ma  # type: ignore[no-redef]
        allowed += [np.dtype, np.ndarray, ma.scalar, ma._reconstruct]
        # Files written under numpy 1.x name these by their old module path.
        allowed += [(ma.scalar, "numpy.core.multiarray.scalar"), (ma._reconstruct, "numpy.core.multiarray._reconstruct")]
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    return allowed


# torch's weights-only unpickler names the refused global in one of two phrasings.
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module \S+ is blocked)")


def _unsafe_global(message: str) -> str | None:
    """The global a weights-only load refused, or None when the failure means 'corrupt'."""
    m = _UNSAFE_GLOBAL.search(message)
    if not m:
        return None
    name = m.group(1)
    if name.startswith("torch."):
        # A torch name that does not resolve is a cut-off string in a truncated legacy file.
        obj: Any = torch
        for part in name.split(".")[1:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
    return name


_ZIP_MAX_RATIO = 100  # torch.save stores records uncompressed: real files declare about their own size
_ZIP_FLOOR = 64 * 1024 * 1024


def _check_zip_sizes(p: Path) -> None:
    """Refuse a zip checkpoint declaring far more content than the file holds (a 'zip bomb'):
    torch.load would inflate compressed records into memory of the declared size before any check."""
    import zipfile

    try:
        with zipfile.ZipFile(p) as zf:
            declared = sum(max(int(info.file_size), 0) for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError):
        return  # not a readable zip: torch.load reports the damage itself
    size = p.stat().st_size
    if declared > max(_ZIP_MAX_RATIO * size, _ZIP_FLOOR):
        raise UserError(
            f"{p} declares {declared / 2**20:.0f} MiB of content in a {size / 2**20:.1f} MiB file (a zip bomb?); "
            "refusing to unpack it, fetch the checkpoint again from its source"
        )


def torch_load(p: Path, trust_pickle: bool) -> Any:
    """The object a torch.save file holds, on CPU. UserError on damage or untrusted pickled code."""
    with p.open("rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    if is_zip:
        _check_zip_sizes(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol/version chatter; failures raise anyway
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = _unsafe_global(str(exc))
        if not trust_pickle:
            if unsafe:
                raise UserError(
                    f"{p} contains pickled code/objects ({unsafe}); re-run with --trust-pickle only if you trust its source"
                ) from None
            raise UserError(
                f"{p} is corrupt or not a PyTorch checkpoint (torch.save) or safetensors file; fetch or save it again"
            ) from None
    except Exception as exc:  # noqa: BLE001  (zip/stream errors, EOF, bad magic number: all mean a damaged file)
        message = str(exc)
        if "TorchScript" in message:
            raise UserError(f"{p} is a TorchScript archive; chanprune needs an eager model's weights: use torch.save(model.state_dict()) "
                            "in the training script and pass --arch") from None
        raise UserError(f"{p} is corrupt or truncated ({first_line(exc)}); fetch or save it again") from None
    # The user vouched for this file: a full unpickle (this can run code from the file).
    ensure_cwd_importable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=False, pickle_module=moved_classes)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UserError(f"{p} refers to code that cannot be imported ({first_line(exc)}); "
                        "run from the directory that contains it") from None
    except Exception as exc:  # noqa: BLE001  (unpickling runs the file's own code: any error means a bad file)
        raise UserError(f"{p} is corrupt or not a PyTorch checkpoint ({first_line(exc)})") from None
