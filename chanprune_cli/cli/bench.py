"""`chanprune bench`: params, MACs, size, latency, throughput and accuracy of models side by side, with CI gates."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from ..errors import GateFailed, UserError
from .common import (
    OUTPUT_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CalibBatchesOpt,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    MeanOpt,
    SeedOpt,
    StdOpt,
    TrustPickleOpt,
    WorkersOpt,
    app,
    check_distinct_outputs,
    examples,
    load_model,
    make_eval_loader,
    resolve_input_shape,
    seed_everything,
    validate_common,
)

TIMING_PANEL = "Timing"
GATES_PANEL = "Gates (exit code 3 when one is not met)"

CheckpointsArg = Annotated[list[str] | None, typer.Argument(
    metavar="CKPT...", show_default=False,
    help="Checkpoints to compare; the first is the reference. Each is a state dict, safetensors, chanprune file, "
         "or a pickled module with --trust-pickle.")]


@app.command(
    epilog=examples(
        ("a model and its pruned version: speed-up next to the MACs ratio, accuracy change",
         "chanprune bench resnet56.th pruned.safetensors --arch cifar_resnet56 --data cifar10-test.tar.gz"),
        ("CI: fail (exit 3) when the pruned model loses more than 1 point or is less than 1.5x faster at batch 32",
         "chanprune bench base.th ft.safetensors --arch cifar_resnet56 --data test/ --max-acc-drop 1 --min-speedup 1.5 --json bench.json"),
        ("latency only, at batch 1, 8 and 64 on 4 threads, with a chart",
         "chanprune bench model.pt pruned.safetensors --arch torchvision:resnet50 --batch-sizes 1,8,64 --threads 4 --plot bench.png"),
    ),
)
def bench(
    checkpoints: CheckpointsArg = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    calib_batches: CalibBatchesOpt = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", metavar="B,B", help="Batch sizes to time, comma-separated.", rich_help_panel=TIMING_PANEL)] = "1,32",
    threads: Annotated[int | None, typer.Option("--threads", metavar="N", min=1, help="CPU threads for timing (default: torch's current count, kept fixed for every model and recorded).", rich_help_panel=TIMING_PANEL, show_default=False)] = None,
    warmup: Annotated[int, typer.Option("--warmup", metavar="N", min=0, help="Untimed runs before timing (fewer when --max-time is short).", rich_help_panel=TIMING_PANEL)] = 10,
    repeats: Annotated[int, typer.Option("--repeats", metavar="N", min=1, help="Timed runs per model and batch size; the median is reported.", rich_help_panel=TIMING_PANEL)] = 50,
    max_time: Annotated[float, typer.Option("--max-time", metavar="SECONDS", min=0.0, help="Stop timing one model at one batch size after about this long (at least 5 timed runs); 0: always --repeats.", rich_help_panel=TIMING_PANEL)] = 10.0,
    max_acc_drop: Annotated[float | None, typer.Option("--max-acc-drop", metavar="PTS", help="Fail when a model's top-1 is more than PTS percentage points below the reference's (needs --data).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    min_speedup: Annotated[float | None, typer.Option("--min-speedup", metavar="X", help="Fail when a model is less than X times as fast as the reference (median latency at --gate-batch).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    gate_batch: Annotated[int | None, typer.Option("--gate-batch", metavar="B", help="Batch size --min-speedup compares at (default: the largest of --batch-sizes).", rich_help_panel=GATES_PANEL, show_default=False)] = None,
    plot: Annotated[str | None, typer.Option("--plot", metavar="PNG", help="Also draw channel widths before/after and, with several models, accuracy and latency vs MACs (.png, .svg or .pdf; needs matplotlib).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Compare models: params, MACs, size, latency and throughput per batch size, top-1/top-5; CI gates."""
    if not checkpoints:
        raise UserError("give at least one checkpoint: chanprune bench REFERENCE [MODEL...]")
    # Validate every option before the slow steps (loading, tracing, evaluating, timing).
    from ..deploy.benchmark import parse_batch_sizes

    sizes = parse_batch_sizes(batch_sizes)
    if gate_batch is not None and gate_batch not in sizes:
        raise UserError(f"--gate-batch {gate_batch} is not one of --batch-sizes {batch_sizes}; pick one of them")
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
    shape, mean_t, std_t = validate_common(input_shape, mean, std, json_out, force)
    if plot is not None:
        from ..support.fsutil import check_output
        from ..report.plots import check_plot_path, require_matplotlib

        require_matplotlib()
        check_plot_path(plot)
        check_output(plot, force)
    check_distinct_outputs(("--json", json_out), ("--plot", plot))
    _refuse_overwriting_inputs(checkpoints, ("--json", json_out), ("--plot", plot))
    from ..support.device import resolve_device

    dev = resolve_device(device)
    seed_everything(seed)

    import torch

    from ..deploy import benchmark
    from ..checkpoint import nonfinite_tensors
    from ..report import (
        BenchReport,
        bench_document,
        make_console,
        render_bench,
        write_json,
    )

    loaded = [load_model(c, arch, arch_kwargs, trust_pickle) for c in checkpoints]
    shapes = [resolve_input_shape(shape, ld) for ld in loaded]
    for path, s in zip(checkpoints[1:], shapes[1:]):
        if tuple(s) != tuple(shapes[0]):
            raise UserError(f"{path} takes input {'x'.join(map(str, s))} but the reference {checkpoints[0]} takes "
                            f"{'x'.join(map(str, shapes[0]))}; bench compares models on one input, pass --input-shape")
    shape = shapes[0]
    for path, ld in zip(checkpoints, loaded):
        bad = nonfinite_tensors(ld.model)
        if bad:  # still timed; its accuracy is meaningless and --max-acc-drop will say so
            typer.echo(f"warning: {path}: the model has NaN/Inf weights in {', '.join(bad[:3])}"
                       f"{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}; its accuracy is meaningless", err=True)
    # Open --data before the slow steps, so that bad data fails first.
    first_loader = None if data is None else make_eval_loader(
        data, input_shape=shape, mean=mean_t, std=std_t, batch_size=batch_size, workers=workers, seed=seed,
        max_batches=calib_batches)

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
    for b in sizes:
        for i, (result, ld) in enumerate(zip(results, loaded)):
            with _status(f"timing model {i + 1}/{n} at batch {b}: {result.path}"):
                result.latency[b] = benchmark.time_model(ld.model, shape, b, dev, warmup=warmup, repeats=repeats,
                                                         threads=threads_used, max_time=max_time)
    comparisons = [benchmark.compare(results[0], r) for r in results]
    gates = benchmark.evaluate_gates(results, comparisons, max_acc_drop=max_acc_drop, min_speedup=min_speedup,
                                     gate_batch=gate_at)
    report = BenchReport(
        models=results, comparisons=comparisons, gates=gates, device=str(dev), threads=threads_used,
        batch_sizes=list(sizes), timing={"warmup": warmup, "repeats": repeats, "max_time_s": max_time},
        gate_batch=gate_at, data=data_info, seed=seed, plot=plot)
    # With `--json -` stdout carries only the JSON document, so the table goes to stderr.
    render_bench(report, make_console(stderr=json_out == "-"))
    # Every output is written before a gate fails the command: CI keeps the artifacts.
    if json_out is not None:
        write_json(bench_document(report), json_out)
    if plot is not None:
        from ..report.plots import write_bench_plot

        write_bench_plot(report, plot)
    failure = benchmark.gate_failure(gates)
    if failure is not None:
        raise GateFailed(failure)


def _refuse_overwriting_inputs(checkpoints: list[str], *outputs: tuple[str, str | None]) -> None:
    import os

    inputs = {os.path.normcase(os.path.realpath(c)) for c in checkpoints}
    for option, path in outputs:
        if path is not None and path != "-" and os.path.normcase(os.path.realpath(path)) in inputs:
            raise UserError(f"{option} {path} is one of the checkpoints to compare; give the output its own file")


def _fresh_loader(first: Any, batch_size: int, workers: int, seed: int, max_batches: int | None) -> Any:
    """A loader over the already opened data set that draws the same images for every model."""
    from ..data import make_loader

    return make_loader(first.dataset, batch_size=batch_size, workers=workers, seed=seed,
                       shuffle=max_batches is not None, max_batches=max_batches)


@contextlib.contextmanager
def _status(text: str) -> Iterator[None]:
    """A transient status line on stderr when it is a terminal (nothing in logs and pipes)."""
    from rich.console import Console
    from rich.markup import escape

    console = Console(stderr=True)
    if not console.is_terminal:
        yield
        return
    with console.status(escape(text)):
        yield
