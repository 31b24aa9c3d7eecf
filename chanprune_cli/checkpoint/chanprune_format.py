"""The chanprune format: one safetensors file whose metadata key `chanprune` holds a JSON document
(architecture, module shapes, input shape, plans, history, meta, tool and torch versions).

Loading rebuilds the recorded architecture, re-applies the pruned module shapes and checks the
weights fit; a recorded `package.module:factory` is only imported when the user confirms it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine import shapes
from ..errors import UserError
from ..models import ArchSpec, build_model, builtin_archs
from ..support.fsutil import atomic_path, check_output, write_safetensors
from .keys import attr_shape_problems, fit_problems, load_into
from .loaded import LoadedCheckpoint
from .messages import first_line

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "METADATA_KEY", "NORMALIZATION_KEY", "tool_version", "load_chanprune",
           "TASK_OUTPUT_KEY", "recorded_normalization", "recorded_task_output", "resolve_normalization",
           "resolve_task_output", "save_chanprune", "with_normalization", "with_task_output"]

FORMAT_NAME = "chanprune"
FORMAT_VERSION = 1
METADATA_KEY = "chanprune"
# meta key of the --mean/--std a file was made with ({"mean": [...], "std": [...]}, either may be absent)
NORMALIZATION_KEY = "normalization"
# meta key of the --output a file was made with: which of the model's outputs is the task output
TASK_OUTPUT_KEY = "task_output"

Floats = tuple[float, ...]


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


def recorded_normalization(meta: dict[str, Any]) -> tuple[Floats | None, Floats | None]:
    """The --mean/--std recorded in a chanprune file's `meta` (None where nothing is recorded)."""
    record = meta.get(NORMALIZATION_KEY, {})
    values: list[Floats | None] = []
    for key in ("mean", "std"):
        value = record.get(key) if isinstance(record, dict) else None
        ok = isinstance(record, dict) and (value is None or (isinstance(value, list) and value and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)))
        if not ok:
            raise UserError(f"the checkpoint's recorded normalisation {record!r} is malformed (file damaged or edited); "
                            "pass --mean and --std")
        values.append(tuple(float(v) for v in value) if value is not None else None)
    return values[0], values[1]


def resolve_normalization(meta: dict[str, Any], mean: Floats | None,
                          std: Floats | None) -> tuple[Floats | None, Floats | None]:
    """--mean/--std as given, else as `meta` records them (read only when one is missing)."""
    if mean is not None and std is not None:
        return mean, std
    recorded_mean, recorded_std = recorded_normalization(meta)
    return (mean if mean is not None else recorded_mean), (std if std is not None else recorded_std)


def with_normalization(meta: dict[str, Any], mean: Floats | None, std: Floats | None) -> dict[str, Any]:
    """`meta` recording `mean`/`std` (None: keep what `meta` records), for the file a command writes."""
    old = meta.get(NORMALIZATION_KEY)
    record = {k: v for k, v in old.items() if k in ("mean", "std")} if isinstance(old, dict) else {}
    record.update({k: list(v) for k, v in (("mean", mean), ("std", std)) if v is not None})
    rest = {k: v for k, v in meta.items() if k != NORMALIZATION_KEY}
    return {**rest, NORMALIZATION_KEY: record} if record else rest


def recorded_task_output(meta: dict[str, Any]) -> str | None:
    """The --output recorded in a chanprune file's `meta` (None: nothing recorded)."""
    value = meta.get(TASK_OUTPUT_KEY)
    if value is not None and not (isinstance(value, str) and value.strip()):
        raise UserError(f"the checkpoint's recorded task output {value!r} is malformed (file damaged or edited); "
                        "pass --output")
    return value


def resolve_task_output(meta: dict[str, Any], output: str | None) -> str | None:
    """--output as given, else as `meta` records it."""
    return output if output is not None else recorded_task_output(meta)


def with_task_output(meta: dict[str, Any], output: str | None) -> dict[str, Any]:
    """`meta` recording `output` as the task output (None: keep what `meta` records)."""
    return meta if output is None else {**meta, TASK_OUTPUT_KEY: output}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _confirmed_factory(spec: ArchSpec, arch: str | ArchSpec | None, trust_code: bool) -> bool:
    """Whether building `spec` may run code the user did not name.

    Built-ins, `torchvision:NAME` and `timm:NAME` only construct known models (weights off, loading
    kwargs refused). A `package.module:factory` record
    imports and calls whatever the file names (e.g. `subprocess:run`), so a downloaded chanprune
    file may only do that when the user names the same factory with --arch or trusts the file.
    """
    if spec.name in builtin_archs() or spec.name.startswith(("torchvision:", "timm:")) or ":" not in spec.name:
        return True
    named = arch.name if isinstance(arch, ArchSpec) else arch
    return trust_code or (isinstance(named, str) and named.strip() == spec.name)


_DAMAGED = "; the file is damaged or was edited, re-create it with chanprune prune"


def load_chanprune(p: Path, tensors: dict[str, torch.Tensor], raw: str, *, arch: str | ArchSpec | None = None,
                   trust_code: bool = False) -> LoadedCheckpoint:
    """The model a chanprune file describes: `tensors` and `raw` (its metadata JSON) read from `p`."""
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
        if not (isinstance(input_shape, list) and 1 <= len(input_shape) <= 3 and all(isinstance(d, int) and d > 0 for d in input_shape)):
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
        problem = fit_problems(model, tensors) or attr_shape_problems(model)
    except KeyError as exc:
        raise UserError(f"{p} records module {exc.args[0]!r}, which {spec} does not have{_DAMAGED}") from None
    except (TypeError, ValueError, AttributeError, RuntimeError, ZeroDivisionError) as exc:
        raise UserError(f"{p}: recorded module shapes cannot be applied to {spec} ({first_line(exc)}){_DAMAGED}") from None
    if problem:
        raise UserError(f"weights in {p} do not fit its recorded plan for {spec}: {problem}; the file is damaged or was edited, "
                        "re-create it with chanprune prune")
    load_into(model, tensors)
    if input_shape is not None:
        # apply_shape_attrs sizes tensors from the file, so a lying file could still leave
        # neighbouring layers inconsistent; one dummy forward settles it cheaply.
        try:
            with torch.no_grad():
                model.eval()(torch.zeros(1, *input_shape))
        except Exception as exc:  # noqa: BLE001  (a model that does not run with these weights, whatever the error)
            raise UserError(
                f"weights in {p} do not fit its recorded plan for {spec}: forward pass fails ({first_line(exc)}); "
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
# Saving
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
    out = check_output(path, force)
    if arch is None:
        raise UserError("cannot save a chanprune checkpoint without an architecture; "
                        "load the weights with --arch instead of a pickled module")
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
        write_safetensors(tmp, tensors, {METADATA_KEY: text, "format": "pt"})
