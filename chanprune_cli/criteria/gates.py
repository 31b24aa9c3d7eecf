"""Channel gates and activation capture shared by the data-driven criteria.

Gates act at the *hook points* of `engine/points.py`: the module outputs where a class's channels
take their final value (a BatchNorm right after its producer, other norms holding the class, else
the producer; the layer rules say which modules count). A class with several producers (a residual
stream, a conv feeding a depthwise conv) has several hook points; every one of them is multiplied
by the same gate value, so a gate of 0 removes the channel as `surgery.mask_model` + pruning do
wherever the channel's zero stays zero downstream (tested), and the gradient of the loss w.r.t. a
gate at 1 is the first-order change of the loss when the whole class is scaled.

`ChannelGates(model, graph)` is a context manager that installs forward hooks (removed on exit):

* `gates.gates[gid] = tensor` sets the multiplicative gate of group `gid`: shape `[channels]`
  (one value per class, shared by the batch) or `[batch, channels]` (one value per sample);
  leave a group out (or set None) to leave it untouched. Gates may require grad.
* `gates.capture = fn` calls `fn(gid, point_index, features)` at every captured point with the
  point's group channels moved to axis 1 (`[B, k, ...]`, k = len(point.classes)); `point.classes`
  gives each channel's class index. `gates.primary(gid, p)` lists, for mode "first", the positions
  at point p whose class is first seen there (module order).

`capture_features(...)` is the whole capture loop of the criteria that read activations (hrank,
info): one pass over the calibration data with a function called at every captured point;
`class_means(...)` then averages each class's per-point values over the points that measured it.

`batches(...)` iterates calibration data on the device once per batch with a transient rich
progress bar (stderr, only when it is a terminal) showing the throughput; `working_model(...)`
prepares the model for scoring (eval mode, no weight grads, on `device`) and restores the caller's
flags afterwards; `forward_pass(...)` runs the data through a model once for its hooks to see, and
`task_logits(...)` is the float32 task output of one batch, under `autocast`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from ..engine.graph import ChannelGraph, ChannelGroup
from ..engine.points import HookPoint, build_points, find_bn_pairs, producer_channels  # noqa: F401  (criteria import them from here)
from ..errors import UserError
from ..measure import logits_of
from ..support.progress import batches_total, progress_bar

# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def parse_options(criterion: str, options: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """Merge `options` into `defaults`, coercing to each default's type (strings from the CLI work);
    an unknown option or a bad value is a UserError naming the valid ones."""
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        valid = f"its options are: {', '.join(f'{k}={v!r}' for k, v in defaults.items())}" if defaults else "it takes no options"
        raise UserError(f"criterion {criterion!r} has no option {', '.join(map(repr, unknown))}; {valid}")
    out = dict(defaults)
    for key, value in options.items():
        default = defaults[key]
        try:
            if value is None or default is None:
                out[key] = value
            elif isinstance(default, bool):
                if isinstance(value, str):
                    if value.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                        raise ValueError(value)
                    out[key] = value.lower() in ("1", "true", "yes", "on")
                else:
                    out[key] = bool(value)
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            else:
                out[key] = type(default)(value)
        except (TypeError, ValueError):
            raise UserError(f"criterion {criterion!r}: option {key}={value!r} is not a valid {type(default).__name__}") from None
    return out


def choice(criterion: str, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise UserError(f"criterion {criterion!r}: option {key} must be one of {', '.join(allowed)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Devices, models, batches
# --------------------------------------------------------------------------------------------


def _canonical(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return device


@contextmanager
def working_model(model: nn.Module, device: torch.device | str, *, copy_model: bool = False) -> Iterator[nn.Module]:
    """The model to score: eval mode, every parameter with requires_grad False, on `device`.

    It is `model` itself when already on `device` and `copy_model` is False (its training flags and
    requires_grad are restored on exit, and nothing else is touched: hooks are removed by their
    owners, gradients are taken with `torch.autograd.grad` so no `.grad` is written); otherwise a
    deep copy moved to `device`.
    """
    device = _canonical(device)
    tensors = list(model.parameters()) + list(model.buffers())
    on_device = all(_canonical(t.device) == device for t in tensors)
    subject = copy.deepcopy(model).to(device) if copy_model or not on_device else model
    flags = [(p, p.requires_grad) for p in subject.parameters()]
    modes = [(m, m.training) for m in subject.modules()]
    try:
        subject.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield subject
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


def autocast(device: torch.device | str, enabled: bool) -> Any:
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU scores stay in float32)."""
    device = torch.device(device)
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def forward_pass(net: nn.Module, data: Iterable[Any], device: torch.device | str, *, description: str,
                 max_images: int | None = None, amp: bool = False) -> int:
    """Run the calibration data once through `net` (inference mode, `autocast` with `amp`) for its
    forward hooks to see; returns the number of batches."""
    steps = 0
    with torch.inference_mode():
        for x, _ in batches(data, device, description=description, max_images=max_images):
            with autocast(device, amp):
                net(x)
            steps += 1
    return steps


