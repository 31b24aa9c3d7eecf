"""Benchmarking models side by side: what `chanprune bench` measures and gates on.

The first model is the reference: every other model's speed-up, MACs ratio and accuracy change
are relative to it. Measuring is split in steps the command calls in order (describe every model,
then accuracy, then latency), so that bad data fails before the slow timing starts.

Latency: warm-up runs, then the median (and p90) of repeated timed forward passes of one random
batch, CUDA synchronised, with a fixed intra-op thread count on the CPU. `chanprune bench` times
the models round by round (A, B, A, B, ...: `runtimes.time_interleaved`, summarised by
`latency_summary`), so that a machine that gets busier slows every model alike, in PyTorch or in
ONNX Runtime (`runtimes.LatencyTarget`); `time_model` times one model alone
(`measure.measure_latency`). Models are timed as deployed (`Deployment`): a copy in the chosen
precision (fp32, fp16, bf16: weights and input converted, as an exported half-precision model
runs), optionally in channels-last memory order and through torch.compile, with cuDNN autotuning
(on CUDA, by default) scoped to the timing: the warm-up runs pick each layer's fastest kernel.
Accuracy is measured on the float32 model. The median rather than the mean, because a busy machine
only ever adds time: one preempted run moves the mean but not the median. `max_time` bounds one
model at one batch size: after a probe run, the number of timed runs is cut so that they take
about `max_time` seconds (never fewer than `MIN_REPEATS`), so large models at large batches stay
affordable on a CPU.

Gates (for CI): `max-acc-drop` compares each model's top-1 with the reference's (percentage points,
positive = worse); `min-speedup` compares measured latency, reference median / model median, at one
batch size; `max-latency-ratio` the other way round, model median / reference median. Every
non-reference model is gated; the command exits 3 when any gate fails.

Noise: models timed round by round give one speed-up per round. When the middle 80 % of those
(p10 to p90) spans more than `NOISY_SPREAD`, the machine's load moved the models unequally and the
speed-up is unreliable: `noisy_timings` says so, and a speed-up gate whose limit lies in that range
is marked `noisy` (its verdict may flip on a re-run) rather than passing or failing silently.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .. import measure
from ..engine.layer_rules import layer_shape
from ..errors import UserError
from ..support.device import cpu_has_native_bf16

if TYPE_CHECKING:
    from ..checkpoint import LoadedCheckpoint
    from ..models import ArchSpec

MIN_REPEATS = 5  # the fewest timed runs a time-bounded measurement keeps
NOISY_SPREAD = 1.5  # rounds' speed-ups whose p90 exceeds their p10 by more than this make a ratio unreliable
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_TUNED_WARMUP = 2  # with autotuning or compilation, the first run tunes/compiles and the second runs the result


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    """'1,32' -> (1, 32): sorted, without duplicates; UserError on anything else."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise UserError(f"--batch-sizes {text!r}: expected comma-separated positive integers, e.g. 1,32")
    return tuple(sorted(set(values)))


# --------------------------------------------------------------------------------------------
# one model


