"""The `bench` recipe: params, MACs, size, latency, throughput and accuracy of models side by side,
compared with the first (the reference), and the CI gates evaluated (deploy/benchmark.py)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from ..data import ClassesArg, make_loader, parse_classes
from ..deploy import benchmark
from ..errors import UserError
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..checkpoint import nonfinite_summary
from ..checkpoint.chanprune_format import resolve_normalization
from .steps import (
    FloatsArg,
    ShapeArg,
    check_distinct_outputs,
    check_json_report,
    eval_loader,
    load_model,
    model_labels,
    parse_inputs,
    parse_output,
    resolve_input_shape,
    seed_everything,
    select_task_output,
    warn,
)

PLOT_FORMATS = (".png", ".svg", ".pdf")


@dataclass
class BenchResult:
    """What `bench_checkpoints` measured (deploy/benchmark.py's results, reference first)."""

    models: list[benchmark.ModelResult]
    comparisons: list[benchmark.Comparison]  # one per model (the reference's own is 1× / ±0)
    gates: list[benchmark.Gate]
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


def bench_checkpoints(
    checkpoints: Sequence[str],
    *,
    arch: str | None = None,
    arch_kwargs: str | dict[str, Any] | None = None,
    input_shape: ShapeArg | None = None,
    trust_pickle: bool = False,
    device: str = "auto",
    data: str | None = None,
    mean: FloatsArg | None = None,
    std: FloatsArg | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    calib_batches: int | None = None,
    classes: ClassesArg | None = None,
    output: str | None = None,
    batch_sizes: str | Sequence[int] = "1,32",
    threads: int | None = None,
    warmup: int = 10,
    repeats: int = 50,
    max_time: float = 10.0,
    dtype: str = "fp32",
    channels_last: bool = False,
    cudnn_benchmark: bool | None = None,
    compile: bool = False,
    max_acc_drop: float | None = None,
    min_speedup: float | None = None,
    gate_batch: int | None = None,
    plot: str | None = None,
    force: bool = False,
    json_report: str | None = None,
) -> BenchResult:
    """Measure `checkpoints` (the first is the reference) and evaluate the gates: `max_acc_drop`
    (top-1 points lost, needs `data`) and `min_speedup` (at `gate_batch`, default the largest of
    `batch_sizes`). `classes`: the models' class names in output order, which label the classes of
    `data`. `output` picks the task output of models with several (else each model's recorded one);
    without `mean`/`std`, those the checkpoints record are used (they must agree). Latency is timed
    as deployed (`deploy.benchmark.Deployment`): in `dtype`, `channels_last`, with cuDNN autotuning
    (`cudnn_benchmark`, None: on CUDA) and `compile`; accuracy in float32. A gate that is
    not met is recorded in the report's `gates`, not raised (`deploy.benchmark.gate_failure` says
    what failed).

    `plot` and `json_report` are where the caller will draw the chart and write the JSON report
    (report/plots.py, report/): checked before the slow steps, not written here."""
    if not checkpoints:
        raise UserError("give at least one checkpoint: chanprune bench REFERENCE [MODEL...]")
    # Validate every option before the slow steps (loading, tracing, evaluating, timing).
    sizes_text = batch_sizes if isinstance(batch_sizes, str) else ",".join(str(b) for b in batch_sizes)
    sizes = benchmark.parse_batch_sizes(sizes_text)
    if gate_batch is not None and gate_batch not in sizes:
        raise UserError(f"--gate-batch {gate_batch} is not one of --batch-sizes {sizes_text}; pick one of them")
    gate_at = gate_batch if gate_batch is not None else max(sizes)
    for name, value in (("--max-acc-drop", max_acc_drop), ("--min-speedup", min_speedup)):
        if value is None:
            continue
        if len(checkpoints) < 2:
            raise UserError(f"{name} compares models with the first checkpoint (the reference); give at least two checkpoints")
        if not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    if max_acc_drop is not None:
        if max_acc_drop < 0:
            raise UserError(f"--max-acc-drop must be 0 or more (percentage points), got {max_acc_drop:g}")
        if data is None:
            raise UserError("--max-acc-drop needs accuracy: pass --data")
    if min_speedup is not None and min_speedup <= 0:
        raise UserError(f"--min-speedup must be positive (a latency ratio such as 1.5), got {min_speedup:g}")
    shape, mean_t, std_t = parse_inputs(input_shape, mean, std)
    choice = parse_output(output)
    names = parse_classes(classes) if classes is not None else None
    deployment = benchmark.Deployment(dtype=dtype, channels_last=channels_last, cudnn_benchmark=cudnn_benchmark,
                                      compile=compile)
    deployment.check()
    check_json_report(json_report, force)
    if plot is not None:
        check_plot(plot)
        check_output(plot, force)
    check_distinct_outputs(("--json", json_report), ("--plot", plot))
    _refuse_overwriting_inputs(checkpoints, ("--json", json_report), ("--plot", plot))
    dev = resolve_device(device)
    precision = benchmark.precision_warning(dtype, dev)
    if precision is not None:
        warn(precision)
    seed_everything(seed)

    loaded = [load_model(c, arch, arch_kwargs, trust_pickle) for c in checkpoints]
    shapes = [resolve_input_shape(shape, ld, data) for ld in loaded]
    for path, s in zip(checkpoints[1:], shapes[1:]):
        if tuple(s) != tuple(shapes[0]):
            raise UserError(f"{path} takes input {'x'.join(map(str, s))} but the reference {checkpoints[0]} takes "
                            f"{'x'.join(map(str, shapes[0]))}; bench compares models on one input, pass --input-shape")
    shape = shapes[0]
    mean_t, std_t = _recorded_normalization(checkpoints, loaded, mean_t, std_t)
    for ld in loaded:
        select_task_output(ld, choice, shape)
    for path, ld in zip(checkpoints, loaded):
        bad = nonfinite_summary(ld.model)
        if bad is not None:  # still timed; its accuracy is meaningless and --max-acc-drop will say so
            warn(f"{path}: the model has NaN/Inf weights in {bad}; its accuracy is meaningless")
    # Open --data before the slow steps, so that bad data fails first.
    first_loader = None if data is None else eval_loader(data, input_shape=shape, mean=mean_t, std=std_t,
                                                         batch_size=batch_size, workers=workers, seed=seed,
                                                         max_batches=calib_batches,
                                                         labels=model_labels(loaded[0], shape, names))

    n = len(loaded)
    results = []
    for i, (path, ld) in enumerate(zip(checkpoints, loaded)):
        with _status(f"counting MACs of model {i + 1}/{n}: {path}"):
            results.append(benchmark.describe(ld, path, shape))
    data_info: dict[str, Any] | None = None
    if first_loader is not None:
        for i, (result, ld) in enumerate(zip(results, loaded)):
            with _status(f"evaluating model {i + 1}/{n}: {result.path}"):
                result.accuracy = benchmark.accuracy(ld.model, _fresh_loader(first_loader, batch_size, workers, seed,
                                                                             calib_batches), dev, calib_batches)
        data_info = {"source": data, "max_batches": calib_batches, "images": results[0].accuracy["images"]}  # type: ignore[index]
    threads_used = threads if threads is not None else torch.get_num_threads()
    timed = []
    for i, (result, ld) in enumerate(zip(results, loaded)):
        with _status(f"preparing model {i + 1}/{n} for timing ({deployment.dtype}): {result.path}"):
            timed.append(benchmark.deployed(ld.model, deployment, dev, shape))
    for b in sizes:
        for i, (result, model) in enumerate(zip(results, timed)):
            with _status(f"timing model {i + 1}/{n} at batch {b}: {result.path}"):
                result.latency[b] = benchmark.time_model(model, shape, b, dev, warmup=warmup, repeats=repeats,
                                                         threads=threads_used, max_time=max_time, settings=deployment)
    comparisons = [benchmark.compare(results[0], r) for r in results]
    gates = benchmark.evaluate_gates(results, comparisons, max_acc_drop=max_acc_drop, min_speedup=min_speedup,
                                     gate_batch=gate_at)
    slower = benchmark.slowdowns(results, comparisons, dev)
    for line in slower:
        warn(line)
    return BenchResult(
        models=results, comparisons=comparisons, gates=gates, device=str(dev), threads=threads_used,
        batch_sizes=list(sizes), timing={"warmup": warmup, "repeats": repeats, "max_time_s": max_time,
                                         **deployment.to_json(dev)},
        gate_batch=gate_at, data=data_info, seed=seed, plot=plot, warnings=slower)


def _recorded_normalization(checkpoints: Sequence[str], loaded: Sequence[Any], mean: tuple[float, ...] | None,
                            std: tuple[float, ...] | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """--mean/--std, else what the checkpoints record: every model sees the same images, so the
    checkpoints must agree."""
    found: dict[tuple[Any, Any], str] = {}
    for path, ld in zip(checkpoints, loaded):
        values = resolve_normalization(ld.meta, mean, std)
        if values != (mean, std):
            found.setdefault(values, path)
    if len(found) > 1:
        (a, first), (b, second) = list(found.items())[:2]
        raise UserError(f"{first} and {second} record different normalisation (mean, std) {a} and {b}; pass --mean "
                        "and --std for the data all models are compared on")
    return next(iter(found), (mean, std))


def _refuse_overwriting_inputs(checkpoints: Sequence[str], *outputs: tuple[str, str | None]) -> None:
    inputs = {os.path.normcase(os.path.realpath(c)) for c in checkpoints}
    for option, path in outputs:
        if path is not None and path != "-" and os.path.normcase(os.path.realpath(path)) in inputs:
            raise UserError(f"{option} {path} is one of the checkpoints to compare; give the output its own file")


def _fresh_loader(first: Any, batch_size: int, workers: int, seed: int, max_batches: int | None) -> Any:
    """A loader over the already opened data set that draws the same images for every model."""
    return make_loader(first.dataset, batch_size=batch_size, workers=workers, seed=seed,
                       shuffle=max_batches is not None, max_batches=max_batches)


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    """A transient status line on stderr when it is a terminal (nothing in logs and pipes)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(escape(text)):
        yield
