"""A model's latency as a function of its kept widths: what `--target-latency` allocates with.

`LayerTable`: one conv/linear layer's latency (ms), measured in isolation at its real input size, on
a grid of kept widths, one axis per width a plan can change (a conv's inputs and outputs, a
depthwise conv's channels, a grouped conv's whole groups). Before a lookup a width is raised to
the next multiple of the axis's `align`, the widths the runtime favours (a width between two of
them runs padded to the upper one, so the curve is a staircase and a width off the multiples saves
nothing over the multiple above it); between grid points the latency is interpolated linearly;
measured points stay as measured, including a width slower than a narrower one.

`LatencyModel`: the predicted latency of any plan of one channel graph, the sum of its layers'
tables at the plan's kept widths, times a `scale`, plus the *remainder* (norms, activations, adds,
pooling, layers without a table): the whole model's measured latency minus its layers' scaled sum,
measured at full width and at a thinned width, and interpolated linearly in the fraction of the
rest's MACs a plan keeps (`Remainder`). The scale is 1 unless the tables claim more time, or more
time saved, than the whole model measures (isolated layers timed slower than they run inside the
model: `calibrated`); no prediction is negative. The tables are built by measuring
(`chanprune_cli.latency`); this module only reads them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Union

import torch

from ..errors import UserError
from .graph import ChannelGraph
from .layer_rules import ModuleCost

# The slot kind counted along each axis a layer of that cost kind can have (engine/layer_rules.py).
AXIS_KINDS = {"conv": ("in", "out"), "linear": ("in", "out"), "depthwise": ("dw",), "groupwise": ("grp",)}
_TIME = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|us|µs)\s*$")
_MS_PER_UNIT = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3}

Units = Union[int, torch.Tensor]  # a count of kept units, or one per candidate plan


@dataclass(frozen=True)
class LatencyGoal:
    """What `--target-latency` asks for: a `fraction` of the original's measured latency, or `ms`."""

    fraction: float | None = None
    ms: float | None = None

    def describe(self) -> str:
        return f"{self.fraction:g}" if self.fraction is not None else f"{self.ms:g}ms"

    def requested(self) -> dict[str, float]:
        """The plan record's `requested` entry."""
        return {"target_latency": self.fraction} if self.fraction is not None else {"target_latency_ms": float(self.ms or 0)}


def parse_latency_goal(value: float | str | LatencyGoal) -> LatencyGoal:
    """`--target-latency`: a fraction in (0, 1) of the original's latency, or a time ("12ms", "0.8s")."""
    if isinstance(value, LatencyGoal):
        return value
    text = str(value).strip()
    found = _TIME.match(text) if isinstance(value, str) else None
    if found:
        ms = float(found.group(1)) * _MS_PER_UNIT[found.group(2)]
        if not ms > 0:
            raise UserError(f"--target-latency {text}: a time must be positive, e.g. 12ms")
        return LatencyGoal(ms=ms)
    try:
        fraction = float(value) if not isinstance(value, bool) else math.nan
    except ValueError:
        fraction = math.nan
    if not 0 < fraction < 1:
        raise UserError(f"--target-latency must be a fraction of the original's latency between 0 and 1 (exclusive) "
                        f"or a time such as 12ms, got {text}")
    return LatencyGoal(fraction=fraction)