@dataclass
class ModelResult:
    """What was measured for one checkpoint."""

    path: str
    source_format: str
    arch: ArchSpec | None
    input_shape: tuple[int, int, int]
    params: int
    macs: int
    size_bytes: int  # parameters + buffers
    file_size_mb: float  # the checkpoint file on disk
    widths: dict[str, int]  # out channels of every conv / linear, by module name
    original_widths: dict[str, int] | None = None  # of the unpruned architecture, for pruned chanprune files
    latency: dict[int, dict[str, Any]] = field(default_factory=dict)  # batch size -> measure_latency result
    accuracy: dict[str, Any] | None = None  # top1, top5 (0-100), images, loss

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.source_format,
            "arch": self.arch.to_json() if self.arch is not None else None,
            "input_shape": list(self.input_shape),
            "params": int(self.params),
            "macs": int(self.macs),
            "size_mb": round(self.size_bytes / float(1 << 20), 6),
            "file_size_mb": round(self.file_size_mb, 6),
            "latency_ms": {
                str(b): {"median": r["median_ms"], "p90": r["p90_ms"], "mean": r["mean_ms"], "min": r["min_ms"],
                         "std": r["std_ms"], "repeats": int(r["repeats"]), "warmup": int(r.get("warmup", 0))}
                for b, r in sorted(self.latency.items())
            },
            "throughput_ips": {str(b): r["throughput_ips"] for b, r in sorted(self.latency.items())},
            "accuracy": None if self.accuracy is None else {
                "top1": float(self.accuracy["top1"]), "top5": float(self.accuracy["top5"]),
                "images": int(self.accuracy["images"])},
            "widths": dict(self.widths),
        }


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear module, in definition order."""
    widths: dict[str, int] = {}
    for name, module in model.named_modules():
        shape = layer_shape(module)
        if shape is not None and shape.kind in ("conv", "linear"):
            widths[name] = int(shape.out_channels or 0)
    return widths


def original_widths(loaded: LoadedCheckpoint) -> dict[str, int] | None:
    """Widths of the unpruned architecture a pruned chanprune file came from (None otherwise).

    Built on the meta device: no memory and no weight initialisation, only the module shapes.
    """
    if not loaded.plans or loaded.arch is None:
        return None
    from ..models import build_model

    try:
        with torch.device("meta"):
            model = build_model(loaded.arch)
    except Exception:  # noqa: BLE001  (a factory that cannot build on the meta device: no "before" widths)
        return None
    return layer_widths(model)


def describe(loaded: LoadedCheckpoint, path: str, input_shape: tuple[int, int, int]) -> ModelResult:
    """Params, MACs, sizes and widths of a loaded checkpoint (no timing, no data)."""
    model = loaded.model.eval()
    return ModelResult(
        path=path,
        source_format=loaded.source_format,
        arch=loaded.arch,
        input_shape=tuple(input_shape),  # type: ignore[arg-type]
        params=measure.count_params(model),
        macs=measure.count_macs(model, input_shape),
        size_bytes=measure.model_size_bytes(model),
        file_size_mb=measure.file_size_mb(path),
        widths=layer_widths(model),
        original_widths=original_widths(loaded),
    )


# --------------------------------------------------------------------------------------------
# timing as deployed


@dataclass(frozen=True)
class Deployment:
    """How models are timed: precision, memory order, cuDNN autotuning and torch.compile."""

    dtype: str = "fp32"  # fp32 | fp16 | bf16
    channels_last: bool = False
    cudnn_benchmark: bool | None = None  # None: on CUDA
    compile: bool = False

    def check(self) -> None:
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")

    def autotune(self, device: torch.device) -> bool:
        """Whether cuDNN picks kernels by timing them (only CUDA has cuDNN)."""
        return device.type == "cuda" and (self.cudnn_benchmark if self.cudnn_benchmark is not None else True)

    def to_json(self, device: torch.device) -> dict[str, Any]:
        cuda = device.type == "cuda"
        return {"dtype": self.dtype, "channels_last": self.channels_last, "cudnn_benchmark": self.autotune(device),
                "compile": self.compile, "device_name": device_name(device),
                # fp32 convolutions on Ampere and later run as TF32 unless this is off
                "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32) if cuda else None}


def device_name(device: torch.device) -> str:
    """The GPU's name (e.g. 'NVIDIA H100 80GB HBM3'), else the CPU's as the platform reports it."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine() or "cpu"


def precision_warning(dtype: str, device: torch.device) -> str | None:
    """One line when `dtype` is not what `device` runs natively (None: it is)."""
    if device.type == "cpu":
        if dtype == "fp16":
            return ("--dtype fp16 on the CPU: half precision is for GPUs; CPU kernels run it slower than fp32, "
                    "so this latency says little about deployment (time fp16 on a GPU, or use bf16/fp32 here)")
        if dtype == "bf16" and not cpu_has_native_bf16():
            return "--dtype bf16: this CPU has no native bf16 arithmetic; it is emulated and slower than fp32"
    elif device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        return "--dtype bf16: this GPU has no native bf16 arithmetic (before Ampere); use fp16"
    return None


