"""The `bench` recipe: params, MACs, size, latency, throughput and accuracy of models side by side,
compared with the first (the reference), and the CI gates evaluated (deploy/benchmark.py). The
models are timed round by round (A, B, A, B, ...) on the runtime they ship in (deploy/runtimes.py)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape

from ..checkpoint import nonfinite_summary
from ..data import make_loader
from ..deploy import benchmark
from ..deploy.runtimes import RUNTIMES, LatencyTarget, Timing, interleaved_runs
from ..errors import UserError
from ..prune.workload import count_work, on_reference_workload
from ..support.device import resolve_device
from ..support.fsutil import check_output
from .opening import ModelOptions, OpenedModel, open_model
from .steps import DataOptions, check_distinct_outputs, check_json_report, recipe_entry, seed_everything, warn

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

__all__ = ["BenchOptions", "BenchResult", "bench_checkpoints"]

PLOT_FORMATS = (".png", ".svg", ".pdf")


@dataclass(frozen=True)
class BenchOptions:
    """What `bench_checkpoints` does besides the checkpoints; names and defaults as the options of
    `chanprune bench`. `batch_sizes` ("1,32" or a sequence) are timed, each `repeats` times after
    `warmup` runs (at most about `max_time` seconds per model and batch size), on `threads` CPU
    threads (None: torch's current count), as `deployment` says (precision, channels-last, cuDNN
    autotuning, torch.compile), in `runtime` ("torch", "onnxruntime": each model exported to a
    temporary ONNX file, checked as `export` checks it; "tensorrt" on CUDA); accuracy (with
    `data.data`) in float32. Gates: `max_acc_drop` (top-1 points lost, needs data), `min_speedup` and
    `max_latency_ratio` (model latency / reference latency) at `gate_batch`, default the largest
    batch size. `plot` and `json_report`: where the caller will draw the figure and write the JSON
    report (report/), checked before the slow steps."""

    batch_sizes: str | Sequence[int] = "1,32"  # parsed: sorted, without duplicates
    threads: int | None = None
    warmup: int = 10
    repeats: int = 50
    max_time: float = 10.0
    deployment: benchmark.Deployment = field(default_factory=benchmark.Deployment)
    max_acc_drop: float | None = None
    min_speedup: float | None = None
    gate_batch: int | None = None
    runtime: str = "torch"
    max_latency_ratio: float | None = None
    model: ModelOptions = field(default_factory=ModelOptions)
    data: DataOptions = field(default_factory=DataOptions)
    plot: str | None = None
    force: bool = False
    json_report: str | None = None

    def __post_init__(self) -> None:
        text = self.batch_sizes if isinstance(self.batch_sizes, str) else ",".join(str(b) for b in self.batch_sizes)
        sizes = benchmark.parse_batch_sizes(text)
        if self.gate_batch is not None and self.gate_batch not in sizes:
            raise UserError(f"--gate-batch {self.gate_batch} is not one of --batch-sizes {text}; pick one of them")
        object.__setattr__(self, "batch_sizes", sizes)
        for name, value in (("--max-acc-drop", self.max_acc_drop), ("--min-speedup", self.min_speedup),
                            ("--max-latency-ratio", self.max_latency_ratio)):
            if value is not None and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
        if self.max_acc_drop is not None:
            if self.max_acc_drop < 0:
                raise UserError(f"--max-acc-drop must be 0 or more (percentage points), got {self.max_acc_drop:g}")
            if self.data.data is None:
                raise UserError("--max-acc-drop needs accuracy: pass --data")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise UserError(f"--min-speedup must be positive (a latency ratio such as 1.5), got {self.min_speedup:g}")
        if self.max_latency_ratio is not None and self.max_latency_ratio <= 0:
            raise UserError(f"--max-latency-ratio must be positive (a model's latency over the reference's, such as "
                            f"0.6), got {self.max_latency_ratio:g}")
        if self.runtime not in RUNTIMES:
            raise UserError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        self.deployment.check()


@dataclass
class BenchResult:
    """What `bench_checkpoints` measured (deploy/benchmark.py's results, reference first)."""

    models: list[benchmark.ModelResult]
    comparisons: list[benchmark.Comparison]  # one per model (the reference's own is 1× / ±0)
    gates: list[benchmark.Gate]  # a gate that is not met is recorded here, not raised
    device: str
    threads: int | None
    batch_sizes: list[int]
    timing: dict[str, Any]  # warmup, repeats, max_time_s (as requested; each latency entry says what was done)
    gate_batch: int | None = None
    data: dict[str, Any] | None = None  # source, max_batches
    seed: int | None = None
    plot: str | None = None  # where the caller draws the figure (report/plots.py)
    warnings: list[str] = field(default_factory=list)  # e.g. benchmark.slowdowns()


def check_plot(path: str | os.PathLike[str]) -> None:
    """`--plot`: matplotlib is there to draw it, and the file name ends in an image type it writes."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'chanprune[plot]' (or run without --plot)") from None
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise UserError(f"--plot {os.fspath(path)}: unknown image type {suffix or '(no extension)'!r}; "
                        f"use a file name ending in {', '.join(PLOT_FORMATS)}")


@recipe_entry
def bench_checkpoints(checkpoints: Sequence[str], options: BenchOptions | None = None) -> BenchResult:
    """Measure `checkpoints` (the first is the reference) and evaluate the gates. `model.classes`
    label the classes of the data; `model.output` picks the task output of models with several
    (else each model's recorded one); without `mean`/`std`, those the checkpoints record are used
    (they must agree). A gate that is not met is recorded in the result's `gates`, not raised
    (`deploy.benchmark.gate_failure` says what failed)."""
    o = options or BenchOptions()
    _check_outputs(checkpoints, o)
    dev = resolve_device(o.model.device)
    threads = o.threads if o.threads is not None else torch.get_num_threads()
    target = LatencyTarget(runtime=o.runtime, device=str(dev), threads=threads, deployment=o.deployment, flag="--runtime")
    target.check()
    precision = benchmark.precision_warning(o.deployment.dtype, dev)
    if precision is not None:
        warn(precision)
    seed_everything(o.data.seed)

    opened = _open_all(checkpoints, o)
    data, calib_batches = o.data.data, o.data.calib_batches
    # Open the data before the slow steps, so that bad data fails first.
    first_loader = None if data is None else opened[0].loader(data, o.data, max_batches=calib_batches,
                                                              labels=opened[0].labels())
    n = len(opened)
    results = []
    for i, (path, model) in enumerate(zip(checkpoints, opened)):
        with _status(f"counting MACs of model {i + 1}/{n}: {path}"):
            results.append(benchmark.describe(model.loaded, path, model.input_shape))
    _on_reference_workload(results, [m.model for m in opened], opened[0].input_shape)
    data_info: dict[str, Any] | None = None
    if first_loader is not None:
        for i, (result, model) in enumerate(zip(results, opened)):
            with _status(f"evaluating model {i + 1}/{n}: {result.path}"):
                result.accuracy = benchmark.accuracy(model.model, _fresh_loader(first_loader, o.data), dev, calib_batches)
        data_info = {"source": data, "max_batches": calib_batches, "images": results[0].accuracy["images"],  # type: ignore[index]
                     "normalization": {"mean": list(first_loader.dataset.mean), "std": list(first_loader.dataset.std)}}
    _time(results, [m.model for m in opened], opened[0].input_shape, o, target)
    comparisons = [benchmark.compare(results[0], r) for r in results]
    gates = benchmark.evaluate_gates(results, comparisons, max_acc_drop=o.max_acc_drop, min_speedup=o.min_speedup,
                                     gate_batch=_gate_batch(o), max_latency_ratio=o.max_latency_ratio)
    slower = benchmark.slowdowns(results, comparisons, dev) + benchmark.noisy_timings(results, comparisons)
    for line in slower:
        warn(line)
    return BenchResult(
        models=results, comparisons=comparisons, gates=gates, device=str(dev), threads=threads,
        batch_sizes=list(o.batch_sizes), timing={"warmup": o.warmup, "repeats": o.repeats, "max_time_s": o.max_time,
                                                 **o.deployment.to_json(dev), "runtime": o.runtime,
                                                 "interleaved": True},
        gate_batch=_gate_batch(o), data=data_info, seed=o.data.seed, plot=o.plot, warnings=slower)


def _on_reference_workload(results: list[benchmark.ModelResult], models: Sequence[torch.nn.Module],
                           shape: tuple[int, ...]) -> None:
    """The MACs of models whose work depends on their input (a detector's proposals and detections)
    counted on the reference's workload, as `prune` counts them, and said in one line each."""
    if len(models) < 2:
        return
    with _status("counting the MACs on the reference's workload"):
        work = count_work(models[0], shape)
        counted = []
        for model in models[1:]:
            own = count_work(model, shape, nominal=False)
            counted.append((own, on_reference_workload(models[0], work, model, own.macs)))
    if not (work.detector or work.nominal is not None or any(matched.changed for _, matched in counted)):
        return
    results[0].macs = work.total
    statement = work.statement().replace("the original's", "the reference's")
    for result, (own, matched) in zip(results[1:], counted):
        result.macs = matched.total
        warn(f"{result.path}: MACs counted {statement}: {matched.total:,} (its own workload: {own.total:,}), "
             f"the reference's {work.total:,}")


def _gate_batch(o: BenchOptions) -> int:
    return o.gate_batch if o.gate_batch is not None else max(o.batch_sizes)  # type: ignore[type-var]


def _check_outputs(checkpoints: Sequence[str], o: BenchOptions) -> None:
    """What depends on the checkpoints given, and the outputs: checked before anything is loaded."""
    if not checkpoints:
        raise UserError("give at least one checkpoint: chanprune bench REFERENCE [MODEL...]")
    for name, value in (("--max-acc-drop", o.max_acc_drop), ("--min-speedup", o.min_speedup),
                        ("--max-latency-ratio", o.max_latency_ratio)):
        if value is not None and len(checkpoints) < 2:
            raise UserError(f"{name} compares models with the first checkpoint (the reference); give at least two checkpoints")
    check_json_report(o.json_report, o.force)
    if o.plot is not None:
        check_plot(o.plot)
        check_output(o.plot, o.force)
    check_distinct_outputs(("--json", o.json_report), ("--plot", o.plot))
    inputs = {os.path.normcase(os.path.realpath(c)) for c in checkpoints}
    for option, path in (("--json", o.json_report), ("--plot", o.plot)):
        if path is not None and path != "-" and os.path.normcase(os.path.realpath(path)) in inputs:
            raise UserError(f"{option} {path} is one of the checkpoints to compare; give the output its own file")


def _open_all(checkpoints: Sequence[str], o: BenchOptions) -> list[OpenedModel]:
    """Every checkpoint opened; they must take one input shape and, when the normalisation comes
    from what they record, record the same (every model sees the same images)."""
    opened = [open_model(c, o.model, data=o.data.data) for c in checkpoints]
    shape = opened[0].input_shape
    for path, model in zip(checkpoints[1:], opened[1:]):
        if tuple(model.input_shape) != tuple(shape):
            raise UserError(f"{path} takes input {'x'.join(map(str, model.input_shape))} but the reference "
                            f"{checkpoints[0]} takes {'x'.join(map(str, shape))}; bench compares models on one input, "
                            "pass --input-shape")
    given = (o.model.mean, o.model.std)
    found: dict[tuple[Any, Any], str] = {}
    for path, model in zip(checkpoints, opened):
        if (model.mean, model.std) != given:
            found.setdefault((model.mean, model.std), path)
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise UserError(f"{first} and {second} record different normalisation (mean, std) {a} and {b}; pass --mean "
                        "and --std for the data all models are compared on")
    mean, std = next(iter(found), given)
    for path, model in zip(checkpoints, opened):
        model.mean, model.std = mean, std
        bad = nonfinite_summary(model.model)
        if bad is not None:  # still timed; its accuracy is meaningless and --max-acc-drop will say so
            warn(f"{path}: the model has NaN/Inf weights in {bad}; its accuracy is meaningless")
    return opened


def _time(results: list[benchmark.ModelResult], models: list[Any], shape: tuple[int, int, int], o: BenchOptions,
          target: LatencyTarget) -> None:
    """Every model timed at every batch size as deployed on `target`, round by round (A, B, A, B, ...):
    `max_time` bounds each model's share of a batch size's rounds."""
    n = len(models)
    prepared = []
    for i, (result, model) in enumerate(zip(results, models)):
        with _status(f"preparing model {i + 1}/{n} for timing ({o.runtime}, {o.deployment.dtype}): {result.path}"):
            prepared.append(target.prepare(model, shape))
    tuned = o.deployment.autotune(target.torch_device) or o.deployment.compile
    timing = Timing(warmup=max(o.warmup, 2) if tuned else o.warmup, repeats=o.repeats,
                    max_time=o.max_time * n if o.max_time else None, settle=1 if tuned else 0)
    for b in o.batch_sizes:
        with _status(f"timing {n} model(s) at batch {b}, round by round"):
            runners = [p(b) for p in prepared]
            with target.timing():
                times, warmup = interleaved_runs(runners, timing)
        for result, ms in zip(results, times):
            result.latency[b] = {**benchmark.latency_summary(ms, b, target.thread_count, warmup), "runs_ms": ms}


def _fresh_loader(first: DataLoader, data: DataOptions) -> DataLoader:
    """A loader over the already opened data set that draws the same images for every model."""
    return make_loader(first.dataset, batch_size=data.batch_size, workers=data.workers, seed=data.seed,
                       shuffle=data.calib_batches is not None, max_batches=data.calib_batches)


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    """A transient status line on stderr when it is a terminal (nothing in logs and pipes)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(escape(text)):
        yield
