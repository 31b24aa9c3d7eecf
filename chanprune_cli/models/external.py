"""Architectures chanprune does not define: `torchvision:NAME`, `timm:NAME` and user `package.module:factory`.

All build untrained models only; a kwarg that would make torchvision or timm download or load
weights is refused.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from typing import Any

from torch import nn

from ..errors import UserError
from .spec import ArchSpec, canonical_json

__all__ = ["build_torchvision", "build_timm", "timm_input_shape", "build_factory", "ensure_cwd_importable"]

_IDENT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _reject_weight_download(spec: ArchSpec) -> None:
    # torchvision factories download weights for these; chanprune never downloads anything.
    for key, value in spec.kwargs.items():
        if (key.startswith("weights") and value is not None) or (key.startswith("pretrained") and value):
            raise UserError(
                f"{spec.name}: kwarg {key}={value!r} would download weights; chanprune builds untrained "
                "architectures only — drop it and load your weights from the checkpoint file"
            )


def build_torchvision(spec: ArchSpec) -> nn.Module:
    """`torchvision:NAME` → that torchvision model, randomly initialised."""
    import torchvision
    from torchvision.models import get_model, list_models

    tv_name = spec.name.split(":", 1)[1].strip()
    if not tv_name:
        raise UserError("torchvision: needs a model name, e.g. torchvision:resnet18")
    _reject_weight_download(spec)
    available = list_models()
    if tv_name.lower() not in available:
        close = difflib.get_close_matches(tv_name.lower(), available, n=3)
        hint = f"; did you mean {', '.join('torchvision:' + c for c in close)}?" if close else ""
        raise UserError(f"torchvision has no model {tv_name!r}{hint}")
    kwargs = {k: v for k, v in spec.kwargs.items() if not k.startswith(("weights", "pretrained"))}
    builder = torchvision.models.get_model_builder(tv_name.lower())
    if "weights_backbone" in inspect.signature(builder).parameters:
        # detection and segmentation models default to downloading ImageNet backbone weights
        kwargs["weights_backbone"] = None
    try:
        return get_model(tv_name.lower(), weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build {spec.name} with kwargs {canonical_json(spec.kwargs)}: {exc}") from None


def _timm() -> Any:
    try:
        import timm  # here: optional, and slow to import
    except ImportError:
        raise UserError("--arch timm:NAME needs timm, an optional extra: pip install 'chanprune[timm]'") from None
    return timm


def _timm_name(spec: ArchSpec) -> str:
    name = spec.name.split(":", 1)[1].strip()
    if not name:
        raise UserError("timm: needs a model name, e.g. timm:resnet18")
    return name


def build_timm(spec: ArchSpec) -> nn.Module:
    """`timm:NAME` (or `timm:NAME.TAG`) → that timm model, randomly initialised (`pretrained=False`)."""
    name = _timm_name(spec)
    if spec.kwargs.get("pretrained"):
        raise UserError(f"{spec.name}: kwarg pretrained={spec.kwargs['pretrained']!r} would download weights; chanprune "
                        "builds untrained architectures only — drop it and load your weights from the checkpoint file")
    if spec.kwargs.get("checkpoint_path"):
        raise UserError(f"{spec.name}: kwarg checkpoint_path would load weights with timm's own loader; drop it and "
                        "give the weights file to chanprune, which reads it safely")
    timm = _timm()
    from timm.models import parse_model_name, split_model_name_tag

    source, _ = parse_model_name(name)
    if source:  # hf-hub:/local-dir: fetch or read a configuration (and weights) from elsewhere
        raise UserError(f"{spec.name}: {source}: models are not supported; name a timm architecture, e.g. timm:resnet18")
    arch = split_model_name_tag(name)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch.lower(), timm.list_models(), n=3)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise UserError(f"timm has no model {arch!r}{hint}")
    kwargs = {k: v for k, v in spec.kwargs.items() if k != "pretrained"}
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # noqa: BLE001  (timm reports bad kwargs as TypeError, AssertionError, ...)
        raise UserError(f"cannot build {spec.name} with kwargs {canonical_json(spec.kwargs)}: {type(exc).__name__}: {exc}") from None


def timm_input_shape(spec: ArchSpec) -> tuple[int, int, int] | None:
    """The C,H,W input timm's configuration gives `timm:NAME` (its `in_chans`/`img_size` kwargs
    first); None when timm is missing or does not know the model."""
    try:
        import timm
    except ImportError:
        return None
    try:
        cfg = timm.get_pretrained_cfg(_timm_name(spec))
    except Exception:  # noqa: BLE001  (an unknown name: building the model will say so)
        return None
    if cfg is None or not cfg.input_size:
        return None
    channels, height, width = cfg.input_size
    size = spec.kwargs.get("img_size")
    if isinstance(size, int):
        height = width = size
    elif isinstance(size, (list, tuple)) and len(size) == 2:
        height, width = size
    in_chans = spec.kwargs.get("in_chans")
    return (in_chans if isinstance(in_chans, int) else channels, int(height), int(width))


def ensure_cwd_importable() -> None:
    """Put the current directory on sys.path, so `pkg.mod:factory` and pickled classes resolve."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()


def build_factory(spec: ArchSpec) -> nn.Module:
    """`package.module:factory` → `factory(**kwargs)`, imported from the current directory if need be."""
    module_name, _, attr_path = spec.name.partition(":")
    if not _IDENT_PATH.match(module_name) or not _IDENT_PATH.match(attr_path):
        raise UserError(f"--arch {spec.name!r} is not of the form package.module:factory")
    if module_name == "torchvision" or module_name.startswith("torchvision."):
        _reject_weight_download(spec)
    ensure_cwd_importable()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UserError(
            f"cannot import {module_name!r} for --arch {spec.name} ({exc}); run chanprune from the directory that contains it"
        ) from None
    except Exception as exc:  # noqa: BLE001  (the user's module failed at import time; report it in one line)
        raise UserError(f"importing {module_name!r} for --arch {spec.name} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise UserError(f"module {module_name!r} has no attribute {attr_path!r} (from --arch {spec.name})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"{spec.name} is not callable; point --arch at a function or class that returns an nn.Module")
    try:
        model = obj(**spec.kwargs)
    except Exception as exc:  # noqa: BLE001  (the user's factory failed: report it in one line)
        raise UserError(f"calling {spec.name}(**{canonical_json(spec.kwargs)}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model