def task_logits(net: nn.Module, x: torch.Tensor, device: torch.device | str, amp: bool) -> torch.Tensor:
    """The task output of `net` for `x` (`measure.logits_of`) in float32, under `autocast`."""
    with autocast(device, amp):
        return logits_of(net(x), net).float()


def gradients(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor | None]:
    """d output / d inputs without touching any `.grad`; None for inputs the output does not use
    (e.g. a group that only feeds an auxiliary head inactive in eval mode)."""
    if not output.requires_grad:
        return [None] * len(inputs)
    return list(torch.autograd.grad(output, inputs, allow_unused=True))


def batches(data: Iterable[Any], device: torch.device | str, *, description: str,
            need_labels: bool = False, max_images: int | None = None, max_batches: int | None = None,
            classes: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """(inputs, labels) on `device`, each batch moved once; labels None when the data has none.

    Stops after `max_batches` batches or `max_images` images (the last batch is cut). With
    `classes`, labels outside 0..classes-1 are a UserError, checked before the labels move (a check
    on the device would make the host wait for it every batch). Draws a transient progress bar
    with images/s on stderr when stderr is a terminal.
    """
    device = torch.device(device)
    total = batches_total(data, max_batches)
    images = 0
    started = time.perf_counter()
    with progress_bar("rate", eta=False) as bar:
        task = bar.add_task(description, total=total, rate="")
        for step, batch in enumerate(data):
            if max_batches is not None and step >= max_batches:
                break
            if max_images is not None and images >= max_images:
                break
            if isinstance(batch, torch.Tensor):
                x, y = batch, None
            elif isinstance(batch, dict):
                x, y = batch.get("image", batch.get("input")), batch.get("label", batch.get("target"))
            else:
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            if not isinstance(x, torch.Tensor):
                raise UserError(f"calibration batches must hold an input tensor, got {type(x).__name__}")
            if max_images is not None and images + x.shape[0] > max_images:
                keep = max_images - images
                x = x[:keep]
                y = y[:keep] if y is not None else None
            if y is not None:
                y = torch.as_tensor(y)
            if need_labels and (y is None or y.dim() != 1 or y.shape[0] != x.shape[0]):
                raise UserError("this criterion needs labelled data: batches of (images, class indices)")
            if classes is not None and y is not None:
                check_labels(y, classes)
            x = x.to(device, non_blocking=True)
            if not x.is_floating_point():
                x = x.float()
            if y is not None:
                y = y.to(device, non_blocking=True).long()
            yield x, y
            images += x.shape[0]
            bar.update(task, advance=1, rate=f"{images / max(time.perf_counter() - started, 1e-9):,.0f} img/s")
    if images == 0:
        raise UserError("no calibration images: the data is empty")


def check_labels(y: torch.Tensor, classes: int) -> None:
    if y.numel() and (int(y.max()) >= classes or int(y.min()) < 0):
        raise UserError(f"data has labels {int(y.min())}..{int(y.max())} but the model outputs {classes} classes; "
                        "check --data and the checkpoint")


def output_classes(net: nn.Module, graph: ChannelGraph, device: torch.device, criterion: str) -> int:
    """The number of classes `net` outputs, from one forward of two random inputs (before the data
    loop, so that `batches` can check every batch's labels on the host)."""
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.randn((2, *graph.input_shape), generator=torch.Generator().manual_seed(0)).to(device, dtype)
    with torch.no_grad():
        out = logits_of(net(example), net)
    if out.dim() != 2:
        raise UserError(f"{criterion} needs a classifier: the model returns shape {tuple(out.shape)}, expected (batch, classes)")
    return int(out.shape[1])


# --------------------------------------------------------------------------------------------
# The gate context
# --------------------------------------------------------------------------------------------


class ChannelGates:
    """Forward hooks that scale (gate) and/or capture the channels of every prunable group.

    Use as a context manager; set `gates[gid]` and/or `capture` inside. `capture_mode` ("first"
    or "all") decides which points call `capture`: with "first" only points where some class is
    seen first (earliest module), which bounds the cost for long residual streams.
    """

    def __init__(self, model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup] | None = None,
                 capture_mode: str = "first") -> None:
        self.model = model
        self.groups = graph.prunable_groups() if groups is None else groups
        self.points = build_points(model, graph, self.groups)
        self.channels = {g.id: g.channels for g in self.groups}
        self.gates: dict[int, torch.Tensor | None] = {}
        self.capture: Callable[[int, int, torch.Tensor], None] | None = None
        self._handles: list[Any] = []
        self._device_maps: dict[tuple[int, int, torch.device], torch.Tensor] = {}
        self._primary: dict[tuple[int, int], torch.Tensor] = {}
        # Points of a group that place its channels alike (the blocks of a residual stream) share
        # one multiplier within a forward pass: computed at the first of them, reused at the
        # others (each forward starts afresh, so no multiplier outlives its autograd graph).
        self._layout: dict[tuple[int, int], int] = {}
        self._multipliers: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        for gid, pts in self.points.items():
            seen: set[int] = set()
            layouts: list[HookPoint] = []
            for p, pt in enumerate(pts):
                same = [i for i, other in enumerate(layouts) if other.axis == pt.axis and other.width == pt.width
                        and torch.equal(other.full_map, pt.full_map)]
                if not same:
                    layouts.append(pt)
                self._layout[(gid, p)] = same[0] if same else len(layouts) - 1
                first = [i for i, c in enumerate(pt.classes.tolist()) if c not in seen]
                seen.update(pt.classes.tolist())
                self._primary[(gid, p)] = torch.tensor(first, dtype=torch.long)
        self.capture_points = {(gid, p) for gid, pts in self.points.items() for p in range(len(pts))
                               if capture_mode == "all" or self._primary[(gid, p)].numel()}

    def primary(self, gid: int, p: int) -> torch.Tensor:
        """Positions (into point p's channels) whose class is first seen at point p."""
        return self._primary[(gid, p)]

    def __enter__(self) -> ChannelGates:
        modules = dict(self.model.named_modules())
        by_module: dict[str, list[tuple[int, int]]] = {}
        for gid, pts in self.points.items():
            for p, pt in enumerate(pts):
                by_module.setdefault(pt.module, []).append((gid, p))
        self._handles.append(self.model.register_forward_pre_hook(lambda module, inputs: self._multipliers.clear()))
        for name, entries in by_module.items():
            self._handles.append(modules[name].register_forward_hook(self._make_hook(entries)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._multipliers.clear()

    def _map(self, gid: int, p: int, device: torch.device) -> torch.Tensor:
        key = (gid, p, device)
        if key not in self._device_maps:
            self._device_maps[key] = self.points[gid][p].full_map.to(device)
        return self._device_maps[key]

    def _make_hook(self, entries: list[tuple[int, int]]) -> Callable[..., Any]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor):
                return None
            changed = False
            for gid, p in entries:
                pt = self.points[gid][p]
                if self.capture is not None and (gid, p) in self.capture_points:
                    idx = pt.channels.to(output.device) if pt.channels.device != output.device else pt.channels
                    feats = output.index_select(pt.axis, idx)
                    if pt.axis != 1:
                        feats = feats.movedim(pt.axis, 1)
                    self.capture(gid, p, feats)
                gate = self.gates.get(gid)
                if gate is not None:
                    output = output * self._multiplier(gate, gid, p, output)
                    changed = True
            return output if changed else None
        return hook

    def _multiplier(self, gate: torch.Tensor, gid: int, p: int, output: torch.Tensor) -> torch.Tensor:
        key = (gid, self._layout[(gid, p)], output.dim(), output.shape[0] if gate.dim() > 1 else None,
               output.dtype, output.device, torch.is_grad_enabled())
        cached = self._multipliers.get(key)
        if cached is not None and cached[0] is gate:  # the same gate tensor: the same multiplier
            return cached[1]
        mult = self._compute_multiplier(gate, gid, p, output)
        self._multipliers[key] = (gate, mult)
        return mult

    def _compute_multiplier(self, gate: torch.Tensor, gid: int, p: int, output: torch.Tensor) -> torch.Tensor:
        pt = self.points[gid][p]
        full = self._map(gid, p, output.device)
        gate = gate.to(output.device)
        if gate.dim() == 1:
            mult = torch.cat([gate, gate.new_ones(1)]).index_select(0, full)
            shape = [1] * output.dim()
            shape[pt.axis] = pt.width
        else:
            if gate.shape[0] != output.shape[0]:
                raise UserError(f"per-sample gate of batch {gate.shape[0]} for an output of batch {output.shape[0]}")
            mult = torch.cat([gate, gate.new_ones(gate.shape[0], 1)], dim=1).index_select(1, full)
            shape = [1] * output.dim()
            shape[0] = output.shape[0]
            shape[pt.axis] = pt.width
        return mult.reshape(shape).to(output.dtype)


# --------------------------------------------------------------------------------------------
# Activation capture
# --------------------------------------------------------------------------------------------


def capture_features(model: nn.Module, graph: ChannelGraph, data: Iterable[Any], device: torch.device | str,
                     update: Callable[[int, int, torch.Tensor, torch.Tensor | None], None], *, mode: str,
                     description: str, max_images: int | None = None, relu: bool = False,
                     amp: bool = False) -> ChannelGates:
    """Run the calibration data once through `model` (`working_model`, inference mode, `autocast`
    with `amp`) and hand the features of every point captured in `mode` ("first" or "all", see
    `ChannelGates`) to `update(gid, p, feats, positions)`: `feats` as `ChannelGates.capture` gives
    them ([B, k, ...]), through ReLU with `relu`; `positions` (on the features' device) are the
    point's positions whose values will be read: those whose class is first seen there with mode
    "first", None (every position) with "all". Returns the gates, hooks removed, for `class_means`."""
    with working_model(model, device) as net, ChannelGates(net, graph, capture_mode=mode) as gates:
        positions: dict[tuple[int, int], torch.Tensor | None] = {}

        def capture(gid: int, p: int, feats: torch.Tensor) -> None:
            if relu:
                feats = feats.clamp_min(0)
            if (gid, p) not in positions:
                positions[(gid, p)] = None if mode == "all" else gates.primary(gid, p).to(feats.device)
            update(gid, p, feats, positions[(gid, p)])

        gates.capture = capture
        forward_pass(net, data, device, description=description, max_images=max_images, amp=amp)
        gates.capture = None
    return gates


def class_means(gates: ChannelGates, mode: str, values: Mapping[tuple[int, int], torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per group of `gates`, each class's value averaged over the points that measured it.

    `values[(gid, p)]` holds one value per position of point p (a point left out was not reached);
    with mode "first" only the positions whose class is first seen at the point count, with "all"
    every position. A class no point measured gets 0."""
    means: dict[int, torch.Tensor] = {}
    for gid, pts in gates.points.items():
        total = torch.zeros(gates.channels[gid], dtype=torch.float64)
        n = torch.zeros(gates.channels[gid], dtype=torch.float64)
        for p, pt in enumerate(pts):
            if (gid, p) not in values:
                continue
            pos = torch.arange(len(pt.classes)) if mode == "all" else gates.primary(gid, p)
            total.index_add_(0, pt.classes[pos], values[(gid, p)][pos])
            n.index_add_(0, pt.classes[pos], torch.ones(len(pos), dtype=torch.float64))
        means[gid] = total / n.clamp_min(1)
    return means


def normalise(values: torch.Tensor, how: str = "minmax") -> torch.Tensor:
    """Within-group normalisation: "minmax" to [0, 1] (constant vector -> 0), "mean" divide by the
    mean absolute value (sign and zero kept)."""
    v = values.double()
    if how == "minmax":
        lo, hi = v.min(), v.max()
        return (v - lo) / (hi - lo) if hi > lo else torch.zeros_like(v)
    scale = v.abs().mean()
    return v / scale if scale > 0 else torch.zeros_like(v)
