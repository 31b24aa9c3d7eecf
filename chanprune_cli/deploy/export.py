"""Exporting a (pruned) model to ONNX, TorchScript or a plain safetensors state dict, verified.

Every export is written to a temporary file next to the destination, read back the way its users
will read it (onnxruntime, `torch.jit.load`, plain `safetensors` + `load_state_dict`), run on the
same random inputs as the PyTorch model at two batch sizes, and renamed into place only when the
largest absolute difference is within tolerance. Otherwise a `ChanpruneError` (exit 1) is raised
and nothing is left behind. An ONNX export of a fully convolutional model (one whose output size
follows the input's) has dynamic height and width too, and is also checked at twice the size.

Tolerance: `rtol × max(1, max |reference output|)`, as in `surgery.verify`, but in float32 (the
exported artefacts run in float32, where different kernels legitimately differ by ~1e-6 relative).

onnx and onnxruntime are optional dependencies: they are imported only by the ONNX export.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ChanpruneError, UserError
from ..support.fsutil import atomic_path, write_safetensors

__all__ = [
    "CHECK_BATCH_SIZES",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "FORMATS",
    "LOAD_SNIPPET",
    "SPATIAL_AXES",
    "ExportMismatch",
    "ExportResult",
    "apply_export_spec",
    "check_opset",
    "check_spatial_axes",
    "export_model",
    "export_onnx",
    "export_safetensors",
    "export_torchscript",
    "infer_format",
    "require_onnx",
    "spec_path_for",
]

FORMATS = ("onnx", "torchscript", "safetensors")
_SUFFIXES = {".onnx": "onnx", ".pt": "torchscript", ".pth": "torchscript", ".ts": "torchscript",
             ".torchscript": "torchscript", ".jit": "torchscript", ".safetensors": "safetensors"}
DEFAULT_OPSET = 17
DEFAULT_RTOL = 1e-4
# Exported at batch 2, checked at 1 and 3: a batch size baked into the graph cannot pass both.
EXPORT_BATCH_SIZE = 2
CHECK_BATCH_SIZES = (1, 3)
# ONNX height/width: dynamic for fully convolutional models (auto), always, or fixed at --input-shape.
SPATIAL_AXES = ("auto", "dynamic", "fixed")
SPATIAL_SCALE = 2  # the second size checked: twice the height and width (keeps their divisibility)
SPEC_FORMAT = "chanprune-export"
SPEC_FORMAT_VERSION = 1

# How to load a safetensors export with plain PyTorch (README, the spec file, tests/test_export.py).
# `{weights}`/`{spec}` are the two files; the factory line is the one to change for your own model.
LOAD_SNIPPET = '''\
import json, torch, torchvision
from safetensors.torch import load_file

spec, state = json.load(open("{spec}")), load_file("{weights}")
model = torchvision.models.get_model(spec["arch"]["name"].split(":")[-1], **spec["arch"]["kwargs"])  # or your factory
for name, attrs in spec["module_shapes"].items():  # the pruned widths
    for key, value in attrs.items():
        setattr(model.get_submodule(name), key, tuple(value) if isinstance(value, list) else value)
for key, tensor in model.state_dict(keep_vars=True).items():
    tensor.data = torch.empty_like(state[key])  # resize parameters and buffers to the saved shapes
model.load_state_dict(state, strict=True)
model.eval()
'''


@dataclass
class ExportResult:
    """What an export wrote and how closely it reproduces the PyTorch model."""

    format: str                      # "onnx" | "torchscript" | "safetensors"
    path: str
    input_shape: tuple[int, int, int]
    max_abs_diff: float              # over every checked batch size and output
    tolerance: float                 # absolute: rtol × max(1, max |reference|)
    rtol: float
    passed: bool
    batch_sizes: tuple[int, ...]
    size_bytes: int                  # the exported file(s)
    per_batch: dict[int, float] = field(default_factory=dict)  # batch size -> max abs diff
    opset: int | None = None         # onnx
    method: str | None = None        # torchscript: "script" or "trace"
    spec_path: str | None = None     # safetensors: the JSON architecture spec next to the weights
    device: str = "cpu"              # where the exported artefact was checked
    spatial_axes: str | None = None  # onnx: "dynamic" (height/width) or "fixed"
    per_size: dict[str, float] = field(default_factory=dict)  # onnx, dynamic: "HxW" -> max abs diff at batch 1

    @property
    def size_mb(self) -> float:
        return self.size_bytes / float(1 << 20)  # MiB, labelled MB as elsewhere (report.py)


class ExportMismatch(ChanpruneError):
    """The exported artefact does not reproduce the model (exit 1); `.result` has the numbers."""

    def __init__(self, message: str, result: ExportResult) -> None:
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------------------------
# small helpers


def infer_format(path: str | os.PathLike[str]) -> str | None:
    """The export format implied by a file name's suffix, or None."""
    return _SUFFIXES.get(Path(path).suffix.lower())


