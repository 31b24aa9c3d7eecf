"""Where a model ships and how it is timed there: the latency target and one timing adapter per runtime.

`LatencyTarget` names the runtime (`torch`, `onnxruntime`, `tensorrt`), the device, the batch size,
the intra-op threads and, for PyTorch, the `Deployment` (dtype, channels-last, cuDNN autotuning,
torch.compile) as `chanprune bench` times it. `check()` fails in one line, before any slow step,
for a runtime that is not installed or cannot run on the device.

A runtime turns a model, or one layer, into a `Runner`: a call that runs one forward pass on a fixed
random batch and returns when it has finished (CUDA synchronised). `time_interleaved` times several
runners round by round (A, B, A, B, ...), so that a machine that gets busier slows every model
alike, and reports the median of each (a busy machine only ever adds time).

- torch: the model as `benchmark.deployed` makes it, under `torch.inference_mode`.
- onnxruntime (CPU provider, float32; the optional `onnxruntime` extra): a model is exported to a
  temporary ONNX file and checked as `chanprune export` checks it; a single layer is written as
  one ONNX node (Conv, Gemm or MatMul) with its weights. Threads: the session's intra-op threads.
- tensorrt (CUDA only; needs `torch_tensorrt`): the model or layer compiled by Torch-TensorRT at the
  target's batch size and dtype.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .benchmark import DTYPES, MIN_REPEATS, Deployment, cudnn_autotune, deployed, device_name

RUNTIMES = ("torch", "onnxruntime", "tensorrt")
_ONNX_OPSET = 17

Runner = Callable[[], None]


@dataclass(frozen=True)
class LatencyTarget:
    """The runtime, device, batch size, threads and (torch) deployment a latency is measured on."""

    runtime: str = "torch"
    device: str = "cpu"
    batch: int = 1
    threads: int | None = None  # None: torch's current intra-op thread count
    deployment: Deployment = field(default_factory=Deployment)
    flag: str = "--latency-runtime"  # the option that chose the runtime, as errors name it

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise UserError(f"{self.flag} must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.batch < 1:
            raise UserError(f"--latency-batch must be at least 1, got {self.batch}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.deployment.dtype not in DTYPES:
            raise UserError(f"--latency-dtype must be one of {', '.join(DTYPES)}, got {self.deployment.dtype!r}")

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def thread_count(self) -> int:
        return self.threads if self.threads is not None else torch.get_num_threads()

    def check(self) -> None:
        """One line when this target cannot be timed here: a runtime not installed, or not for this device."""
        cuda = self.torch_device.type == "cuda"
        if self.runtime == "onnxruntime":
            if _missing("onnxruntime") or _missing("onnx"):
                raise UserError(f"{self.flag} onnxruntime needs onnx and onnxruntime, which are not installed; "
                                f"install them with: pip install onnx onnxruntime (or use {self.flag} torch)")
            if cuda:
                raise UserError(f"{self.flag} onnxruntime times ONNX Runtime's CPU provider; use --device cpu")
            if self.deployment.dtype != "fp32" or self.deployment.compile:
                raise UserError(f"{self.flag} onnxruntime runs the float32 ONNX export; time it in fp32 without "
                                "--compile (drop the precision and compile options, which choose how PyTorch runs it)")
        elif self.runtime == "tensorrt":
            if not cuda:
                raise UserError(f"{self.flag} tensorrt needs a CUDA GPU; use --device cuda, or time with "
                                f"{self.flag} torch or onnxruntime")
            if _missing("torch_tensorrt"):
                raise UserError(f"{self.flag} tensorrt needs torch_tensorrt, which is not installed; install it "
                                f"with: pip install torch-tensorrt (or use {self.flag} torch)")
            if self.deployment.dtype == "bf16":
                raise UserError(f"{self.flag} tensorrt builds half-precision engines in fp16: time in fp16 or fp32")

    def favoured_multiple(self) -> int:
        """The width multiple the runtime's kernels favour: the CPU's vector width in floats (8 with
        AVX2, 16 with AVX-512), 8 for CUDA tensor cores."""
        if self.torch_device.type == "cuda":
            return 8
        return 16 if "AVX512" in str(torch.backends.cpu.get_cpu_capability()) else 8

    def versions(self) -> dict[str, str | None]:
        names = {"torch": ("torch",), "onnxruntime": ("torch", "onnxruntime", "onnx"),
                 "tensorrt": ("torch", "torch_tensorrt", "tensorrt")}[self.runtime]
        found: dict[str, str | None] = {}
        for name in names:
            try:
                found[name] = metadata.version(name.replace("_", "-"))
            except metadata.PackageNotFoundError:
                found[name] = None
        return found

    def key(self) -> dict[str, Any]:
        """What a measurement on this target depends on (the latency tables' cache key)."""
        d = self.deployment
        return {"runtime": self.runtime, "versions": self.versions(), "device": device_name(self.torch_device),
                "cpu_capability": str(torch.backends.cpu.get_cpu_capability()), "batch": self.batch,
                "threads": self.thread_count, "dtype": d.dtype, "channels_last": d.channels_last,
                "cudnn_benchmark": d.autotune(self.torch_device), "compile": d.compile}

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "device": str(self.torch_device), "device_name": device_name(self.torch_device),
                "batch": self.batch,
                "threads": self.thread_count, "dtype": self.deployment.dtype,
                "channels_last": self.deployment.channels_last}

    # runners -------------------------------------------------------------------------------

    def model_runner(self, model: nn.Module, input_shape: Sequence[int]) -> Runner:
        """`model` as it runs on this target, on a fixed random batch (see the module doc)."""
        return self.prepare(model, input_shape)(self.batch)

    def prepare(self, model: nn.Module, input_shape: Sequence[int]) -> Callable[[int], Runner]:
        """`model` made ready for this runtime once (deployed, exported), as a runner per batch size."""
        if self.runtime == "onnxruntime":
            session = _onnx_session(_onnx_export(model, input_shape), self.thread_count)
            return lambda batch: _onnx_runner(session, input_shape, batch)
        if self.runtime == "tensorrt":
            return lambda batch: _tensorrt_runner(model, input_shape, dataclasses.replace(self, batch=batch))
        timed = deployed(model, self.deployment, self.torch_device, input_shape)
        return lambda batch: _torch_runner(timed, dataclasses.replace(self, batch=batch)._input(input_shape),
                                           self.torch_device)

    def layer_runner(self, layer: nn.Module, input_shape: Sequence[int]) -> Runner:
        """One conv/linear layer (random weights) as it runs on this target, on `input_shape` inputs."""
        if self.runtime == "onnxruntime":
            session = _onnx_session(_onnx_layer(layer, input_shape, self.batch), self.thread_count)
            return _onnx_runner(session, input_shape, self.batch)
        if self.runtime == "tensorrt":
            return _tensorrt_runner(layer, input_shape, self)
        d = self.deployment
        layer = layer.eval().to(device=self.torch_device, dtype=DTYPES[d.dtype])
        if d.channels_last and len(input_shape) == 3:
            layer = layer.to(memory_format=torch.channels_last)
        return _torch_runner(layer, self._input(input_shape), self.torch_device)

    def _input(self, input_shape: Sequence[int]) -> torch.Tensor:
        x = _random_input(self.batch, input_shape).to(device=self.torch_device, dtype=DTYPES[self.deployment.dtype])
        return x.contiguous(memory_format=torch.channels_last) if self.deployment.channels_last and x.dim() == 4 else x

    @contextlib.contextmanager
    def timing(self) -> Iterator[None]:
        """The state every run on this target is timed in: threads, autotuning, no autograd."""
        before = torch.get_num_threads()
        torch.set_num_threads(self.thread_count)
        try:
            with cudnn_autotune(self.deployment.autotune(self.torch_device)), torch.inference_mode():
                yield
        finally:
            torch.set_num_threads(before)


