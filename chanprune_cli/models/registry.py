"""Architecture resolution: the built-in table, and `build_model` dispatching an `ArchSpec` by form.

Forms: a built-in name (cifar_resnet20…110, digits_cnn), `torchvision:NAME`, `timm:NAME`,
`package.module:factory`.
`build_model(spec)` returns a freshly initialised `nn.Module`, never downloading weights.
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import UserError
from .cifar import CIFAR_DEPTHS, make_cifar
from .digits import make_digits
from .external import build_factory, build_timm, build_torchvision, timm_input_shape
from .spec import ArchSpec

__all__ = ["build_model", "builtin_archs", "default_input_shape", "widened_spec"]

_FORMS_HELP = ("torchvision:<name> (e.g. torchvision:resnet18), timm:<name> (e.g. timm:efficientnet_b0) or "
               "package.module:factory (importable from the current directory)")

# name → (factory of the kwargs, one-line description, natural C,H,W input)
_BUILTINS: dict[str, tuple[Callable[[dict[str, Any]], nn.Module], str, tuple[int, int, int]]] = {
    **{
        f"cifar_resnet{d}": (
            make_cifar(d),
            f"CIFAR ResNet-{d} (He et al., option-A shortcuts, 32x32 input; kwargs: num_classes, width)",
            (3, 32, 32),
        )
        for d in CIFAR_DEPTHS
    },
    "digits_cnn": (
        make_digits,
        "small CNN for 1x8x8 digit images (3 conv + 2 linear; kwargs: num_classes, width)",
        (1, 8, 8),
    ),
}

# Name prefixes of the built-ins that take a `width` kwarg.
_WIDENABLE = ("cifar_resnet", "digits_cnn")


def builtin_archs() -> dict[str, str]:
    """Built-in architecture name → one-line description."""
    return {name: desc for name, (_, desc, _) in _BUILTINS.items()}


def default_input_shape(spec: ArchSpec | None) -> tuple[int, int, int] | None:
    """The natural C,H,W input of an architecture, or None when it cannot be known."""
    if spec is None:
        return None
    if spec.name in _BUILTINS:
        return _BUILTINS[spec.name][2]
    if spec.name.startswith("torchvision:"):
        return (3, 299, 299) if spec.name.split(":", 1)[1] == "inception_v3" else (3, 224, 224)
    if spec.name.startswith("timm:"):
        return timm_input_shape(spec)
    return None


def widened_spec(spec: ArchSpec, factor: float = 2.0) -> ArchSpec:
    """The same built-in architecture with `factor` × its width (DCPH). UserError for others."""
    if not any(spec.name.startswith(p) for p in _WIDENABLE):
        raise UserError(f"--dcph widens built-in architectures only (cifar_resnet*, digits_cnn), not {spec.name}")
    width = spec.kwargs.get("width", 1)
    return ArchSpec(spec.name, {**spec.kwargs, "width": width * factor})


def _unknown_arch(name: str) -> UserError:
    close = difflib.get_close_matches(name, list(_BUILTINS), n=3, cutoff=0.6)
    hint = ""
    if close:
        hint = f" Did you mean {', '.join(close)}?"
    else:
        try:
            from torchvision.models import list_models

            if name.lower() in list_models():
                hint = f" Did you mean torchvision:{name.lower()}?"
        except Exception:  # noqa: BLE001  (torchvision is optional for this hint only)
            pass
    if not hint and importlib.util.find_spec("timm") is not None:
        import timm

        if timm.is_model(name):
            hint = f" Did you mean timm:{name}?"
    return UserError(f"unknown architecture {name!r}; use a built-in ({', '.join(_BUILTINS)}), {_FORMS_HELP}.{hint}")


def build_model(spec: ArchSpec) -> nn.Module:
    """Fresh, randomly initialised model for `spec` (train mode, CPU). UserError on unknown arch."""
    if spec.name in _BUILTINS:
        return _BUILTINS[spec.name][0](dict(spec.kwargs))
    if spec.name.startswith("torchvision:"):
        return build_torchvision(spec)
    if spec.name.startswith("timm:"):
        return build_timm(spec)
    if ":" in spec.name:
        return build_factory(spec)
    raise _unknown_arch(spec.name)
