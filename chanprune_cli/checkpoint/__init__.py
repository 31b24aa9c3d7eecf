"""Reading every checkpoint form (DESIGN §3) and writing the chanprune format.

Forms read: bare or wrapped state dicts (torch.save, always `weights_only=True`), safetensors,
whole pickled modules (only with `trust_pickle=True`), and chanprune files (safetensors whose
metadata key `chanprune` holds the architecture, module shapes, plans and history).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import shapes
from ..errors import UserError
from ..support.fsutil import atomic_path, check_output
from ..models import (
    ArchSpec,
    build_model,
    builtin_archs,
    ensure_cwd_importable,
    parse_arch,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_state_dict_file",
    "save_chanprune",
    "safetensors_metadata",
    "nonfinite_tensors",
    "tool_version",
]

FORMAT_NAME = "chanprune"
FORMAT_VERSION = 1
METADATA_KEY = "chanprune"

# Keys under which training scripts commonly nest the model's state dict, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
# Path segments added by nn.DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod"})
_ARCH_EXAMPLES = "e.g. cifar_resnet56, torchvision:resnet18, mypkg.models:make_net"


def tool_version() -> str:
    """chanprune's version: `chanprune_cli.__version__` if set, else the installed metadata."""
    import chanprune_cli

    version = getattr(chanprune_cli, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("chanprune")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0.1.0"


@dataclass
class LoadedCheckpoint:
    """A model ready to use (eval mode, CPU) plus what its file recorded."""

    model: nn.Module
    arch: ArchSpec | None
    source_format: str  # "state_dict" | "safetensors" | "pickle" | "chanprune"
    input_shape: tuple[int, int, int] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Input file checks and format sniffing
# --------------------------------------------------------------------------------------------


def _check_input(path: str | os.PathLike[str]) -> Path:
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


def _sniff(p: Path) -> str:
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


# --------------------------------------------------------------------------------------------
# safetensors: validate the header ourselves so lies become UserErrors, not huge allocations
# --------------------------------------------------------------------------------------------

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


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
    p = _check_input(path)
    if _sniff(p) != "safetensors":
        return None
    return _read_safetensors_header(p)[1]


# --------------------------------------------------------------------------------------------
# torch.load: weights_only=True always, unless the user trusts the file
# --------------------------------------------------------------------------------------------


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # torch appends paragraphs of advice; the first sentence carries the cause.
    return text[0].split(". ")[0][:200] if text else type(exc).__name__


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


def _torch_load(p: Path, trust_pickle: bool) -> Any:
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
    except Exception as exc:  # zip/stream errors, EOF, bad magic number: all mean a damaged file
        message = str(exc)
        if "TorchScript" in message:
            raise UserError(f"{p} is a TorchScript archive; chanprune needs an eager model's weights: use torch.save(model.state_dict()) "
                            "in the training script and pass --arch") from None
        raise UserError(f"{p} is corrupt or truncated ({_first_line(exc)}); fetch or save it again") from None
    # The user vouched for this file: a full unpickle (this can run code from the file).
    ensure_cwd_importable()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise UserError(f"{p} refers to code that cannot be imported ({_first_line(exc)}); run from the directory that contains it") from None
    except Exception as exc:
        raise UserError(f"{p} is corrupt or not a PyTorch checkpoint ({_first_line(exc)})") from None


# --------------------------------------------------------------------------------------------
# Finding the weights inside whatever was loaded
# --------------------------------------------------------------------------------------------


def _is_state_dict(obj: Any) -> bool:
    """A mapping of str → tensors (non-tensor extras allowed), not a wrapper around one."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    if any(isinstance(v, Mapping) and _holds_tensors(v) for v in obj.values()):
        return False
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_tensors(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _holds_tensors(v)) for v in obj.values())


def _find_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        for key in ("model", "net", "module"):
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _find_state_dict(obj: Any, p: Path, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """Detect the state dict: known wrapper keys first, then the object itself, then a lone nested one."""
    if not isinstance(obj, Mapping) or depth > 4:
        return None
    for key in _WRAPPER_KEYS:
        if key in obj:
            found = _find_state_dict(obj[key], p, depth + 1)
            if found is not None:
                return found
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    candidates = {}
    for key, value in obj.items():
        found = _find_state_dict(value, p, depth + 1) if isinstance(value, Mapping) else None
        if found is not None:
            candidates[str(key)] = found
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        # Several sets of weights (e.g. model and EMA) and no standard key: refuse to guess.
        raise UserError(
            f"{p} holds several sets of weights (under {', '.join(sorted(candidates)[:5])}); "
            f"save the one you want as a plain state dict or under 'state_dict'"
        )
    return None


def _arch_hint(obj: Any) -> str:
    if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) and obj["arch"].strip():
        return f"; the file mentions arch {obj['arch'].strip()!r}"
    return ""


# --------------------------------------------------------------------------------------------
# Matching keys to the model and loading
# --------------------------------------------------------------------------------------------


def _strip_segments(key: str) -> str:
    return ".".join(s for s in key.split(".") if s not in _WRAPPER_SEGMENTS)


def _key_candidates(sd: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The state dict as-is, without DataParallel/compile segments, and without a shared first segment."""
    out: list[dict[str, torch.Tensor]] = []

    def add(mapping: dict[str, torch.Tensor]) -> None:
        if mapping and all(mapping.keys() != c.keys() for c in out):
            out.append(mapping)

    def renamed(rename: Any, source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        mapping = {rename(k): v for k, v in source.items()}
        return mapping if len(mapping) == len(source) and all(mapping) else {}  # collisions: unusable

    def drop_first(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heads = {k.split(".", 1)[0] for k in source}
        if len(heads) != 1 or not all("." in k for k in source):
            return {}
        return renamed(lambda k: k.split(".", 1)[1], source)

    add(sd)
    add(renamed(_strip_segments, sd))
    for base in list(out):
        once = drop_first(base)
        add(once)
        if once:
            add(drop_first(once))
    return out


def _match_keys(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """The candidate renaming that matches the most model keys (ties keep the file's own names)."""
    best, best_score = sd, -1
    for cand in _key_candidates(sd):
        score = len(model_keys.intersection(cand))
        if score > best_score:
            best, best_score = cand, score
    return best


def _ignorable(key: str) -> bool:
    # BN's step counter: absent from many published checkpoints, never affects inference.
    return key.endswith("num_batches_tracked")


def _list(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _fit_problems(model: nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """One-line description of how `sd` fails to fit `model`, or None when it fits."""
    model_sd = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    missing = [k for k in model_sd if k not in sd and not _ignorable(k)]
    unexpected = [k for k in sd if k not in model_sd and not _ignorable(k)]
    mismatched = [
        f"{k} (file {list(sd[k].shape)} vs model {list(model_sd[k].shape)})"
        for k in sd
        if k in model_sd and not _ignorable(k) and tuple(sd[k].shape) != tuple(model_sd[k].shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_list(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {_list(mismatched)}")
    return "; ".join(parts) if parts else None


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes implied by a standard module's channel attributes."""
    if isinstance(module, nn.modules.conv._ConvNd):
        k = tuple(module.kernel_size)
        if module.transposed:
            w = (module.in_channels, module.out_channels // module.groups, *k)
        else:
            w = (module.out_channels, module.in_channels // module.groups, *k)
        return {"weight": w, "bias": (module.out_channels,)}
    if isinstance(module, nn.modules.batchnorm._NormBase):
        n = (module.num_features,)
        return {"weight": n, "bias": n, "running_mean": n, "running_var": n}
    if isinstance(module, nn.Linear):
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}
    if isinstance(module, nn.GroupNorm):
        return {"weight": (module.num_channels,), "bias": (module.num_channels,)}
    if isinstance(module, nn.LayerNorm):
        return {"weight": tuple(module.normalized_shape), "bias": tuple(module.normalized_shape)}
    if isinstance(module, nn.PReLU):
        return {"weight": (module.num_parameters,)}
    return {}


def _attr_shape_problems(model: nn.Module) -> str | None:
    """Tensors whose shape disagrees with their module's recorded channel attributes."""
    bad = []
    for name, module in model.named_modules():
        for tname, expected in _expected_shapes(module).items():
            tensor = getattr(module, tname, None)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != expected:
                key = f"{name}.{tname}" if name else tname
                bad.append(f"{key} (file {list(tensor.shape)} vs recorded {list(expected)})")
    return f"{len(bad)} shape mismatch(es): {_list(bad)}" if bad else None


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    model_keys = set(model.state_dict())
    # Already checked by _fit_problems; strict=False only tolerates the ignorable counters.
    model.load_state_dict({k: v for k, v in sd.items() if k in model_keys}, strict=False)


def _fit_weights(model: nn.Module, sd: dict[str, torch.Tensor], p: Path, spec: ArchSpec) -> None:
    sd = _match_keys(sd, set(model.state_dict()))
    problem = _fit_problems(model, sd)
    if problem:
        raise UserError(f"weights in {p} do not fit --arch {spec}: {problem}; check --arch/--arch-kwargs")
    _load_into(model, sd)


# --------------------------------------------------------------------------------------------
# Public loading API
# --------------------------------------------------------------------------------------------


def _resolve_spec(arch: str | ArchSpec, arch_kwargs: str | dict[str, Any] | None) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch if arch_kwargs is None else parse_arch(arch.name, arch_kwargs)
    return parse_arch(arch, arch_kwargs)


def load_checkpoint(
    path: str | os.PathLike[str],
    arch: str | ArchSpec | None = None,
    arch_kwargs: str | dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load any supported checkpoint form into an eval-mode CPU model. UserError on every bad input.

    A chanprune file carries its own architecture, so `arch`/`arch_kwargs` are ignored for it, except
    that a recorded `package.module:factory` is only imported when `arch` names the same factory or
    `trust_pickle` is set (building it runs code the file names).
    """
    p = _check_input(path)
    kind = _sniff(p)
    module: nn.Module | None = None
    hint = ""
    if kind == "safetensors":
        tensors, metadata = _read_safetensors(p)
        if METADATA_KEY in metadata:
            return _load_chanprune(p, tensors, metadata[METADATA_KEY], arch=arch, trust_code=trust_pickle)
        sd: dict[str, torch.Tensor] | None = tensors
        source = "safetensors"
    elif kind in ("zip", "pickle"):
        obj = _torch_load(p, trust_pickle)
        module = _find_module(obj)
        sd = None if module is not None else _find_state_dict(obj, p)
        source = "pickle" if module is not None else "state_dict"
        hint = _arch_hint(obj)
        if module is None and sd is None:
            raise UserError(f"{p} holds no model weights (no state dict of tensors found)")
    else:
        raise UserError(f"{p} is not a PyTorch checkpoint (torch.save) or safetensors file (unrecognised content); pass the model's weights file")

    if module is not None and arch is None:
        module = module.to("cpu").eval()
        return LoadedCheckpoint(model=module, arch=None, source_format="pickle")
    if arch is None:
        raise UserError(f"{p} holds only weights; pass --arch ({_ARCH_EXAMPLES}){hint}")
    spec = _resolve_spec(arch, arch_kwargs)
    model = build_model(spec)
    if module is not None:
        sd = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sd is not None
    _fit_weights(model, sd, p, spec)
    return LoadedCheckpoint(model=model.to("cpu").eval(), arch=spec, source_format=source)


def load_state_dict_file(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors of a file (state dict found inside wrappers; key names untouched)."""
    p = _check_input(path)
    kind = _sniff(p)
    if kind == "safetensors":
        return _read_safetensors(p)[0]
    if kind not in ("zip", "pickle"):
        raise UserError(f"{p} is not a PyTorch checkpoint (torch.save) or safetensors file (unrecognised content); pass the model's weights file")
    obj = _torch_load(p, trust_pickle)
    module = _find_module(obj)
    if module is not None:
        return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = _find_state_dict(obj, p)
    if sd is None:
        raise UserError(f"{p} holds no tensors (no state dict found)")
    return sd


def _confirmed_factory(spec: ArchSpec, arch: str | ArchSpec | None, trust_code: bool) -> bool:
    """Whether building `spec` may run code the user did not name.

    Built-ins and `torchvision:NAME` only construct known models. A `package.module:factory` record
    imports and calls whatever the file names (e.g. `subprocess:run`), so a downloaded chanprune
    file may only do that when the user names the same factory with --arch or trusts the file.
    """
    if spec.name in builtin_archs() or spec.name.startswith("torchvision:") or ":" not in spec.name:
        return True
    named = arch.name if isinstance(arch, ArchSpec) else arch
    return trust_code or (isinstance(named, str) and named.strip() == spec.name)


_DAMAGED = "; the file is damaged or was edited, re-create it with chanprune prune"


def _load_chanprune(p: Path, tensors: dict[str, torch.Tensor], raw: str, *, arch: str | ArchSpec | None = None,
                    trust_code: bool = False) -> LoadedCheckpoint:
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"{p}: chanprune metadata is not valid JSON (file damaged?); re-create it with chanprune") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise UserError(f"{p}: chanprune metadata is malformed (no 'format': 'chanprune'){_DAMAGED}")
    version = doc.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(f"{p}: chanprune metadata has an invalid format_version {version!r}{_DAMAGED}")
    if version > FORMAT_VERSION:
        raise UserError(f"{p} was made by a newer chanprune (format {version}); upgrade chanprune")
    spec = ArchSpec.from_json(doc.get("arch"))  # type: ignore[arg-type]
    if not _confirmed_factory(spec, arch, trust_code):
        raise UserError(
            f"{p} records architecture {spec.name}, a package.module:factory that chanprune would import and call "
            f"(code named by the file); if you trust it, pass --arch {spec.name} (or --trust-pickle)"
        )
    module_shapes = doc.get("module_shapes") or {}
    if not isinstance(module_shapes, dict):
        raise UserError(f"{p}: chanprune metadata is malformed (module_shapes is not an object){_DAMAGED}")
    input_shape = doc.get("input_shape")
    if input_shape is not None:
        if not (isinstance(input_shape, list) and len(input_shape) == 3 and all(isinstance(d, int) and d > 0 for d in input_shape)):
            raise UserError(f"{p}: chanprune metadata has an invalid input_shape {input_shape!r}{_DAMAGED}")
        input_shape = tuple(input_shape)
    history, plans, meta = doc.get("history") or [], doc.get("plans") or [], doc.get("meta") or {}
    if not isinstance(history, list) or not isinstance(plans, list) or not isinstance(meta, dict):
        raise UserError(f"{p}: chanprune metadata is malformed (history/plans must be lists, meta an object){_DAMAGED}")

    try:
        model = build_model(spec)
    except UserError as exc:
        raise UserError(f"{p} records architecture {spec}, which cannot be built: {exc}; make it importable here "
                        "or re-create the file") from None
    try:
        shapes.apply_shape_attrs(model, module_shapes, {k: tuple(v.shape) for k, v in tensors.items()})
        problem = _fit_problems(model, tensors) or _attr_shape_problems(model)
    except KeyError as exc:
        raise UserError(f"{p} records module {exc.args[0]!r}, which {spec} does not have{_DAMAGED}") from None
    except (TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError) as exc:
        raise UserError(f"{p}: recorded module shapes cannot be applied to {spec} ({_first_line(exc)}){_DAMAGED}") from None
    if problem:
        raise UserError(f"weights in {p} do not fit its recorded plan for {spec}: {problem}; the file is damaged or was edited, re-create it with chanprune prune")
    _load_into(model, tensors)
    if input_shape is not None:
        # apply_shape_attrs sizes tensors from the file, so a lying file could still leave
        # neighbouring layers inconsistent; one dummy forward settles it cheaply.
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *input_shape))
        except Exception as exc:
            raise UserError(
                f"weights in {p} do not fit its recorded plan for {spec}: forward pass fails ({_first_line(exc)}); "
                "the file is damaged or was edited, re-create it with chanprune prune"
            ) from None
    return LoadedCheckpoint(
        model=model.to("cpu").eval(),
        arch=spec,
        source_format="chanprune",
        input_shape=input_shape,  # type: ignore[arg-type]
        history=history,
        plans=plans,
        meta=meta,
    )


# --------------------------------------------------------------------------------------------
# Saving the chanprune format
# --------------------------------------------------------------------------------------------


def _json_default(value: Any) -> Any:
    # Plans and histories often carry tensors / tuples / paths; store them as plain JSON.
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def save_chanprune(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: ArchSpec | None,
    *,
    input_shape: tuple[int, int, int] | list[int] | None,
    history: list[dict[str, Any]],
    plans: list[dict[str, Any]],
    meta: dict[str, Any] | None = None,
    force: bool = False,
) -> None:
    """Write `model` as one chanprune safetensors file (atomic; refuses to overwrite unless force)."""
    from safetensors.torch import save_file

    out = check_output(path, force)
    if arch is None:
        raise UserError("cannot save a chanprune checkpoint without an architecture; load the weights with --arch instead of a pickled module")
    # Independent contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {
        k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "arch": arch.to_json(),
        "input_shape": list(input_shape) if input_shape is not None else None,
        "module_shapes": shapes.shape_attrs(model),
        "plans": list(plans),
        "history": list(history),
        "meta": dict(meta or {}),
        "tool_version": tool_version(),
        "torch_version": torch.__version__,
    }
    try:
        text = json.dumps(doc, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot record checkpoint metadata as JSON: {exc}") from None
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text, "format": "pt"})


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of floating parameters/buffers that contain NaN or Inf (callers decide what to do)."""
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is not None and (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad
