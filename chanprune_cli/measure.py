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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .support.progress import batches_total, progress_bar

# The attribute of a model naming its task output (`--output`). It lives on the module, so it
# follows the model into every copy (masked, gated, pruned, trained) without a global.
TASK_OUTPUT_ATTR = "chanprune_task_output"
# Fields that name the task output where a model returns several (torchvision GoogLeNet/Inception
# in train mode, segmentation models): taken without --output.
_TASK_FIELDS = ("logits", "out")


def parse_task_output(text: str) -> str:
    """`--output` checked: an index or key, nested with dots (`1`, `out`, `1.logits`)."""
    value = text.strip()
    if not value or any(not part or part != part.strip() for part in value.split(".")):
        raise UserError(f"--output {text!r}: give an output index or key, nested with dots "
                        "(e.g. --output 0, --output out, --output 1.logits)")
    return value


def set_task_output(model: nn.Module, choice: str | None) -> None:
    """Make `choice` (a `parse_task_output` path) the task output `logits_of` picks for `model`;
    None: the default (one output, or a field named logits/out)."""
    if choice is None:
        model.__dict__.pop(TASK_OUTPUT_ATTR, None)
    else:
        setattr(model, TASK_OUTPUT_ATTR, choice)


def task_output_of(model: nn.Module) -> str | None:
    """The task output chosen for `model` (`set_task_output`), None for the default."""
    choice = getattr(model, TASK_OUTPUT_ATTR, None)
    return choice if isinstance(choice, str) else None


def logits_of(output: Any, model: nn.Module | None = None) -> torch.Tensor:
    """The task output of a model's `output` (the one definition evaluation, criteria and training
    use): one tensor is it, whatever the choice (models that return several outputs only in
    training); else the part `model`'s `--output` choice names, else the only element, else a
    field named `logits` or `out`. Several outputs and no choice: UserError naming them, never a
    guess."""
    choice = task_output_of(model) if model is not None else None
    value = output if isinstance(output, torch.Tensor) else (
        _select(output, choice) if choice is not None else _default_output(output))
    if not isinstance(value, torch.Tensor):
        hint = f"check --output {choice}" if choice is not None else "check that the model returns its logits"
        raise UserError(f"the model's task output is {_describe(value)}; expected a tensor of logits ({hint})")
    return value


def _parts(value: Any) -> list[tuple[str, Any]]:
    """(name, part) of a model output container: dict keys, namedtuple fields, else indices."""
    if isinstance(value, Mapping):
        return [(str(k), v) for k, v in value.items()]
    fields = getattr(value, "_fields", None)
    if isinstance(value, tuple) and fields:
        return list(zip(fields, value))
    return [(str(i), v) for i, v in enumerate(value)]


def _select(output: Any, choice: str) -> Any:
    value, walked = output, []
    for part in choice.split("."):
        if not isinstance(value, (Mapping, tuple, list)):
            where = f"output {'.'.join(walked)}" if walked else "output"
            raise UserError(f"--output {choice}: the model's {where} is {_describe(value)}, which has no part {part!r}; "
                            f"check --output against the model's outputs ({_summary(output)})")
        parts = dict(_parts(value))
        if part not in parts and isinstance(value, (tuple, list)) and part.isdigit() and int(part) < len(value):
            parts[part] = value[int(part)]  # a namedtuple's parts by index too
        if part not in parts:
            raise UserError(f"--output {choice}: the model's output{' ' + '.'.join(walked) if walked else 's'} "
                            f"{'have' if not walked else 'has'} no part {part!r}; pick one of: {_summary(value)}")
        value = parts[part]
        walked.append(part)
    return value


def _default_output(output: Any) -> Any:
    while isinstance(output, (Mapping, tuple, list)):
        parts = _parts(output)
        named = [v for k, v in parts if k in _TASK_FIELDS and not isinstance(output, list)]
        if named:
            output = named[0]
        elif len(parts) == 1:
            output = parts[0][1]
        else:
            first = parts[0][0] if parts else "0"
            raise UserError(f"the model returns {describe_outputs(output)}; pass --output INDEX|KEY "
                            f"to say which is the task output (logits) for accuracy, data-driven criteria and "
                            f"fine-tuning, e.g. --output {first}")
    return output


def describe_outputs(output: Any) -> str:
    """A model's output in words: `tensor 2x10`, or `3 outputs (0: tensor 2x4, 1: ..., 2: ...)`."""
    if isinstance(output, (Mapping, tuple, list)):
        return f"{len(output)} outputs ({_summary(output)})"
    return _describe(output)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor " + "x".join(map(str, value.shape)) if value.dim() else "a scalar tensor"
    if isinstance(value, (Mapping, tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return type(value).__name__


def _summary(value: Any, limit: int = 6) -> str:
    parts = _parts(value)
    shown = ", ".join(f"{k}: {_describe(v)}" for k, v in parts[:limit])
    return shown + (f", … ({len(parts) - limit} more)" if len(parts) > limit else "")


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
            except Exception as exc:  # noqa: BLE001  (fvcore's trace runs the user's model: any error means the shape does not fit)
                raise UserError(
                    f"cannot count MACs at input shape {'x'.join(map(str, shape))}: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                    "check --input-shape"
                ) from None
    return analysis


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates for one input of shape C,H,W (fvcore: one fused multiply-add = 1)."""
    return int(_flop_analysis(model, input_shape).total())


def macs_by_module(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs of every module, containers included ("" is the whole model), by qualified name: what
    each spent on one input of shape `input_shape` (fvcore), all its calls together."""
    by_module = _flop_analysis(model, input_shape).by_module()
    return {name: int(by_module.get(name, 0)) for name, _ in model.named_modules()}


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
            logits = logits_of(model(inputs), model)
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


def percentile(sorted_values: list[float], q: float) -> float:
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
    channels_last: bool = False,
) -> dict[str, float | int]:
    """Forward-pass latency of one batch: median/p90/mean in ms and images per second (at the median).

    Each repeat is timed separately (CUDA synchronised before and after); `threads` fixes torch's
    intra-op thread count for the measurement and is restored afterwards. The input has the
    model's parameter dtype, in channels-last memory order with `channels_last`.
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
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
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
        "p90_ms": percentile(ms, 90.0),
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