def spec_path_for(path: str | os.PathLike[str]) -> Path:
    """The JSON spec written next to a safetensors export: `<out>.json`."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def require_onnx() -> None:
    """UserError when the optional ONNX dependencies are missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format onnx needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
                        "installed; install it with: pip install onnx onnxruntime (or use --format torchscript)")


def _opset_range() -> tuple[int, int]:
    try:
        from torch.onnx import _constants as c

        return int(c.ONNX_MIN_OPSET), int(getattr(c, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", c.ONNX_MAX_OPSET))
    except (ImportError, AttributeError):  # private module: fall back to the range torch 2.x supports
        return 7, 17


def check_opset(opset: int) -> None:
    low, high = _opset_range()
    if isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high:
        raise UserError(f"--opset {opset} is not supported by this torch's ONNX exporter; pick one from {low} to {high}")


def check_spatial_axes(mode: str) -> str:
    """The --spatial-axes mode (any case), or UserError."""
    value = str(mode).strip().lower()
    if value not in SPATIAL_AXES:
        raise UserError(f"unknown --spatial-axes {mode!r}; choose auto, dynamic or fixed")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.jit and the TorchScript-based ONNX exporter warn about their own deprecation and
    about constant folding; those are not the user's concern here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Full float32 precision on CUDA while checking (TF32 convolutions differ by ~1e-3)."""
    if not torch.cuda.is_available():
        yield
        return
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def _flatten(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "__array__") and not isinstance(value, (str, bytes)):  # numpy (onnxruntime)
        return [torch.from_numpy(value.__array__())]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten(v)]
    return []


def _outputs(run: Callable[[torch.Tensor], Any], x: torch.Tensor) -> list[torch.Tensor]:
    """The exported artefact's outputs for `x`, flattened, on the CPU (the one place every check
    reads them; tests replace it to force a mismatch)."""
    return [t.detach().to("cpu", torch.float64) for t in _flatten(run(x))]


def _dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _inputs(model: nn.Module, input_shape: Sequence[int], batch_sizes: Sequence[int], seed: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {b: torch.randn((b, *input_shape), generator=g).to(_dtype(model)) for b in batch_sizes}


@torch.no_grad()
def _reference(model: nn.Module, inputs: Mapping[int, torch.Tensor], input_shape: Sequence[int]) -> dict[int, list[torch.Tensor]]:
    """The PyTorch model's own outputs (eval mode, CPU); UserError when it cannot run on the shape."""
    out: dict[int, list[torch.Tensor]] = {}
    for b, x in inputs.items():
        try:
            out[b] = [t.detach().to("cpu", torch.float64) for t in _flatten(model(x))]
        except Exception as exc:  # noqa: BLE001 -- any failure of the model's forward: report it in one line
            shape = ",".join(str(d) for d in input_shape)
            raise UserError(f"the model fails on inputs of shape {shape} ({_first_line(exc)}); check --input-shape") from None
        if not out[b]:
            raise UserError("the model returns no tensors; export needs a model whose forward returns tensors "
                            "(a tensor, or a tuple/list/dict of them)")
    return out


def _compare(fmt: str, reference: Mapping[int, list[torch.Tensor]], inputs: Mapping[int, torch.Tensor],
             run: Callable[[torch.Tensor], Any], rtol: float,
             hint: str = "re-run with --debug for details") -> tuple[float, float, dict[int, float]]:
    """(max abs diff, absolute tolerance, per-batch diffs) of `run` against `reference`; `hint`
    ends the message when the export fails to run."""
    scale = max((float(t.abs().max()) for outs in reference.values() for t in outs if t.numel()), default=0.0)
    tolerance = rtol * max(1.0, scale)
    per_batch: dict[int, float] = {}
    for b, x in inputs.items():
        try:
            got = _outputs(run, x)
        except Exception as exc:  # noqa: BLE001 -- the exported artefact failed to run: one line, exit 1
            shape = ",".join(str(d) for d in x.shape)
            raise ChanpruneError(f"the {fmt} export fails on inputs of shape {shape} ({_first_line(exc)}); "
                                 f"nothing was written, {hint}") from None
        ref = reference[b]
        if len(got) != len(ref) or any(a.shape != c.shape for a, c in zip(ref, got)):
            per_batch[b] = float("inf")
            continue
        per_batch[b] = max((float((a - c).abs().max()) for a, c in zip(ref, got) if a.numel()), default=0.0)
    return max(per_batch.values()), tolerance, per_batch


def _finish(result: ExportResult) -> ExportResult:
    if not result.passed:
        worst = max(result.per_batch, key=lambda b: result.per_batch[b])
        raise ExportMismatch(
            f"the {result.format} export does not match the PyTorch model: max |difference| = {result.max_abs_diff:.3g} "
            f"at batch size {worst} (tolerance {result.tolerance:.1e}); nothing was written "
            "(re-run with --debug, or raise --tolerance if this difference is acceptable)", result)
    return result


def _size(*paths: Path) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())


# --------------------------------------------------------------------------------------------
# ONNX


def _other_size(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], *(d * SPATIAL_SCALE for d in shape[1:]))