@dataclass(frozen=True)
class LayerTable:
    """One layer's latency (ms) on a grid of kept units, one axis per width a plan can change.

    `grid[a]`: the units measured along axis a (ascending; the last is the layer's full width);
    `ms`: the measurements, row-major over the grid; `align[a]`: units are raised to a multiple of
    it (at most the full width) before the lookup. A layer no plan can change has no axis: one value."""

    grid: tuple[tuple[int, ...], ...]
    ms: tuple[float, ...]
    align: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.align) != len(self.grid) or len(self.ms) != math.prod(len(g) for g in self.grid):
            raise ValueError("a latency table needs one align per axis and one value per grid point")
        if any(not g or list(g) != sorted(set(g)) or g[0] < 1 for g in self.grid) or any(a < 1 for a in self.align):
            raise ValueError("a latency table's grid must be ascending positive units")

    @property
    def full(self) -> tuple[int, ...]:
        return tuple(g[-1] for g in self.grid)

    def aligned(self, axis: int, units: int) -> int:
        """`units` as the runtime runs them: the next multiple of the axis's align, at most full width."""
        a, full = self.align[axis], self.grid[axis][-1]
        return min(full, -(-units // a) * a)

    @cached_property
    def _values(self) -> torch.Tensor:
        return torch.tensor(self.ms, dtype=torch.float64)

    @cached_property
    def _grids(self) -> list[torch.Tensor]:
        return [torch.tensor(g, dtype=torch.float64) for g in self.grid]

    def weights(self, axis: int, units: torch.Tensor) -> torch.Tensor:
        """Interpolation weights over axis `axis`'s grid points, one row per entry of `units`."""
        grid = self._grids[axis]
        a, full = self.align[axis], self.grid[axis][-1]
        width = torch.clamp(torch.ceil(units.double() / a) * a, max=full)
        rows = torch.zeros((units.numel(), len(grid)), dtype=torch.float64)
        if len(grid) == 1:
            rows[:, 0] = 1.0
            return rows
        width = torch.clamp(width, min=float(grid[0]))  # below the grid: as its narrowest point (conservative)
        upper = torch.clamp(torch.searchsorted(grid, width), 1, len(grid) - 1)
        lo, hi = grid[upper - 1], grid[upper]
        t = (width - lo) / (hi - lo)
        index = torch.arange(units.numel())
        rows[index, upper - 1] = 1 - t
        rows[index, upper] += t
        return rows

    @cached_property
    def dense(self) -> torch.Tensor:
        """The latency at every count of kept units, 0 to full along each axis (index = units)."""
        values = self._values.reshape([len(g) for g in self.grid])
        for axis, grid in enumerate(self.grid):  # contract axis `axis` of the grid with its interpolation weights
            w = self.weights(axis, torch.arange(grid[-1] + 1))
            values = torch.tensordot(w, values.movedim(axis, 0), dims=([1], [0])).movedim(0, axis)
        return values

    def at(self, *units: Units) -> torch.Tensor:
        """The latency at `units` kept along each axis (tensors: one value per entry, broadcast)."""
        if len(units) != len(self.grid):
            raise ValueError(f"this table has {len(self.grid)} axes, got {len(units)} widths")
        if not self.grid:
            return self._values[0]
        index = tuple(torch.clamp(torch.as_tensor(u, dtype=torch.long), 0, g[-1]) for u, g in zip(units, self.grid))
        return self.dense[index]

    def to_json(self) -> dict[str, object]:
        return {"grid": [list(g) for g in self.grid], "ms": list(self.ms), "align": list(self.align)}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> LayerTable:
        return cls(tuple(tuple(int(u) for u in g) for g in data["grid"]),  # type: ignore[union-attr]
                   tuple(float(v) for v in data["ms"]), tuple(int(a) for a in data["align"]))  # type: ignore[union-attr]


@dataclass(frozen=True)
class LayerAxis:
    """One width of a layer that plans change: the slot kind removals count in, and its full units."""

    kind: str  # "in" | "out" | "dw" | "grp"
    full: int


def removable_slots(graph: ChannelGraph) -> set[tuple[str, str]]:
    """(module, slot kind) of every slot some plan can remove (a prunable class of a prunable group)."""
    found: set[tuple[str, str]] = set()
    for g in graph.prunable_groups():
        for i in g.prunable_classes:
            found.update((module, kind) for module, kind, _ in g.classes[i])
    return found


def layer_axes(graph: ChannelGraph) -> dict[str, tuple[LayerAxis, ...]]:
    """Every conv/linear layer of the graph with the widths plans can change (possibly none)."""
    removable = removable_slots(graph)
    axes: dict[str, tuple[LayerAxis, ...]] = {}
    for name, cost in graph.costs.items():
        kinds = AXIS_KINDS.get(cost.kind)
        if kinds is None:
            continue
        full = {"in": cost.ins, "out": cost.outs, "dw": cost.ins, "grp": cost.groups}
        axes[name] = tuple(LayerAxis(k, full[k]) for k in kinds if (name, k) in removable)
    return axes


@dataclass(frozen=True)
class Remainder:
    """The rest of the model (whole measured − layers' scaled sum) as a function of the fraction of
    the rest's MACs a plan keeps: `full_ms` at 1, and, when measured, `thinned_ms` at `thinned_rest`;
    linear through them (never growing as widths shrink: a thinned model measured slower is noise),
    held at `thinned_ms` below the thinned point (what did not shrink down to it, such as each
    operation's fixed cost, is not assumed to shrink further), constant without a second point, and
    never below 0 (`calibrated` makes both points at least 0)."""

    full_ms: float
    thinned_ms: float | None = None
    thinned_rest: float | None = None

    def at(self, rest: torch.Tensor | float) -> torch.Tensor:
        rest = torch.as_tensor(rest, dtype=torch.float64)
        if self.thinned_ms is None or self.thinned_rest is None or not 0 <= self.thinned_rest < 1:
            return torch.full_like(rest, max(0.0, self.full_ms))
        slope = max(0.0, (self.full_ms - self.thinned_ms) / (1 - self.thinned_rest))
        return torch.clamp(self.full_ms - slope * (1 - torch.clamp(rest, min=self.thinned_rest)), min=0.0)


def calibrated(full_ms: float, thinned_ms: float, layers_full: float, layers_thinned: float,
               thinned_rest: float) -> tuple[float, Remainder]:
    """The tables' scale and the remainder that make the prediction the whole model's measurements:
    `full_ms` at full width (tables summing to `layers_full`) and `thinned_ms` thinned (`layers_thinned`).

    The scale is the largest at most 1 that leaves the remainder at least 0 at both points and no
    larger thinned than full: tables that sum to more than the whole model (isolated layers run
    slower than inside it: a busy machine, other kernels, caches) or that save more time than the
    whole model saves are scaled down to it, so predictions are never negative and differences
    between plans are as large as the whole model measures. A thinned model measured no faster
    than the full one (noise) leaves only the full point: the remainder is then constant."""
    if layers_full <= 0:
        return 1.0, Remainder(max(0.0, full_ms))
    limits = [1.0, full_ms / layers_full]
    thinned_counts = thinned_ms < full_ms and layers_thinned < layers_full
    if thinned_counts:
        if layers_thinned > 0:
            limits.append(thinned_ms / layers_thinned)
        limits.append((full_ms - thinned_ms) / (layers_full - layers_thinned))
    scale = max(min(limits), 0.0)
    if scale <= 0:  # a whole model measured at no time: nothing to scale to
        return 1.0, Remainder(0.0)
    if not thinned_counts:
        return scale, Remainder(full_ms - scale * layers_full)
    return scale, Remainder(full_ms - scale * layers_full, thinned_ms - scale * layers_thinned, thinned_rest)


def module_macs(cost: ModuleCost, name: str, removed: Mapping[tuple[str, str], Units]) -> Units:
    """One module's MACs with the slots `removed` gone (counts, or tensors of counts)."""
    def gone(kind: str) -> Units:
        return removed.get((name, kind), 0)

    if cost.kind in ("norm", "gnorm"):
        return (cost.ins - gone(cost.kind)) * cost.per_unit
    if cost.kind == "depthwise":
        return (cost.ins - gone("dw")) * cost.per_unit
    if cost.kind == "groupwise":
        return (cost.groups - gone("grp")) * cost.outs * cost.ins * cost.per_unit
    return cost.groups * (cost.outs - gone("out")) * (cost.ins - gone("in")) * cost.per_unit


class LatencyModel:
    """Predicted latency (ms) of any plan of `graph`: its layers' `tables` at the kept widths, times
    `scale` (`calibrated`), plus the `remainder`. Layers of the graph without a table count in the
    rest (their MACs scale the remainder)."""

    def __init__(self, graph: ChannelGraph, tables: Mapping[str, LayerTable], remainder: Remainder,
                 scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"a latency model's scale must be positive, got {scale}")
        axes = layer_axes(graph)
        self.graph, self.tables, self.remainder, self.scale = graph, dict(tables), remainder, scale
        self.axes: dict[str, tuple[LayerAxis, ...]] = {}
        for name, table in self.tables.items():
            if name not in axes:
                raise ValueError(f"{name} is not a conv/linear layer of this graph")
            if tuple(a.full for a in axes[name]) != table.full:
                raise ValueError(f"the latency table of {name} has full widths {table.full}, the layer "
                                 f"{tuple(a.full for a in axes[name])}")
            self.axes[name] = axes[name]
        self.rest_modules = [name for name in graph.costs if name not in self.tables]
        self.rest_before = float(self.rest_macs({}))
        self.by_slot: dict[tuple[str, str], set[str]] = {}  # (module, kind) -> modules whose prediction reads it
        for name in self.tables:
            for axis in self.axes[name]:
                self.by_slot.setdefault((name, axis.kind), set()).add(name)
        for name in self.rest_modules:
            for kind in ("in", "out", "dw", "grp", "norm", "gnorm"):
                self.by_slot.setdefault((name, kind), set()).add(name)

    def layers_ms(self, removed: Mapping[tuple[str, str], Units], modules: Sequence[str] | None = None) -> Units:
        """The tables of `modules` (default: every layer with one) summed at the kept widths."""
        total: Units = 0.0  # type: ignore[assignment]
        for name in self.tables if modules is None else modules:
            table = self.tables.get(name)
            if table is not None:
                units = [axis.full - removed.get((name, axis.kind), 0) for axis in self.axes[name]]
                total = total + table.at(*units)
        return total

    def rest_macs(self, removed: Mapping[tuple[str, str], Units], modules: Sequence[str] | None = None) -> Units:
        """The MACs of the rest's `modules` (default: all of them) with the slots `removed` gone."""
        total: Units = 0
        costs = self.graph.costs
        for name in self.rest_modules if modules is None else modules:
            if name not in self.tables and name in costs:
                total = total + module_macs(costs[name], name, removed)
        return total

    def combine(self, layers_ms: Units, rest_macs: Units) -> torch.Tensor:
        """The prediction from the layers' sum and the rest's MACs (see `Remainder`)."""
        rest = torch.as_tensor(rest_macs, dtype=torch.float64) / self.rest_before if self.rest_before else 1.0
        return self.scale * torch.as_tensor(layers_ms, dtype=torch.float64) + self.remainder.at(rest)

    def predict(self, removed: Mapping[tuple[str, str], Units]) -> float:
        """The predicted latency with the slots `removed` (by (module, kind), as `removed_slots` counts) gone."""
        return float(self.combine(self.layers_ms(removed), self.rest_macs(removed)))

    def predict_plan(self, plan: Mapping[int, Sequence[int]]) -> float:
        return self.predict(removed_slots(self.graph, plan))

    def modules_reading(self, slots: Sequence[tuple[str, str]]) -> list[str]:
        """The modules whose prediction changes when any of `slots` changes."""
        return sorted({m for slot in slots for m in self.by_slot.get(slot, ())})

    def favoured_multiple(self) -> int:
        """The width multiple the tables' runtime favours (`--round-to auto`): their largest align."""
        return max((a for t in self.tables.values() for a in t.align), default=1)


def removed_slots(graph: ChannelGraph, plan: Mapping[int, Sequence[int]]) -> Counter[tuple[str, str]]:
    """Slots `plan` removes, by (module, slot kind)."""
    by_id = {g.id: g for g in graph.groups}
    counts: Counter[tuple[str, str]] = Counter()
    for gid, indices in plan.items():
        classes = by_id[gid].classes
        for ci in indices:
            for module, kind, _ in classes[ci]:
                counts[(module, kind)] += 1
    return counts


@dataclass(frozen=True)
class LatencyBudget:
    """What a latency plan must fit: `ms` as `model` predicts it."""

    model: LatencyModel
    ms: float


class LatencyUnreachable(UserError):
    """No plan fits the latency budget: `closest_ms` is the fastest prediction reached, `original_ms` the
    unpruned model's."""

    def __init__(self, message: str, closest_ms: float, original_ms: float) -> None:
        super().__init__(message)
        self.closest_ms, self.original_ms = closest_ms, original_ms


def width_curve(model: LatencyModel, plan: Mapping[int, Sequence[int]], group_id: int) -> tuple[list[int], list[float]]:
    """The latency of the layers whose widths follow group `group_id`, at each width it can keep (the
    other groups as `plan` leaves them): the staircase a plan's width sits on. The group loses the
    channels `plan` removes first, then its other prunable ones in order."""
    group = next(g for g in model.graph.groups if g.id == group_id)
    removed = list(plan.get(group_id, ()))
    order = removed + [i for i in group.prunable_classes if i not in set(removed)]
    base = removed_slots(model.graph, {gid: v for gid, v in plan.items() if gid != group_id})
    counts: dict[tuple[str, str], torch.Tensor] = {}
    for step, ci in enumerate(order):
        for module, kind, _ in group.classes[ci]:
            counts.setdefault((module, kind), torch.zeros(len(order) + 1, dtype=torch.long))[step + 1:] += 1
    trial = {slot: base.get(slot, 0) + c for slot, c in counts.items()}
    merged: dict[tuple[str, str], Units] = {**base, **trial}
    ms = model.layers_ms(merged, [m for m in model.modules_reading(list(counts)) if m in model.tables])
    widths = [group.channels - k for k in range(len(order) + 1)]
    values = (model.scale * torch.as_tensor(ms, dtype=torch.float64)).expand(len(widths)).tolist()
    return widths, values
