"""A model's latency tables on a target, measured (HALP's lookup table) and cached on disk.

Every conv/linear layer of the channel graph is timed in isolation, with random weights, at its
real input size and the target's batch size, on a grid of kept widths per axis a plan can change
(`engine.latency.layer_axes`): multiples of the width the runtime favours, about `GRID_POINTS` of
them from the narrowest to the full width. A point is the median of its timed runs, as the whole
model's latency is (the two must see the machine alike: on a loaded machine the fastest runs of
isolated layers summed to a third of the whole model's median). A point slower than the next
wider one, or slower than the next narrower one by more than their work explains
(`_SUPERLINEAR`), is timed again, up to `RETIMES` times, and the fastest of its medians stands;
what is still slower is the runtime's staircase and is kept. Layers of the same signature share
one table.

The rest of the model (norms, activations, adds, pooling) is the *remainder*: the whole model
timed at full width and uniformly thinned (half of every prunable group's channels), minus its
layers' tables there. Isolated layers can time slower than they run inside the model (on a
loaded 2-core machine a layer of the CIFAR ResNet-56 at batch 32 timed 10-60× its share of the
whole model): tables that sum to more than the whole model, or save more than it does, are
scaled down to the two whole-model measurements (`engine.latency.calibrated`), so the
prediction is the measurement at both points and never negative.

Tables are cached in `$XDG_CACHE_HOME/chanprune/latency/`, one file per target (runtime and
library versions, device, batch, threads, dtype, memory format; `LatencyTarget.key`), keyed by
layer signature and grid, so every command and model reuses what was measured once.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.archive import cache_root
from ..deploy.runtimes import LatencyTarget, Timing, median_ms, time_interleaved
from ..engine.allocate import AllocationOptions, allocate
from ..engine.graph import ChannelGraph
from ..engine.latency import LatencyModel, LayerAxis, LayerTable, Remainder, calibrated, layer_axes, removed_slots
from ..engine.surgery import prune_model
from ..errors import UserError
from ..support.fsutil import write_text_atomic

__all__ = ["GRID_POINTS", "LatencyTables", "LayerSpec", "axis_grid", "build_latency_model", "cache_file", "layer_specs"]

GRID_POINTS = 8  # grid points per axis (and the full width)
CACHE_VERSION = 3  # 3: outliers timed again
LAYER_TIMING = Timing(warmup=2, repeats=7, max_time=None)
WHOLE_TIMING = Timing(warmup=3, repeats=40, max_time=6.0)
RETIMES = 2  # passes over the suspect points
_SLOWER = 1.1  # a grid point this much slower than the next wider one is timed again
_SUPERLINEAR = 1.5  # ... or this much slower than the next narrower one times their work ratio


@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear layer as it is timed alone: its type, full shape and real input size."""

    layer: str  # "conv1d" | "conv2d" | "conv3d" | "linear"
    cost_kind: str  # "conv" | "depthwise" | "groupwise" | "linear" (engine/layer_rules.py ModuleCost)
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    bias: bool
    padding_mode: str
    size: tuple[int, ...]  # the input without batch and channels (spatial size, or tokens)

    def shape_at(self, units: Mapping[str, int]) -> tuple[int, int, int]:
        """(in channels, out channels, groups) with `units` kept along the axes named (the rest full)."""
        g, cin, cout = self.groups, self.in_channels, self.out_channels
        if self.cost_kind == "depthwise":
            c = units.get("dw", cin)
            return c, c * (cout // cin), c
        if self.cost_kind == "groupwise":
            k = units.get("grp", g)
            return k * (cin // g), k * (cout // g), k
        return g * units.get("in", cin // g), g * units.get("out", cout // g), g

    def module(self, units: Mapping[str, int], weights: nn.Module | None = None) -> nn.Module:
        """The layer with `units` kept; its weights sliced from `weights` (the full layer), else unset."""
        cin, cout, groups = self.shape_at(units)
        with torch.device("meta"):  # no initialisation: the weights are sliced in or left as they come
            if self.layer == "linear":
                layer: nn.Module = nn.Linear(cin, cout, bias=self.bias)
            else:
                conv = {"conv1d": nn.Conv1d, "conv2d": nn.Conv2d, "conv3d": nn.Conv3d}[self.layer]
                layer = conv(cin, cout, self.kernel, stride=self.stride, padding=self.padding, dilation=self.dilation,
                             groups=groups, bias=self.bias, padding_mode=self.padding_mode)
        layer = layer.to_empty(device="cpu")
        if weights is not None:
            with torch.no_grad():
                for name, tensor in layer.named_parameters():
                    source = getattr(weights, name)
                    tensor.copy_(source[tuple(slice(0, n) for n in tensor.shape)])
        return layer

    def input_shape(self, units: Mapping[str, int]) -> tuple[int, ...]:
        cin = self.shape_at(units)[0]
        return (*self.size, cin) if self.layer == "linear" else (cin, *self.size)

    def align(self, axis: LayerAxis, favoured: int) -> int:
        """The units along `axis` that make a favoured multiple of real channels."""
        if axis.kind == "grp":
            return 1
        per_unit = self.groups if axis.kind in ("in", "out") else 1
        return max(1, favoured // math.gcd(favoured, per_unit))


_PLAIN_FORWARDS = {nn.Conv1d: nn.Conv1d.forward, nn.Conv2d: nn.Conv2d.forward, nn.Conv3d: nn.Conv3d.forward,
                   nn.Linear: nn.Linear.forward}


def _plain_type(module: nn.Module) -> str | None:
    """The layer type a module times as (None: its forward is its own, so it stays in the remainder)."""
    for cls, forward in _PLAIN_FORWARDS.items():
        if isinstance(module, cls) and type(module).forward is forward:
            return "linear" if cls is nn.Linear else cls.__name__.lower()
    return None


def layer_specs(model: nn.Module, graph: ChannelGraph, input_shape: Sequence[int]) -> dict[str, LayerSpec]:
    """The graph's conv/linear layers that time as plain layers, with their real input sizes (one
    forward at batch 1 records them); a layer called more than once stays in the remainder."""
    wanted = {name for name, cost in graph.costs.items() if cost.kind in ("conv", "depthwise", "groupwise", "linear")}
    modules = {name: m for name, m in model.named_modules() if name in wanted and _plain_type(m) is not None}
    seen: dict[str, list[tuple[int, ...]]] = {}
    handles = [m.register_forward_hook(lambda _m, args, _out, name=name: seen.setdefault(name, []).append(
        tuple(args[0].shape)) if args and isinstance(args[0], torch.Tensor) else None)
        for name, m in modules.items()]
    param = next(model.parameters(), None)
    try:
        with torch.no_grad():
            x = torch.randn((1, *input_shape), generator=torch.Generator().manual_seed(0))
            model.eval()(x.to(device=param.device if param is not None else "cpu",
                              dtype=param.dtype if param is not None and param.is_floating_point() else torch.float32))
    finally:
        for handle in handles:
            handle.remove()
    specs: dict[str, LayerSpec] = {}
    for name, m in modules.items():
        shapes = seen.get(name, [])
        if len(shapes) != 1:
            continue
        shape, cost = shapes[0], graph.costs[name]
        if isinstance(m, nn.Linear):
            specs[name] = LayerSpec("linear", cost.kind, m.in_features, m.out_features, 1, (), (), (), (),
                                    m.bias is not None, "zeros", tuple(shape[1:-1]))
        else:
            specs[name] = LayerSpec(_plain_type(m) or "", cost.kind, m.in_channels, m.out_channels, m.groups,
                                    tuple(m.kernel_size), tuple(m.stride),
                                    m.padding if isinstance(m.padding, str) else tuple(m.padding),
                                    tuple(m.dilation), m.bias is not None, m.padding_mode, tuple(shape[2:]))
    return specs


def axis_grid(full: int, align: int, points: int = GRID_POINTS) -> tuple[int, ...]:
    """About `points` widths from full/points to `full`, each a multiple of `align`, and `full` itself."""
    widths = {full}
    for j in range(1, points):
        widths.add(max(align, round(full * j / points / align) * align))
    return tuple(sorted(w for w in widths if w <= full))


@dataclass
class LatencyTables:
    """What `build_latency_model` made and how: the model, the original's measured latency, counts."""

    model: LatencyModel
    original_ms: float  # the whole unpruned model's median on the target
    thinned_ms: float  # ... and uniformly thinned (the remainder's second point)
    layers: int  # layers with a table
    measured: int  # tables timed now
    cached: int  # tables read from the cache
    seconds: float  # building the model: the tables and the remainder
    table_seconds: float  # the tables alone (finding the layers, timing or reading them)
    cache: str | None  # the cache file (None: not cached)
    rest: list[str] = field(default_factory=list)  # conv/linear layers without a table (in the remainder)


def cache_file(target: LatencyTarget) -> Path:
    key = json.dumps({"version": CACHE_VERSION, **target.key()}, sort_keys=True)
    return cache_root() / "latency" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("tables", {}) if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, target: LatencyTarget, tables: Mapping[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"version": CACHE_VERSION, "target": target.key(), "tables": dict(tables)},
                                           sort_keys=True))
    except OSError as exc:
        raise UserError(f"cannot write the latency cache {path}: {exc}; set XDG_CACHE_HOME to a writable folder") from None


def _signature(spec: LayerSpec, axes: Sequence[LayerAxis], grid: Sequence[Sequence[int]], align: Sequence[int]) -> str:
    text = json.dumps({"spec": asdict(spec), "axes": [a.kind for a in axes], "grid": [list(g) for g in grid],
                       "align": list(align)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


PointsTimer = Callable[[LayerSpec, Sequence[Mapping[str, int]], LatencyTarget], list[float]]


def _time_points(spec: LayerSpec, points: Sequence[Mapping[str, int]], target: LatencyTarget) -> list[float]:
    """`spec` at each of `points` (kept units by axis kind) timed on `target`, round by round (every
    point sees the machine as it is during the rounds); weights are slices of one random full layer."""
    full = spec.module({})
    with torch.no_grad():
        for tensor in full.parameters():
            tensor.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(0))
        runners = [target.layer_runner(spec.module(units, full), spec.input_shape(units)) for units in points]
    with target.timing():
        return [median_ms(t) for t in time_interleaved(runners, LAYER_TIMING)]


def measure_table(spec: LayerSpec, axes: Sequence[LayerAxis], grid: Sequence[Sequence[int]], align: Sequence[int],
                  target: LatencyTarget, time_points: PointsTimer | None = None) -> LayerTable:
    """`spec` timed at every point of `grid` (by `time_points`, default: on `target`); suspect points
    (`_suspects`) are timed again, with their neighbours, and the fastest time of each stands."""
    time_points = time_points or _time_points
    kinds = [a.kind for a in axes]
    points = list(itertools.product(*grid))
    ms = dict(zip(points, time_points(spec, [dict(zip(kinds, p)) for p in points], target)))
    for _ in range(RETIMES):
        again = _suspects(ms, grid)
        if not again:
            break
        retimed = sorted(again)
        for q, value in zip(retimed, time_points(spec, [dict(zip(kinds, q)) for q in retimed], target)):
            ms[q] = min(ms[q], value)
    return LayerTable(tuple(tuple(g) for g in grid), tuple(ms[p] for p in points), tuple(align))


def _suspects(ms: Mapping[tuple[int, ...], float], grid: Sequence[Sequence[int]]) -> set[tuple[int, ...]]:
    """Points (with the neighbour they are compared with) slower than the next wider one by more
    than `_SLOWER`, or slower than the next narrower one by more than `_SUPERLINEAR` times the ratio
    of their widths (a layer's work grows in proportion to each width): a busy moment, or a staircase."""
    found: set[tuple[int, ...]] = set()
    for p, value in ms.items():
        for axis, widths in enumerate(grid):
            i = widths.index(p[axis])
            if i + 1 < len(widths):
                wider = (*p[:axis], widths[i + 1], *p[axis + 1:])
                if value > _SLOWER * ms[wider]:
                    found.update((p, wider))
            if i > 0:
                narrower = (*p[:axis], widths[i - 1], *p[axis + 1:])
                if value > _SUPERLINEAR * ms[narrower] * widths[i] / widths[i - 1]:
                    found.update((p, narrower))
    return found


def build_latency_model(model: nn.Module, graph: ChannelGraph, input_shape: Sequence[int], target: LatencyTarget, *,
                        use_cache: bool = True, progress: Callable[[str], None] | None = None,
                        time_points: PointsTimer | None = None,
                        time_models: Callable[[Sequence[nn.Module]], list[float]] | None = None) -> LatencyTables:
    """The latency model of `model` (with its channel `graph`) on `target`: tables measured or read
    from the cache, and the remainder measured. `time_points` and `time_models` (medians of whole
    models, timed interleaved) replace the timing, for tests."""
    started = time.perf_counter()
    specs = layer_specs(model, graph, input_shape)
    axes = layer_axes(graph)
    favoured = target.favoured_multiple()
    path = cache_file(target) if use_cache else None
    cached = _read_cache(path) if path is not None else {}
    tables: dict[str, LayerTable] = {}
    measured = read = 0
    for name, spec in specs.items():
        layer_axes_ = axes[name]
        align = tuple(spec.align(a, favoured) for a in layer_axes_)
        grid = tuple(axis_grid(a.full, al) for a, al in zip(layer_axes_, align))
        key = _signature(spec, layer_axes_, grid, align)
        entry = cached.get(key)
        if entry is None:
            if progress is not None:
                progress(f"timing layer {len(tables) + 1}/{len(specs)}: {name}")
            table = measure_table(spec, layer_axes_, grid, align, target, time_points)
            cached[key] = {"spec": asdict(spec), "table": table.to_json()}
            measured += 1
            if path is not None:
                _write_cache(path, target, cached)  # each table as soon as it is timed: an interrupted build keeps them
        else:
            table = LayerTable.from_json(entry["table"])
            read += 1
        tables[name] = table
    table_seconds = time.perf_counter() - started
    if progress is not None:
        progress("timing the whole model, full and thinned, for the remainder")
    thinned_plan = _thinned_plan(graph)
    thinned = pruned(model, graph, thinned_plan)
    full_ms, thin_ms = (time_models or _model_timer(input_shape, target))([model, thinned])
    layer_only = LatencyModel(graph, tables, Remainder(0.0))
    removed = removed_slots(graph, thinned_plan)
    rest = float(layer_only.rest_macs(removed)) / layer_only.rest_before if layer_only.rest_before else 1.0
    scale, remainder = calibrated(full_ms, thin_ms, layer_only.predict({}), layer_only.predict(removed), rest)
    latency = LatencyModel(graph, tables, remainder, scale)
    rest_layers = sorted(n for n in axes if n not in tables)
    return LatencyTables(latency, full_ms, thin_ms, len(tables), measured, read, time.perf_counter() - started,
                         table_seconds, None if path is None else str(path), rest_layers)


def _thinned_plan(graph: ChannelGraph) -> dict[int, list[int]]:
    """Half of every prunable group's channels (the last ones), for the remainder's second point."""
    groups = graph.prunable_groups()
    if not groups:
        return {}
    scores = {g.id: -torch.arange(g.channels, dtype=torch.float64) for g in groups}
    return allocate(graph, scores, AllocationOptions(ratio=0.5)).plan


def pruned(model: nn.Module, graph: ChannelGraph, plan: Mapping[int, Sequence[int]]) -> nn.Module:
    """A copy of `model` with `plan` removed, unverified: it is only timed, never written."""
    copy_ = copy.deepcopy(model)
    prune_model(copy_, graph, plan)
    return copy_.eval()


def _model_timer(input_shape: Sequence[int], target: LatencyTarget) -> Callable[[Sequence[nn.Module]], list[float]]:
    def time_models(models: Sequence[nn.Module]) -> list[float]:
        runners = [target.model_runner(m, input_shape) for m in models]
        with target.timing():
            return [median_ms(t) for t in time_interleaved(runners, WHOLE_TIMING)]

    return time_models
