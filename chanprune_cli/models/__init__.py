"""Architectures: `ArchSpec` records, resolution to a fresh `nn.Module`, and the built-in models.

Modules: `spec` (ArchSpec, parse_arch), `registry` (built-in table, build_model, widening),
`external` (torchvision and user factories), `cifar` and `digits` (the built-in networks).
The model classes are re-exported here because pickled modules name them `chanprune_cli.models.X`.
"""

from __future__ import annotations

from .cifar import BasicBlock, CifarResNet, OptionAShortcut
from .digits import DigitsCNN
from .external import ensure_cwd_importable
from .registry import build_model, builtin_archs, default_input_shape, widened_spec
from .spec import ArchSpec, parse_arch

__all__ = [
    "ArchSpec",
    "parse_arch",
    "build_model",
    "builtin_archs",
    "default_input_shape",
    "widened_spec",
    "ensure_cwd_importable",
    "CifarResNet",
    "BasicBlock",
    "OptionAShortcut",
    "DigitsCNN",
]
