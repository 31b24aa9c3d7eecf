"""`ArchSpec`, the architecture record, and parsing `--arch` / `--arch-kwargs` into one.

An `ArchSpec` (name + JSON kwargs) is all a chanprune checkpoint records about the architecture.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError

__all__ = ["ArchSpec", "parse_arch", "canonical_json"]


def canonical_json(value: Any) -> str:
    """Key-sorted compact JSON: one spelling per value, for hashing and messages."""
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
            raise UserError(f"architecture kwargs for {self.name} are not plain JSON ({exc}); "
                            "use numbers, strings, lists, objects") from None
        object.__setattr__(self, "name", self.name.strip())
        object.__setattr__(self, "kwargs", kwargs)

    # The dict field would make the generated hash fail; hash the canonical JSON instead.
    def __hash__(self) -> int:
        return hash((self.name, canonical_json(self.kwargs)))

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
        return self.name if not self.kwargs else f"{self.name} {canonical_json(self.kwargs)}"


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