@contextlib.contextmanager
def cudnn_autotune(enabled: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` set for the block and restored after it."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def deployed(model: nn.Module, settings: Deployment, device: torch.device, input_shape: Sequence[int]) -> nn.Module:
    """A copy of `model` as `settings` time it (the original is left as it is); one forward at
    batch 1 proves that it runs (a precision or compiler the device lacks is a UserError here)."""
    copy_ = copy.deepcopy(model).eval().to(device=device, dtype=DTYPES[settings.dtype])
    if settings.channels_last:
        copy_ = copy_.to(memory_format=torch.channels_last)
    timed: nn.Module = torch.compile(copy_, dynamic=False) if settings.compile else copy_
    try:
        with cudnn_autotune(settings.autotune(device)):
            measure.measure_latency(timed, input_shape, 1, device, warmup=0, repeats=1,
                                    channels_last=settings.channels_last)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001  (kernels and compilers fail with many types)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        what = "torch.compile" if settings.compile else f"--dtype {settings.dtype}"
        raise UserError(f"{what} does not run on {device}: {first}; time without it") from None
    return timed


def time_model(model: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device | str, *,
               warmup: int, repeats: int, threads: int | None, max_time: float | None,
               settings: Deployment | None = None) -> dict[str, Any]:
    """`measure.measure_latency`, with the number of runs bounded by `max_time` seconds (see the
    module doc); `model` as `deployed` made it for `settings`, whose autotuning is on while it runs.

    The result has `warmup` (runs before timing, the probe included) and `repeats` (timed runs) as done.
    """
    settings = settings or Deployment()
    device = torch.device(device)
    tuned = settings.autotune(device) or settings.compile
    if tuned:
        warmup = max(warmup, _TUNED_WARMUP)
    with cudnn_autotune(settings.autotune(device)):
        return _time_model(model, input_shape, batch_size, device, warmup=warmup, repeats=repeats, threads=threads,
                           max_time=max_time, channels_last=settings.channels_last,
                           probe_warmup=min(_TUNED_WARMUP if tuned else 1, warmup))


def _time_model(model: nn.Module, input_shape: Sequence[int], batch_size: int, device: torch.device, *,
                warmup: int, repeats: int, threads: int | None, max_time: float | None, channels_last: bool,
                probe_warmup: int) -> dict[str, Any]:
    if not max_time or max_time <= 0 or repeats <= MIN_REPEATS:
        result = measure.measure_latency(model, input_shape, batch_size, device, warmup=warmup, repeats=repeats,
                                         threads=threads, channels_last=channels_last)
        result["warmup"] = warmup
        return result
    # Probe: untimed runs and one timed run tell roughly how long a run takes (and warm up).
    probe = measure.measure_latency(model, input_shape, batch_size, device, warmup=probe_warmup, repeats=1,
                                    threads=threads, channels_last=channels_last)
    per_run = max(probe["median_ms"] / 1000.0, 1e-6)
    timed = max(MIN_REPEATS, min(repeats, int(max_time / per_run)))
    done = probe_warmup + 1
    # The rest of the warm-up, within a quarter of the time budget.
    extra_warmup = max(0, min(warmup - done, int(0.25 * max_time / per_run)))
    result = measure.measure_latency(model, input_shape, batch_size, device, warmup=extra_warmup, repeats=timed,
                                     threads=threads, channels_last=channels_last)
    result["warmup"] = done + extra_warmup
    return result


def latency_summary(ms: Sequence[float], batch_size: int, threads: int, warmup: int) -> dict[str, Any]:
    """Timed runs (ms) as `measure.measure_latency` reports them, with the warm-up runs done."""
    ordered = sorted(ms)
    median = statistics.median(ordered)
    return {"median_ms": median, "p90_ms": measure.percentile(ordered, 90.0), "mean_ms": statistics.fmean(ordered),
            "min_ms": ordered[0], "std_ms": statistics.stdev(ordered) if len(ordered) > 1 else 0.0,
            "throughput_ips": batch_size / (median / 1000.0) if median > 0 else float("inf"),
            "batch_size": batch_size, "repeats": len(ordered), "threads": threads, "warmup": warmup}


def accuracy(model: nn.Module, loader: Any, device: torch.device, max_batches: int | None) -> dict[str, Any]:
    result = measure.evaluate(model, loader, device, max_batches=max_batches, progress=True)
    return {"top1": float(result["top1"]), "top5": float(result["top5"]), "images": int(result["images"]),
            "loss": float(result["loss"])}


# --------------------------------------------------------------------------------------------
# comparison with the reference


@dataclass
class Comparison:
    """One model relative to the reference (the first model)."""

    macs_ratio: float  # reference MACs / model MACs: the speed-up MACs alone would predict
    params_ratio: float  # reference params / model params
    speedup: dict[int, float]  # batch size -> reference median latency / model median latency
    top1_change: float | None  # model − reference, percentage points (negative: worse)
    top5_change: float | None
    # batch size -> p10 and p90 of the round-by-round speed-ups (models timed interleaved)
    speedup_range: dict[int, tuple[float, float]] = field(default_factory=dict)

    def noisy(self, batch_size: int) -> bool:
        """The rounds' speed-ups at `batch_size` spread too wide for the median's to be relied on."""
        lo, hi = self.speedup_range.get(batch_size, (1.0, 1.0))
        return hi > NOISY_SPREAD * lo

    def speedup_vs_macs_ratio(self, batch_size: int) -> float | None:
        """Measured speed-up / MACs ratio: 1.0 means the model is as much faster as it does less work."""
        value = self.speedup.get(batch_size)
        return None if value is None or not self.macs_ratio else value / self.macs_ratio

    def to_json(self) -> dict[str, Any]:
        return {
            "macs_ratio": self.macs_ratio,
            "params_ratio": self.params_ratio,
            "speedup": {str(b): v for b, v in sorted(self.speedup.items())},
            "speedup_vs_macs_ratio": {str(b): self.speedup_vs_macs_ratio(b) for b in sorted(self.speedup)},
            "top1_change": self.top1_change,
            "top5_change": self.top5_change,
            "speedup_range": {str(b): list(v) for b, v in sorted(self.speedup_range.items())},
            "noisy": sorted(b for b in self.speedup_range if self.noisy(b)),
        }


def slowdowns(results: Sequence[ModelResult], comparisons: Sequence[Comparison], device: torch.device) -> list[str]:
    """One line for each model that does less work than the reference yet runs slower at some batch
    size, with the likely cause: fewer MACs promise the opposite, so the user hears it."""
    lines = []
    for result, comp in zip(results[1:], comparisons[1:]):
        slower = [b for b, s in sorted(comp.speedup.items()) if s < 1.0]
        if comp.macs_ratio <= 1.0 or not slower:
            continue
        at = ", ".join(f"batch {b}: {comp.speedup[b]:.2f}x as fast" for b in slower)
        lines.append(f"{result.path} does {comp.macs_ratio:.2f}x fewer MACs than the reference but runs slower "
                     f"({at}); {_slowdown_cause(result, device)}")
    return lines


def _slowdown_cause(result: ModelResult, device: torch.device) -> str:
    if device.type == "cuda":
        unaligned = sum(1 for w in result.widths.values() if w % 8)
        if unaligned:
            return (f"{unaligned} of its {len(result.widths)} layers have widths that are not multiples of 8 and miss "
                    "the GPU's tensor-core kernels: prune with --round-to 8")
        return "its widths are multiples of 8, so cuDNN's kernel choice for the new shapes is the likely cause"
    return ("on the CPU a thin model's time can follow per-operation overhead and memory traffic rather than MACs "
            "(most at small batches)")


def _ratio(reference: float, value: float) -> float:
    return reference / value if value else math.inf


def compare(reference: ModelResult, model: ModelResult) -> Comparison:
    speedup = {b: _ratio(reference.latency[b]["median_ms"], r["median_ms"])
               for b, r in model.latency.items() if b in reference.latency}
    top1 = top5 = None
    if reference.accuracy is not None and model.accuracy is not None:
        top1 = model.accuracy["top1"] - reference.accuracy["top1"]
        top5 = model.accuracy["top5"] - reference.accuracy["top5"]
    ranges = {}
    for b, r in model.latency.items():
        ours, theirs = r.get("runs_ms"), reference.latency.get(b, {}).get("runs_ms")
        if ours and theirs and len(ours) == len(theirs):  # timed round by round: one speed-up per round
            rounds = sorted(_ratio(a, m) for a, m in zip(theirs, ours))
            ranges[b] = (measure.percentile(rounds, 10.0), measure.percentile(rounds, 90.0))
    return Comparison(_ratio(reference.macs, model.macs), _ratio(reference.params, model.params), speedup, top1, top5,
                      ranges)


def noisy_timings(results: Sequence[ModelResult], comparisons: Sequence[Comparison]) -> list[str]:
    """One line for each model and batch size whose rounds' speed-ups spread too wide to rely on."""
    lines = []
    for result, comp in zip(results[1:], comparisons[1:]):
        for b in sorted(b for b in comp.speedup_range if comp.noisy(b)):
            lo, hi = comp.speedup_range[b]
            tails = ", ".join(f"{name} p90 {r.latency[b]['p90_ms']:.3g} ms vs median {r.latency[b]['median_ms']:.3g}"
                              for name, r in (("reference", results[0]), ("model", result)))
            lines.append(f"{result.path} at batch {b}: timings too noisy to rely on its {comp.speedup[b]:.2f}x speed-up "
                         f"(the rounds' speed-ups range {lo:.2f}x to {hi:.2f}x, p10 to p90; {tails}); time it on a "
                         "quieter machine, with fewer --threads or a longer --max-time")
    return lines


# --------------------------------------------------------------------------------------------
# gates


@dataclass(frozen=True)
class Gate:
    """One CI check of one model against the reference."""

    name: str  # "max-acc-drop" | "min-speedup" | "max-latency-ratio"
    model: str  # the checked model's path
    limit: float
    # max-acc-drop: top-1 points lost vs the reference; min-speedup: reference latency / model latency;
    # max-latency-ratio: model latency / reference latency
    value: float
    passed: bool
    batch_size: int | None = None  # min-speedup, max-latency-ratio: the batch size compared
    # min-speedup, max-latency-ratio: the limit lies within the rounds' spread (p10-p90) of a noisy timing
    noisy: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model, "limit": self.limit, "value": self.value,
                "passed": self.passed, "batch_size": self.batch_size,
                "noisy": None if self.noisy is None else list(self.noisy)}

    def describe(self) -> str:
        """One line: the gate, the measured value and, when failed, by how much."""
        if self.name == "max-acc-drop":
            said = (f"loses {self.value:.2f} pts top-1" if self.value >= 0 else f"gains {-self.value:.2f} pts top-1")
            text = f"--max-acc-drop {self.limit:g}: {self.model} {said} vs the reference"
            return text + ("" if self.passed else f", {self.value - self.limit:.2f} pts over the limit")
        if self.name == "max-latency-ratio":
            text = (f"--max-latency-ratio {self.limit:g}: {self.model} takes {self.value:.3f} of the reference's latency "
                    f"at batch {self.batch_size}")
            return text + ("" if self.passed else f", {self.value - self.limit:.3f} over the limit") + self._noise()
        text = f"--min-speedup {self.limit:g}: {self.model} is {self.value:.2f}x as fast as the reference at batch {self.batch_size}"
        return text + ("" if self.passed else f", {self.limit - self.value:.2f}x short") + self._noise()

    def _noise(self) -> str:
        if self.noisy is None:
            return ""
        lo, hi = self.noisy
        return (f" (noisy: the rounds' values range {lo:.3g} to {hi:.3g} around the limit; a re-run may "
                f"{'fail' if self.passed else 'pass'})")


def evaluate_gates(results: Sequence[ModelResult], comparisons: Sequence[Comparison], *,
                   max_acc_drop: float | None, min_speedup: float | None, gate_batch: int | None,
                   max_latency_ratio: float | None = None) -> list[Gate]:
    """Check every non-reference model (results[1:], comparisons[1:]) against the requested limits."""
    gates: list[Gate] = []
    for result, comp in zip(results[1:], comparisons[1:]):
        if max_acc_drop is not None and comp.top1_change is not None:
            drop = -comp.top1_change
            gates.append(Gate("max-acc-drop", result.path, float(max_acc_drop), drop, drop <= max_acc_drop + 1e-9))
        if min_speedup is not None and gate_batch is not None and gate_batch in comp.speedup:
            value = comp.speedup[gate_batch]
            gates.append(Gate("min-speedup", result.path, float(min_speedup), value, value >= min_speedup,
                              batch_size=gate_batch, noisy=_spanned(comp, gate_batch, min_speedup)))
        if max_latency_ratio is not None and gate_batch is not None and gate_batch in comp.speedup:
            value = 1 / comp.speedup[gate_batch] if comp.speedup[gate_batch] else math.inf
            spanned = _spanned(comp, gate_batch, 1 / max_latency_ratio)
            gates.append(Gate("max-latency-ratio", result.path, float(max_latency_ratio), value,
                              value <= max_latency_ratio, batch_size=gate_batch,
                              noisy=None if spanned is None else (1 / spanned[1], 1 / spanned[0])))
    return gates


def _spanned(comp: Comparison, batch_size: int, speedup_limit: float) -> tuple[float, float] | None:
    """The rounds' speed-up range at `batch_size` when it is noisy and holds the limit, else None."""
    if not comp.noisy(batch_size):
        return None
    lo, hi = comp.speedup_range[batch_size]
    return (lo, hi) if lo <= speedup_limit <= hi else None


def gate_failure(gates: Sequence[Gate]) -> str | None:
    """The message of a GateFailed: every failed gate and by how much (None when all passed)."""
    failed = [g for g in gates if not g.passed]
    if not failed:
        return None
    return f"{len(failed)} gate(s) failed: " + "; ".join(g.describe() for g in failed)
