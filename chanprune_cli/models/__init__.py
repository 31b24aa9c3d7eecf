"""Architecture resolution: built-in CIFAR ResNets / digits CNN, torchvision models, user factories.

An `ArchSpec` (name + JSON kwargs) is all a chanprune checkpoint records about the architecture;
`build_model(spec)` turns it back into a freshly initialised `nn.Module` (never downloading weights).
"""

from __future__ import annotations

import copy
import difflib
import importlib
import json
import math
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .layers import OptionAShortcut

__all__ = [
    "ArchSpec",
    "parse_arch",
    "build_model",
    "builtin_archs",
    "default_input_shape",
    "CifarResNet",
    "BasicBlock",
    "DigitsCNN",
]

_FORMS_HELP = "torchvision:<name> (e.g. torchvision:resnet18) or package.module:factory (importable from the current directory)"


# --------------------------------------------------------------------------------------------
# ArchSpec
# --------------------------------------------------------------------------------------------


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class ArchSpec:
    """Architecture name plus JSON-serialisable factory kwargs."""

    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError("architecture name is empty; pass --arch (e.g. cifar_resnet56, torchvision:resnet18)")
        if not isinstance(self.kwargs, dict):
            raise UserError(f"architecture kwargs must be a JSON object, got {type(self.kwargs).__name__}")
        try:
            # Deep copy through JSON: checks serialisability and stops callers mutating a frozen spec.
            kwargs = json.loads(json.dumps(self.kwargs, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise UserError(f"architecture kwargs for {self.name} are not plain JSON ({exc}); use numbers, strings, lists, objects") from None
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "kwargs", kwargs)

    # The dict field would make the generated hash fail; hash the canonical JSON instead.
    def __hash__(self) -> int:
        return hash((self.name, _canonical_json(self.kwargs)))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": copy.deepcopy(self.kwargs)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArchSpec:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise UserError("architecture record is malformed (expected {\"name\": str, \"kwargs\": {...}})")
        kwargs = d.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise UserError("architecture record is malformed (kwargs is not an object)")
        return cls(d["name"], kwargs)

    def __str__(self) -> str:
        return self.name if not self.kwargs else f"{self.name} {_canonical_json(self.kwargs)}"


def parse_arch(name: str, kwargs_json: str | dict[str, Any] | None = None) -> ArchSpec:
    """`--arch` / `--arch-kwargs` → ArchSpec. UserError on malformed JSON or a non-object."""
    if not isinstance(name, str) or not name.strip():
        raise UserError("--arch is empty; name an architecture (e.g. cifar_resnet56, torchvision:resnet18)")
    if kwargs_json is None or (isinstance(kwargs_json, str) and not kwargs_json.strip()):
        return ArchSpec(name, {})
    if isinstance(kwargs_json, dict):
        return ArchSpec(name, kwargs_json)
    try:
        kwargs = json.loads(kwargs_json)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"--arch-kwargs is not valid JSON ({exc.msg} at char {exc.pos}); pass an object like '{{\"num_classes\": 100}}'"
        ) from None
    if not isinstance(kwargs, dict):
        raise UserError(f"--arch-kwargs must be a JSON object like '{{\"num_classes\": 100}}', got {type(kwargs).__name__}")
    return ArchSpec(name, kwargs)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet (He et al. 2016, option-A shortcuts), key names as in akamaster/pytorch_resnet_cifar10
# --------------------------------------------------------------------------------------------


def _kaiming_init(module: nn.Module) -> None:
    # Same init as the reference implementation: Kaiming-normal (fan_in) on conv and linear weights.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a weightless shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # Option A: subsample + zero-pad channels (planes//4 each side doubles 16→32, 32→64).
            # (planes - in_planes) // 2 == planes // 4 for the standard doubling; any width works.
            front = (planes - in_planes) // 2
            self.shortcut = OptionAShortcut(pad_front=front, pad_back=planes - in_planes - front, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 16/32/64-channel stages (× `width`), global average pool, `linear`."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: float = 1) -> None:
        super().__init__()
        base = max(1, int(round(16 * width)))
        self.in_planes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(base, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * base, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * base, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(4 * base, num_classes)
        self.apply(_kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


# --------------------------------------------------------------------------------------------
# digits_cnn: small CNN for 1×8×8 digits (exercises the flatten → Linear channel coupling)
# --------------------------------------------------------------------------------------------


class DigitsCNN(nn.Module):
    """conv16-conv32-maxpool-conv32 (BN+ReLU each), flatten, fc 64, fc num_classes."""

    def __init__(self, num_classes: int = 10, width: float = 1) -> None:
        super().__init__()
        c1, c2, f1 = (max(1, int(round(c * width))) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(c2 * 4 * 4, f1)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(f1, num_classes)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu4(self.fc1(x)))


# --------------------------------------------------------------------------------------------
# Registry of built-ins
# --------------------------------------------------------------------------------------------

_CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


def _positive_int(arch: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{arch}: kwarg {key} must be a positive integer, got {value!r}")
    return value


def _check_kwargs(arch: str, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"{arch} does not take kwarg(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}")


def _make_cifar(depth: int) -> Callable[[dict[str, Any]], nn.Module]:
    def build(kwargs: dict[str, Any]) -> nn.Module:
        arch = f"cifar_resnet{depth}"
        _check_kwargs(arch, kwargs, ("num_classes", "width"))
        num_classes = _positive_int(arch, "num_classes", kwargs.get("num_classes", 10))
        width = kwargs.get("width", 1)
        if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
            raise UserError(f"{arch}: kwarg width must be a positive number, got {width!r}")
        n = _CIFAR_DEPTHS[depth]
        return CifarResNet([n, n, n], num_classes=num_classes, width=width)

    return build


def _make_digits(kwargs: dict[str, Any]) -> nn.Module:
    _check_kwargs("digits_cnn", kwargs, ("num_classes", "width"))
    num_classes = _positive_int("digits_cnn", "num_classes", kwargs.get("num_classes", 10))
    width = kwargs.get("width", 1)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise UserError(f"digits_cnn: kwarg width must be a positive number, got {width!r}")
    return DigitsCNN(num_classes=num_classes, width=width)


_BUILTINS: dict[str, tuple[Callable[[dict[str, Any]], nn.Module], str, tuple[int, int, int]]] = {
    **{
        f"cifar_resnet{d}": (
            _make_cifar(d),
            f"CIFAR ResNet-{d} (He et al., option-A shortcuts, 32x32 input; kwargs: num_classes, width)",
            (3, 32, 32),
        )
        for d in _CIFAR_DEPTHS
    },
    "digits_cnn": (
        _make_digits,
        "small CNN for 1x8x8 digit images (3 conv + 2 linear; kwargs: num_classes, width)",
        (1, 8, 8),
    ),
}


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
    return None


# --------------------------------------------------------------------------------------------
# build_model
# --------------------------------------------------------------------------------------------

_IDENT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _reject_weight_download(spec: ArchSpec) -> None:
    # torchvision factories download weights for these; chanprune never downloads anything.
    for key, value in spec.kwargs.items():
        if (key.startswith("weights") and value is not None) or (key.startswith("pretrained") and value):
            raise UserError(
                f"{spec.name}: kwarg {key}={value!r} would download weights; chanprune builds untrained "
                "architectures only — drop it and load your weights from the checkpoint file"
            )


def _build_torchvision(spec: ArchSpec) -> nn.Module:
    import torchvision  # noqa: F401  (import here: slow, and only needed for this form)
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
    try:
        return get_model(tv_name.lower(), weights=None, **kwargs)
    except (TypeError, ValueError) as exc:
        raise UserError(f"cannot build {spec.name} with kwargs {_canonical_json(spec.kwargs)}: {exc}") from None


def ensure_cwd_importable() -> None:
    """Put the current directory on sys.path, so `pkg.mod:factory` and pickled classes resolve."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()


def _build_factory(spec: ArchSpec) -> nn.Module:
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
    except Exception as exc:  # the user's module failed at import time; report it in one line
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
    except Exception as exc:
        raise UserError(f"calling {spec.name}(**{_canonical_json(spec.kwargs)}) failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{spec.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model


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
        except Exception:  # torchvision is optional for this hint only
            pass
    return UserError(f"unknown architecture {name!r}; use a built-in ({', '.join(_BUILTINS)}), {_FORMS_HELP}.{hint}")


def build_model(spec: ArchSpec) -> nn.Module:
    """Fresh, randomly initialised model for `spec` (train mode, CPU). UserError on unknown arch."""
    if spec.name in _BUILTINS:
        return _BUILTINS[spec.name][0](dict(spec.kwargs))
    if spec.name.startswith("torchvision:"):
        return _build_torchvision(spec)
    if ":" in spec.name:
        return _build_factory(spec)
    raise _unknown_arch(spec.name)
