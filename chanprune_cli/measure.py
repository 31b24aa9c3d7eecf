"""Parameters, MACs (fvcore), accuracy and latency.

Nothing here changes the model it is given: train/eval flags (per module) and the device are
restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .support.progress import batches_total, progress_bar


def logits_of(output: Any) -> torch.Tensor:
    """The task output of a model: the first element of a tuple/list, `out` of a dict (the one
    definition evaluation, criteria and training use)."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if isinstance(output, dict):
        output = output.get("out", next(iter(output.values())))
    if not isinstance(output, torch.Tensor):
        raise UserError(f"the model returns {type(output).__name__}; expected a tensor of logits")
    return output


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers: what the weights take on disk or in memory."""
    tensors: Iterable[torch.Tensor] = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def preserved_mode_and_device(model: nn.Module, device: torch.device | None = None, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Put `model` in eval mode (and on `device`), then restore every module's flag and the device."""
    flags = [(m, m.training) for m in model.modules()]
    original = _model_device(model)
    moved = device is not None and original is not None and original != device
    try:
        if moved:
            model.to(device)
        if eval_mode:
            model.eval()
        yield model
    finally:
        for module, flag in flags:
            module.training = flag
        if moved:
            model.to(original)


def _model_device(model: nn.Module) -> torch.device | None:
    for tensor in _tensors(model):
        return tensor.device
    return None


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()


def _input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(v) for v in input_shape)
    if not shape or any(v <= 0 for v in shape):
        raise UserError(f"input shape {tuple(input_shape)}: expected positive sizes such as 3,32,32")
    return shape


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    """fvcore traces with torch.jit: silence its tracer warnings and fvcore's own log lines."""
    loggers = [logging.getLogger(name) for name in ("fvcore", "fvcore.nn.jit_analysis")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _flop_analysis(model: nn.Module, input_shape: Sequence[int]) -> Any:
    shape = _input_shape(input_shape)
    with _quiet_tracing():
        # Imported lazily: importing fvcore emits torch.jit deprecation warnings.
        from fvcore.nn import FlopCountAnalysis

        device = _model_device(model) or torch.device("cpu")
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        x = torch.zeros((1, *shape), device=device, dtype=dtype)
        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with preserved_mode_and_device(model), torch.no_grad():
            try:
                analysis.total()  # runs the trace now, while the model is in eval mode
            except Exception as exc:
                raise UserError(
                    f"cannot count MACs at input shape {'x'.join(map(str, shape))}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                    "check --input-shape"
                ) from None
    return analysis


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates for one input of shape C,H,W (fvcore: one fused multiply-add = 1)."""
    return int(_flop_analysis(model, input_shape).total())


def per_module_macs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of every leaf module, by qualified name (0 for leaves fvcore does not count).

    Functional ops in a container's own forward (e.g. `x + shortcut`, `F.avg_pool2d`) belong to
    that container, so these may sum to slightly less than `count_macs`.
    """
    by_module = _flop_analysis(model, input_shape).by_module()
    return {
        name: int(by_module.get(name, 0))
        for name, module in model.named_modules()
        if name and next(module.children(), None) is None
    }


def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device | str,
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, float | int]:
    """Top-1/top-5 accuracy (percent), mean cross-entropy and image count over `loader`.

    With fewer than 5 classes, top-5 is top-K. A progress bar (images/s) is drawn on stderr when it
    is a terminal.
    """
    device = torch.device(device)
    total = batches_total(loader, max_batches)
    correct1 = correct5 = images = 0
    loss_sum = 0.0
    started = time.perf_counter()
    with (
        progress_bar("rate", enabled=progress) as bar,
        preserved_mode_and_device(model, device),
        torch.inference_mode(),
    ):
        task = bar.add_task("evaluating", total=total, rate="")
        for step, batch in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            inputs, targets = batch[0], batch[1]
            inputs = inputs.to(device, non_blocking=True)
            targets = torch.as_tensor(targets).to(device, non_blocking=True).long()
            logits = logits_of(model(inputs))
            if logits.ndim != 2:
                raise UserError(f"the model returns shape {tuple(logits.shape)}; expected (batch, classes)")
            classes = logits.shape[1]
            if targets.numel() and int(targets.max()) >= classes:
                raise UserError(
                    f"data has labels up to {int(targets.max())} ({int(targets.max()) + 1}+ classes) "
                    f"but the model outputs {classes}; check --data and the checkpoint"
                )
            k = min(5, classes)
            top = logits.topk(k, dim=1).indices
            hits = top.eq(targets.unsqueeze(1))
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            loss_sum += float(F.cross_entropy(logits.float(), targets, reduction="sum"))
            images += targets.numel()
            rate = images / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=1, rate=f"{rate:,.0f} img/s")
    if images == 0:
        raise UserError("no images to evaluate: the data set is empty")
    return {
        "top1": 100.0 * correct1 / images,
        "top5": 100.0 * correct5 / images,
        "images": images,
        "loss": loss_sum / images,
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of an already sorted list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    device: torch.device | str,
    *,
    warmup: int = 5,
    repeats: int = 20,
    threads: int | None = None,
) -> dict[str, float | int]:
    """Forward-pass latency of one batch: median/p90/mean in ms and images per second (at the median).

    Each repeat is timed separately (CUDA synchronised before and after); `threads` fixes torch's
    intra-op thread count for the measurement and is restored afterwards.
    """
    shape = _input_shape(input_shape)
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if repeats < 1 or warmup < 0:
        raise UserError("latency needs repeats >= 1 and warmup >= 0")
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    old_threads = torch.get_num_threads()
    times: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with preserved_mode_and_device(model, device), torch.inference_mode():
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            # Random rather than zero input: some kernels take shortcuts on zeros.
            gen = torch.Generator().manual_seed(0)
            x = torch.randn((batch_size, *shape), generator=gen).to(device=device, dtype=dtype)
            for _ in range(warmup):
                model(x)
            if cuda:
                torch.cuda.synchronize(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                if cuda:
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
    finally:
        if threads is not None:
            torch.set_num_threads(old_threads)
    ms = sorted(t * 1000.0 for t in times)
    median = statistics.median(ms)
    return {
        "median_ms": median,
        "p90_ms": _percentile(ms, 90.0),
        "mean_ms": statistics.fmean(ms),
        "min_ms": ms[0],
        "std_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0,
        "throughput_ips": batch_size / (median / 1000.0) if median > 0 else float("inf"),
        "batch_size": batch_size,
        "repeats": repeats,
        "threads": threads if threads is not None else old_threads,
    }


def file_size_mb(path: str | os.PathLike[str]) -> float:
    """File size in MiB (2**20 bytes), the unit most tools label "MB"."""
    try:
        return os.path.getsize(path) / float(1 << 20)
    except OSError as exc:
        raise UserError(f"cannot read {os.fspath(path)}: {exc.strerror or exc}") from None