@torch.no_grad()
def _spatial_reference(model: nn.Module, shape: tuple[int, ...], reference: list[torch.Tensor], mode: str,
                       seed: int) -> tuple[torch.Tensor, list[torch.Tensor]] | None:
    """Input and outputs at twice the height and width when the export gets dynamic spatial axes
    (None: fixed). auto: only for a fully convolutional model, one whose output size follows the
    input's; a classifier's output does not, and its graph may bake the size in (pooling kernels)."""
    if mode == "fixed":
        return None
    other = _other_size(shape)
    x = torch.randn((1, *other), generator=torch.Generator().manual_seed(seed + 2)).to(_dtype(model))
    try:
        outputs = [t.detach().to("cpu", torch.float64) for t in _flatten(model(x))]
    except Exception as exc:  # noqa: BLE001 -- any failure of the model's forward: it takes one size only
        if mode == "dynamic":
            raise UserError(f"--spatial-axes dynamic: the model fails on inputs of shape {','.join(map(str, other))} "
                            f"({_first_line(exc)}); use --spatial-axes fixed") from None
        return None
    follows = len(outputs) == len(reference) and any(a.shape[1:] != b.shape[1:] for a, b in zip(outputs, reference))
    return (x, outputs) if mode == "dynamic" or follows else None