def _missing(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return True
    return False


def _random_input(batch: int, input_shape: Sequence[int]) -> torch.Tensor:
    # Random rather than zero input: some kernels take shortcuts on zeros.
    return torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))


def _torch_runner(model: nn.Module, x: torch.Tensor, device: torch.device) -> Runner:
    cuda = device.type == "cuda"

    def run() -> None:
        model(x)
        if cuda:
            torch.cuda.synchronize(device)

    return run


def _onnx_session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _onnx_runner(session: Any, input_shape: Sequence[int], batch: int) -> Runner:
    feed = {session.get_inputs()[0].name: _random_input(batch, input_shape).numpy()}

    def run() -> None:
        session.run(None, feed)

    return run


def _onnx_export(model: nn.Module, input_shape: Sequence[int]) -> bytes:
    """The model exported to ONNX with a dynamic batch axis, checked against PyTorch as `export` checks it."""
    from .export import export_onnx

    with tempfile.TemporaryDirectory(prefix="chanprune-latency-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(copy.deepcopy(model).cpu().float().eval(), path, input_shape)
        return path.read_bytes()


def _onnx_layer(layer: nn.Module, input_shape: Sequence[int], batch: int) -> bytes:
    """One conv or linear layer as a one-node ONNX model (its weights as initialisers)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, *input_shape])]
    weight = layer.weight.detach().float().cpu()
    initialisers = [numpy_helper.from_array(weight.numpy(), "weight")]
    names = ["input", "weight"]
    if layer.bias is not None:
        initialisers.append(numpy_helper.from_array(layer.bias.detach().float().cpu().numpy(), "bias"))
        names.append("bias")
    if isinstance(layer, nn.Linear):
        if len(input_shape) == 1:
            nodes = [helper.make_node("Gemm", names, ["output"], transB=1)]
        else:  # tokens: MatMul with the transposed weight (+ bias)
            initialisers[0] = numpy_helper.from_array(weight.t().contiguous().numpy(), "weight")
            product = "output" if layer.bias is None else "product"
            nodes = [helper.make_node("MatMul", ["input", "weight"], [product])]
            if layer.bias is not None:
                nodes.append(helper.make_node("Add", ["product", "bias"], ["output"]))
    elif isinstance(layer, nn.modules.conv._ConvNd):
        if layer.padding_mode != "zeros":
            raise UserError(f"--latency-runtime onnxruntime: a {layer.padding_mode}-padded convolution cannot be timed "
                            "as one ONNX node; use --latency-runtime torch")
        attrs: dict[str, Any] = {"kernel_shape": list(layer.kernel_size), "strides": list(layer.stride),
                                 "dilations": list(layer.dilation), "group": layer.groups}
        if isinstance(layer.padding, str):
            attrs["auto_pad"] = "SAME_UPPER" if layer.padding == "same" else "VALID"
        else:
            attrs["pads"] = list(layer.padding) * 2
        nodes = [helper.make_node("Conv", names, ["output"], **attrs)]
    else:
        raise TypeError(f"cannot time a {type(layer).__name__} as one ONNX node")
    return _onnx_bytes(onnx, helper, nodes, inputs, initialisers)


def _onnx_bytes(onnx: Any, helper: Any, nodes: list[Any], inputs: list[Any], initialisers: list[Any]) -> bytes:
    output = helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "layer", inputs, [output], initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _ONNX_OPSET)])
    return model.SerializeToString()


def _tensorrt_runner(model: nn.Module, input_shape: Sequence[int], target: LatencyTarget) -> Runner:
    """The model compiled by Torch-TensorRT for the target's batch size and precision."""
    torch_tensorrt = importlib.import_module("torch_tensorrt")
    dtype = torch.float16 if target.deployment.dtype == "fp16" else torch.float32
    device = target.torch_device
    module = model.eval().to(device=device, dtype=dtype)
    x = _random_input(target.batch, input_shape).to(device=device, dtype=dtype)
    try:
        compiled = torch_tensorrt.compile(module, inputs=[x], enabled_precisions={dtype})
    except Exception as exc:  # noqa: BLE001  (TensorRT's builder fails with many types)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"--latency-runtime tensorrt cannot build this model: {first}; use --latency-runtime torch") from None
    return _torch_runner(compiled, x, device)


# --------------------------------------------------------------------------------------------
# timing


@dataclass(frozen=True)
class Timing:
    """How many runs a latency takes: `warmup` untimed runs of each runner, then `repeats` timed rounds.
    With `max_time` (seconds), one probe round (after `settle` untimed runs: autotuning and compiling
    happen in the first) says how long a round takes; the rounds are then cut to take about
    `max_time` (never fewer than `MIN_REPEATS`) and the warm-up to a quarter of it."""

    warmup: int = 3
    repeats: int = 30
    max_time: float | None = 5.0
    settle: int = 0


def time_interleaved(runners: Sequence[Runner], timing: Timing = Timing()) -> list[list[float]]:
    """The milliseconds of every timed run of each runner, taken round by round (A, B, A, B, ...).

    Call it inside `LatencyTarget.timing()` (threads, autotuning, no autograd)."""
    return interleaved_runs(runners, timing)[0]


def interleaved_runs(runners: Sequence[Runner], timing: Timing) -> tuple[list[list[float]], int]:
    """`time_interleaved`, and the untimed runs each runner had (the probe included)."""
    if not runners:
        return [], 0

    def round_() -> float:
        start = time.perf_counter()
        for run in runners:
            run()
        return time.perf_counter() - start

    warmup, repeats, done = timing.warmup, timing.repeats, 0
    if timing.max_time is not None and timing.max_time > 0 and (repeats > MIN_REPEATS or warmup > 1):
        for _ in range(timing.settle):
            round_()
        per_round = max(round_(), 1e-6)
        done = timing.settle + 1
        warmup = max(0, min(warmup - done, int(0.25 * timing.max_time / per_round)))
        repeats = max(MIN_REPEATS, min(repeats, int(timing.max_time / per_round)))
    for _ in range(warmup):
        round_()
    times: list[list[float]] = [[] for _ in runners]
    for _ in range(repeats):
        for i, run in enumerate(runners):
            start = time.perf_counter()
            run()
            times[i].append((time.perf_counter() - start) * 1000.0)
    return times, done + warmup


def median_ms(times: Sequence[float]) -> float:
    return statistics.median(times) if times else math.nan
