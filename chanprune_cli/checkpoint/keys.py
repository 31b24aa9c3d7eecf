"""Fitting a state dict to a model: renaming wrapper-prefixed keys (DataParallel, torch.compile,
a shared first segment), describing what does not fit, and loading what does."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.layer_rules import rule_for
from ..errors import UserError
from ..models import ArchSpec
from .messages import short_list

__all__ = ["fit_problems", "attr_shape_problems", "load_into", "fit_weights"]

# Path segments added by nn.DataParallel / DistributedDataParallel and torch.compile.
_WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod"})


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
        if len(mapping) != len(source) or not all(mapping):
            return {}  # collisions: unusable
        versions = module_versions(source)
        # module versions are keyed by module prefix; rename them alike (a prefix that renames to
        # nothing was the wrapper itself, the root)
        return with_versions(mapping, {_renamed_prefix(rename, p): v for p, v in versions.items()})

    def drop_first(source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        heads = {k.split(".", 1)[0] for k in source}
        if len(heads) != 1 or not all("." in k for k in source):
            return {}
        return renamed(lambda k: k.split(".", 1)[1] if "." in k else "", source)

    add(sd)
    add(renamed(_strip_segments, sd))
    for base in list(out):
        once = drop_first(base)
        add(once)
        if once:
            add(drop_first(once))
    return out


def module_versions(sd: Any) -> dict[str, Any]:
    """The module versions torch.save records with a state dict (`_metadata`), or {}."""
    return dict(getattr(sd, "_metadata", None) or {})


def with_versions(sd: dict[str, torch.Tensor], versions: dict[str, Any]) -> dict[str, torch.Tensor]:
    """`sd` carrying `versions` as its `_metadata` (how load_state_dict reads them)."""
    out: Any = OrderedDict(sd)
    if versions:
        out._metadata = versions
    return out


def _renamed_prefix(rename: Any, prefix: str) -> str:
    if not prefix:
        return prefix
    try:
        return rename(prefix)
    except IndexError:
        return ""


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


def fit_problems(model: nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
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
        parts.append(f"{len(missing)} missing key(s): {short_list(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {short_list(unexpected)}")
    if mismatched:
        parts.append(f"{len(mismatched)} shape mismatch(es): {short_list(mismatched)}")
    return "; ".join(parts) if parts else None


def _expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Parameter/buffer shapes implied by the module's channel attributes (its layer rule's)."""
    rule = rule_for(module)
    return rule.expected_shapes(module) if rule is not None else {}


def attr_shape_problems(model: nn.Module) -> str | None:
    """Tensors whose shape disagrees with their module's recorded channel attributes."""
    bad = []
    for name, module in model.named_modules():
        for tname, expected in _expected_shapes(module).items():
            tensor = getattr(module, tname, None)
            if isinstance(tensor, torch.Tensor) and tuple(tensor.shape) != expected:
                key = f"{name}.{tname}" if name else tname
                bad.append(f"{key} (file {list(tensor.shape)} vs recorded {list(expected)})")
    return f"{len(bad)} shape mismatch(es): {short_list(bad)}" if bad else None


def load_into(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Copy a state dict that fits (see `fit_problems`) into `model`."""
    own = model.state_dict()
    # Module versions: the file's where it recorded them, else the freshly built model's own
    # (load_state_dict passes None for a module with no recorded version; MNASNet refuses that).
    versions = {**module_versions(own), **module_versions(sd)}
    # Already checked by fit_problems; strict=False only tolerates the ignorable counters.
    model.load_state_dict(with_versions({k: v for k, v in sd.items() if k in own}, versions), strict=False)


def fit_weights(model: nn.Module, sd: dict[str, torch.Tensor], p: Path, spec: ArchSpec) -> None:
    """Load `sd` (keys renamed to match) into `model` built from `spec`; UserError when it does not fit."""
    sd = _match_keys(sd, set(model.state_dict()))
    problem = fit_problems(model, sd)
    if problem:
        raise UserError(f"weights in {p} do not fit --arch {spec}: {problem}; {_class_count_fix(model, sd, spec)}")
    load_into(model, sd)


def _class_count_fix(model: nn.Module, sd: dict[str, torch.Tensor], spec: ArchSpec) -> str:
    """What to do about weights that do not fit: the --arch-kwargs that builds the model with the
    file's class count when its classifier (the last Linear) has another, else check the options."""
    heads = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    key = f"{heads[-1]}.weight" if heads else None
    own = model.state_dict().get(key) if key is not None else None
    theirs = sd.get(key) if key is not None else None
    if own is None or theirs is None or own.dim() != 2 or theirs.dim() != 2 or own.shape[0] == theirs.shape[0]:
        return "check --arch/--arch-kwargs"
    kwargs = json.dumps({**spec.kwargs, "num_classes": int(theirs.shape[0])})
    return (f"the file's classifier has {theirs.shape[0]} classes, the model's {own.shape[0]}: pass "
            f"--arch-kwargs '{kwargs}'")