def _dynamic_axes(name: str, small: torch.Tensor, large: torch.Tensor | None) -> dict[int, str]:
    """The batch axis, and the axes whose size differs between the two spatial sizes."""
    axes = {0: "batch"}
    if large is not None and large.dim() == small.dim():
        names = {2: "height", 3: "width"} if small.dim() == 4 else {}
        axes.update({i: f"{name}_{names.get(i, i)}" for i in range(1, small.dim()) if small.shape[i] != large.shape[i]})
    return axes


def export_onnx(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int], *,
                opset: int = DEFAULT_OPSET, rtol: float = DEFAULT_RTOL, seed: int = 0,
                batch_sizes: Sequence[int] = CHECK_BATCH_SIZES, spatial_axes: str = "auto") -> ExportResult:
    """ONNX with a dynamic batch axis, checked with onnxruntime (CPU) before it is kept.

    `spatial_axes` ("auto", "dynamic", "fixed"): whether height and width are dynamic too; auto
    makes them dynamic for fully convolutional models. With dynamic spatial axes the export is also
    checked at twice the height and width (batch 1)."""
    require_onnx()
    check_opset(opset)
    mode = check_spatial_axes(spatial_axes)
    import onnx
    import onnxruntime as ort

    model = model.to("cpu").eval()
    shape = tuple(int(d) for d in input_shape)
    inputs = _inputs(model, shape, batch_sizes, seed)
    reference = _reference(model, inputs, shape)
    first = next(iter(reference.values()))
    spatial = _spatial_reference(model, shape, first, mode, seed)
    n_out = len(first)
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    example = _inputs(model, shape, [EXPORT_BATCH_SIZE], seed + 1)[EXPORT_BATCH_SIZE]
    small_in = inputs[next(iter(inputs))]
    dynamic_axes = {"input": _dynamic_axes("input", small_in, spatial[0] if spatial else None)}
    for i, name in enumerate(output_names):
        dynamic_axes[name] = _dynamic_axes(name, first[i], spatial[1][i] if spatial else None)
    # The TorchScript-based exporter (dynamo=False), not torch 2.9+'s default torch.export-based
    # one: that one needs the separate `onnxscript` package and fails on some user models, while
    # this one works offline with torch alone and marks the batch axis dynamic via dynamic_axes.
    kwargs: dict[str, Any] = {
        "opset_version": opset,
        "input_names": ["input"],
        "output_names": output_names,
        "dynamic_axes": dynamic_axes,
        "do_constant_folding": True,
    }
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch < 2.5 has only this exporter
        kwargs["dynamo"] = False
    out = Path(path)
    with atomic_path(out) as tmp:
        try:
            with _quiet(), torch.no_grad():
                torch.onnx.export(model, (example,), str(tmp), **kwargs)
            onnx.checker.check_model(str(tmp))
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 -- exporter/checker/runtime errors come in many types
            raise ChanpruneError(f"cannot export this model to ONNX opset {opset} ({_first_line(exc)}); "
                                 "use another --opset or --format torchscript (--debug shows the traceback)") from None
        input_name = session.get_inputs()[0].name

        def run(x: torch.Tensor) -> Any:
            return session.run(None, {input_name: x.numpy()})

        diff, tolerance, per_batch = _compare("onnx", reference, inputs, run, rtol)
        per_size: dict[str, float] = {}
        fixed_size = "the graph fixes the input size somewhere: use --spatial-axes fixed"
        size = "x".join(str(d) for d in _other_size(shape)[1:])
        if spatial is not None:
            per_size[size], size_tolerance, _ = _compare("onnx", {1: spatial[1]}, {1: spatial[0]}, run, rtol, fixed_size)
            tolerance = max(tolerance, size_tolerance)
        worst = max([diff, *per_size.values()])
        result = ExportResult("onnx", str(out), shape, worst, tolerance, rtol, worst <= tolerance, tuple(batch_sizes),
                              _size(tmp), per_batch, opset=opset,
                              spatial_axes="dynamic" if spatial is not None else "fixed", per_size=per_size)
        if diff <= tolerance < worst:
            raise ExportMismatch(f"the onnx export with dynamic height and width does not match the PyTorch model at "
                                 f"{size}: max |difference| = {worst:.3g} (tolerance {tolerance:.1e}); nothing was "
                                 f"written, {fixed_size}", result)
        _finish(result)
    return result


