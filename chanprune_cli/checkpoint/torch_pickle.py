"""torch.load made safe: always `weights_only=True` (plus an allow-list of harmless types) and a
zip-bomb check first; a full unpickle only when the user trusts the file (`--trust-pickle`)."""

from __future__ import annotations

import argparse
import pickle
import re
import warnings
from importlib import metadata
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


_MISSING_ATTRIBUTE = re.compile(r"Can't get attribute '([^']+)' on <module '([^']+)'")


def _unimportable(p: Path, exc: Exception) -> str:
    """The one line for a trusted pickle naming code that cannot be imported here: the package
    (and the version the file says made it, ultralytics' checkpoints record it) when the code
    belongs to an installed or recorded package, else where to run from."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        missing = exc.name
    else:
        found = _MISSING_ATTRIBUTE.search(str(exc))
        missing = f"{found.group(2)}.{found.group(1)}" if found else ""
    package = missing.split(".")[0]
    recorded = _recorded_version(p)
    try:
        installed: str | None = metadata.version(package) if package else None
    except metadata.PackageNotFoundError:
        installed = None
    if not package or (recorded is None and installed is None):
        return f"{p} refers to code that cannot be imported ({first_line(exc)}); run from the directory that contains it"
    made = f"{package} {recorded}" if recorded else package
    fix = f"pip install '{package}=={recorded}'" if recorded else f"pip install {package}"
    if installed is None:
        return f"{p} was saved with {made}, which is not installed here; install it ({fix}) to load this whole pickled model"
    return (f"{p} was saved with {made}, whose {missing} cannot be imported with the {package} {installed} installed "
            f"here ({first_line(exc)}); install the version that saved it ({fix})")


def _recorded_version(p: Path) -> str | None:
    """The 'version' string a checkpoint dict records (ultralytics writes its own), read from the
    pickle's opcodes without running them; None when there is none."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                name = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
                data = zf.read(name) if name is not None else b""
        else:
            data = p.read_bytes()
        strings = [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]
        for key, value in zip(strings, strings[1:]):  # a dict's string key, then its string value
            if key == "version" and re.fullmatch(r"\d+(\.\d+)+\S*", value):
                return value
    except Exception:  # noqa: BLE001  (a damaged pickle: the caller's message stands without a version)
        return None
    return None


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
        raise UserError(_unimportable(p, exc)) from None
    except Exception as exc:  # noqa: BLE001  (unpickling runs the file's own code: any error means a bad file)
        raise UserError(f"{p} is corrupt or not a PyTorch checkpoint ({first_line(exc)})") from None