# --------------------------------------------------------------------------------------------
# TorchScript


def _torchscript(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, str]:
    """Script the model (keeps control flow); when scripting fails, trace it (the batch-size
    check then proves the trace is not tied to the example's batch size)."""
    with _quiet():
        try:
            return torch.jit.script(copy.deepcopy(model)), "script"
        except Exception as script_exc:  # noqa: BLE001 -- unscriptable Python: fall back to tracing
            try:
                with torch.no_grad():
                    return torch.jit.trace(copy.deepcopy(model), (example,), check_trace=False), "trace"
            except Exception as trace_exc:  # noqa: BLE001 -- reported with the scripting error
                raise ChanpruneError(f"cannot convert this model to TorchScript: scripting failed ({_first_line(script_exc)}) "
                                     f"and tracing failed ({_first_line(trace_exc)}); use --format onnx") from None


def export_torchscript(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int], *,
                       rtol: float = DEFAULT_RTOL, seed: int = 0, device: torch.device | str = "cpu",
                       batch_sizes: Sequence[int] = CHECK_BATCH_SIZES) -> ExportResult:
    """TorchScript (saved from the CPU, so it loads anywhere), checked through `torch.jit.load` on
    `device` before it is kept."""
    dev = torch.device(device)
    model = model.to("cpu").eval()
    shape = tuple(int(d) for d in input_shape)
    inputs = _inputs(model, shape, batch_sizes, seed)
    reference = _reference(model, inputs, shape)
    example = _inputs(model, shape, [EXPORT_BATCH_SIZE], seed + 1)[EXPORT_BATCH_SIZE]
    scripted, method = _torchscript(model, example)
    out = Path(path)
    with atomic_path(out) as tmp:
        try:
            with _quiet():
                scripted.save(str(tmp))
                loaded = torch.jit.load(str(tmp), map_location=dev).eval()
        except Exception as exc:  # noqa: BLE001 -- serialisation errors come in many types
            raise ChanpruneError(f"cannot save or reload the TorchScript model ({_first_line(exc)}); "
                                 "use --format onnx (--debug shows the traceback)") from None

        @torch.no_grad()
        def run(x: torch.Tensor) -> Any:
            with _quiet(), _no_tf32():
                return loaded(x.to(dev))

        diff, tolerance, per_batch = _compare("torchscript", reference, inputs, run, rtol)
        result = ExportResult("torchscript", str(out), shape, diff, tolerance, rtol, diff <= tolerance,
                              tuple(batch_sizes), _size(tmp), per_batch, method=method, device=str(dev))
        _finish(result)
    return result


# --------------------------------------------------------------------------------------------
# safetensors + JSON architecture spec


def apply_export_spec(model: nn.Module, state: Mapping[str, torch.Tensor], module_shapes: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Turn a freshly built (unpruned) model into the exported one: what LOAD_SNIPPET does, in a
    function (used to check every safetensors export before it is kept)."""
    for name, attrs in module_shapes.items():
        module = model.get_submodule(name)
        for key, value in attrs.items():
            setattr(module, key, tuple(value) if isinstance(value, list) else value)
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in state:
            tensor.data = torch.empty_like(state[key])
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def _changed_shapes(model: nn.Module, fresh: nn.Module) -> dict[str, dict[str, Any]]:
    """Shape attributes of the modules whose widths differ from the factory's (the pruned ones)."""
    from ..engine.shapes import shape_attrs

    base = shape_attrs(fresh)
    return {name: attrs for name, attrs in shape_attrs(model).items() if base.get(name) != attrs}


def export_safetensors(model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int], *, arch: Any,
                       rtol: float = DEFAULT_RTOL, seed: int = 0,
                       batch_sizes: Sequence[int] = CHECK_BATCH_SIZES) -> ExportResult:
    """A plain state dict (`path`) plus `<path>.json` with the architecture spec and the pruned
    module shapes: loadable with safetensors + PyTorch alone (LOAD_SNIPPET). Checked by rebuilding
    the model from the two written files exactly that way."""
    import safetensors.torch

    from .. import __version__
    from ..models import ArchSpec, build_model

    if arch is None:
        raise UserError("this pickled model records no architecture to put in the safetensors spec; pass --arch "
                        "(the factory that builds it), or use --format onnx or torchscript")
    model = model.to("cpu").eval()
    shape = tuple(int(d) for d in input_shape)
    inputs = _inputs(model, shape, batch_sizes, seed)
    reference = _reference(model, inputs, shape)
    try:
        module_shapes = _changed_shapes(model, build_model(arch))
    except UserError as exc:
        raise UserError(f"cannot build {arch} to record its pruned shapes: {exc}") from None
    out, spec_out = Path(path), spec_path_for(path)
    doc = {
        "format": SPEC_FORMAT,
        "format_version": SPEC_FORMAT_VERSION,
        "weights": out.name,
        "arch": arch.to_json(),
        "input_shape": list(shape),
        "module_shapes": module_shapes,
        "how_to_load": LOAD_SNIPPET.format(weights=out.name, spec=spec_out.name).splitlines(),
        "tool_version": __version__,
        "torch_version": torch.__version__,
    }
    text = json.dumps(doc, indent=2) + "\n"
    # Independent contiguous CPU copies: safetensors refuses shared or strided storage.
    tensors = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with atomic_path(spec_out) as tmp_spec, atomic_path(out) as tmp:
        write_safetensors(tmp, tensors, {"format": "pt", "spec": json.dumps(doc)})
        tmp_spec.write_text(text, encoding="utf-8")
        # Read back both files, rebuild the way a user without chanprune would, and compare.
        spec = json.loads(tmp_spec.read_text(encoding="utf-8"))
        try:
            rebuilt = apply_export_spec(build_model(ArchSpec.from_json(spec["arch"])), safetensors.torch.load_file(str(tmp)),
                                        spec["module_shapes"])
        except Exception as exc:  # noqa: BLE001 -- whatever a user's load would hit: one line, exit 1
            raise ChanpruneError(f"the safetensors export does not load back into {arch} ({_first_line(exc)}); "
                                 "nothing was written, re-run with --debug for details") from None

        @torch.no_grad()
        def run(x: torch.Tensor) -> Any:
            return rebuilt(x)

        diff, tolerance, per_batch = _compare("safetensors", reference, inputs, run, rtol)
        result = ExportResult("safetensors", str(out), shape, diff, tolerance, rtol, diff <= tolerance,
                              tuple(batch_sizes), _size(tmp), per_batch, spec_path=str(spec_out))
        _finish(result)
    return result


def export_model(fmt: str, model: nn.Module, path: str | os.PathLike[str], input_shape: Sequence[int], *,
                 arch: Any = None, opset: int = DEFAULT_OPSET, rtol: float = DEFAULT_RTOL, seed: int = 0,
                 device: torch.device | str = "cpu", spatial_axes: str = "auto") -> ExportResult:
    """Dispatch on the format name (one of FORMATS); `spatial_axes` applies to ONNX only."""
    if fmt == "onnx":
        return export_onnx(model, path, input_shape, opset=opset, rtol=rtol, seed=seed, spatial_axes=spatial_axes)
    if fmt == "torchscript":
        return export_torchscript(model, path, input_shape, rtol=rtol, seed=seed, device=device)
    if fmt == "safetensors":
        return export_safetensors(model, path, input_shape, arch=arch, rtol=rtol, seed=seed)
    raise UserError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
