"""MACs counted on one workload: the original's.

A detector's heads run on as many region proposals and detections as its weights let through, so
a pruned detector counted on its own outputs does other work than the original (its MACs can even
grow). Every before/after comparison (`prune`'s table, totals and target, `bench`'s MACs ratio)
therefore counts both models on the original's workload: each layer's MACs as the original spent
them on the example input (fvcore), scaled by the channels the other model keeps. The channel
graph's costs, recorded per item of a layer's leading axis on its last call, are fitted to the
same counts (`fit_costs`), so `--target-flops` plans on that workload too.

A two-stage detector (torchvision's R-CNNs: an `rpn` and `roi_heads`) that finds no detections on
the example never runs its mask or keypoint head; that head is then counted at a nominal workload,
the detections the model returns with its score threshold at 0 (at most its
`box_detections_per_img`), and the statement says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..engine.graph import ChannelGraph
from ..engine.latency import module_macs
from ..engine.layer_rules import layer_shape
from ..measure import macs_by_module

# the heads of a two-stage detector that run once per detection
_DETECTION_HEADS = ("roi_heads.mask_head", "roi_heads.mask_predictor", "roi_heads.keypoint_head",
                    "roi_heads.keypoint_predictor")
FIT_TOLERANCE = 0.005  # a graph cost this close to the counted MACs is left as recorded


@dataclass(frozen=True)
class Nominal:
    """Heads counted at a nominal workload because the example gave them nothing to run on."""

    detections: int  # what the model returned with its score threshold at 0
    limit: int  # its box_detections_per_img
    heads: tuple[str, ...]


@dataclass
class CountedWork:
    """One model's MACs on one input, per module (containers too; "" is the whole model), with the
    region proposals and detections a two-stage detector ran its heads on (None for other models)."""

    macs: dict[str, int]  # "": the sum of the leaf modules'
    proposals: int | None = None
    detections: int | None = None
    nominal: Nominal | None = None

    @property
    def total(self) -> int:
        return self.macs.get("", 0)

    @property
    def detector(self) -> bool:
        return self.proposals is not None

    def statement(self) -> str:
        """"on the original's workload: N proposals, M detections" (and a nominal head, said)."""
        text = "on the original's workload"
        if self.detector:
            text += f": {self.proposals} proposals, {self.detections} detections"
        if self.nominal is not None:
            text += (f" (none on the example input: {', '.join(self.nominal.heads)} counted at a nominal "
                     f"{self.nominal.detections} detections, the model's with its score threshold at 0, at most "
                     f"box_detections_per_img {self.nominal.limit})")
        return text

    def record(self) -> dict[str, Any]:
        nominal = None if self.nominal is None else {
            "detections": self.nominal.detections, "box_detections_per_img": self.nominal.limit,
            "heads": list(self.nominal.heads)}
        return {"statement": self.statement(), "proposals": self.proposals, "detections": self.detections,
                "nominal": nominal}


def count_work(model: nn.Module, input_shape: Sequence[int], *, nominal: bool = True) -> CountedWork:
    """`model`'s MACs on the example input (`measure.macs_by_module`), with a two-stage detector's
    proposals and detections; with `nominal`, a detection head the example left idle is counted
    at the nominal workload (see the module docstring)."""
    with _DetectorCounts(model) as counts:
        macs = macs_by_module(model, input_shape)
    # the whole is its leaves' sum, as reports add them up (a container's own ops, e.g. a residual
    # addition, belong to no layer)
    macs[""] = sum(v for name, v in macs.items() if name and next(model.get_submodule(name).children(), None) is None)
    work = CountedWork(macs, counts.proposals, counts.detections)
    heads = tuple(h for h in _DETECTION_HEADS if h in work.macs)
    roi_heads = getattr(model, "roi_heads", None)
    if not (nominal and heads and work.detections == 0 and roi_heads is not None):
        return work
    with _DetectorCounts(model) as counts, _score_threshold(roi_heads, 0.0):
        idle = macs_by_module(model, input_shape)
    delta = 0
    for name in list(work.macs):
        if any(name == h or name.startswith(h + ".") for h in heads):
            delta += idle[name] - work.macs[name] if name in heads else 0
            work.macs[name] = idle[name]
    for ancestor in ("", "roi_heads"):
        work.macs[ancestor] = work.macs.get(ancestor, 0) + delta
    work.nominal = Nominal(counts.detections or 0, int(getattr(roi_heads, "detections_per_img", 0)), heads)
    return work


def fit_costs(graph: ChannelGraph, work: CountedWork) -> None:
    """Scale each of `graph`'s layer costs to the MACs `work` counted for that layer (all its calls,
    all its rows), so the allocator's MACs are the counted ones on the original's workload."""
    for name, cost in graph.costs.items():
        counted, recorded = work.macs.get(name, 0), module_macs(cost, name, {})
        if counted > 0 and recorded > 0 and abs(counted - recorded) > FIT_TOLERANCE * recorded:
            graph.costs[name] = dataclasses.replace(cost, per_unit=max(1, round(cost.per_unit * counted / recorded)))


@dataclass
class Matched:
    """A model's MACs on a reference's workload: per leaf module, the reference's MACs of that
    module scaled by the channels kept (conv/linear: inputs × outputs per group; a norm: channels);
    modules without channels to scale by keep their own count."""

    leaves: dict[str, float]
    # (layer, own MACs / MACs on the reference's workload), most changed first; a head counted at
    # the nominal workload is not among them
    changed: list[tuple[str, float]]

    @property
    def total(self) -> int:
        return int(round(sum(self.leaves.values())))


def on_reference_workload(reference: nn.Module, reference_work: CountedWork, model: nn.Module,
                          own: Mapping[str, int]) -> Matched:
    """`model`'s MACs on `reference`'s workload (see `Matched`); `own`: its MACs per module on its own."""
    theirs = dict(reference.named_modules())
    nominal = reference_work.nominal.heads if reference_work.nominal is not None else ()
    leaves: dict[str, float] = {}
    changed = []
    for name, module in model.named_modules():
        if not name or next(module.children(), None) is not None:
            continue
        mine = own.get(name, 0)
        fraction = _kept_fraction(theirs.get(name), module)
        before = reference_work.macs.get(name, 0)
        if fraction is None or not before:
            leaves[name] = mine
            continue
        leaves[name] = before * fraction
        idle = any(name.startswith(head + ".") for head in nominal)  # ran in neither model: no change to say
        if leaves[name] and not idle and abs(mine - leaves[name]) > 0.01 * leaves[name] + 1:
            changed.append((name, mine / leaves[name]))
    changed.sort(key=lambda item: -abs(math.log(max(item[1], 1e-12))))
    return Matched(leaves, changed)


def _kept_fraction(reference: nn.Module | None, module: nn.Module) -> float | None:
    """The share of `reference`'s per-position work `module` does at its widths (None: not a layer
    with channels, or not the same layer)."""
    if reference is None:
        return None
    a, b = layer_shape(module), layer_shape(reference)
    if a is None or b is None or a.kind != b.kind or not (a.in_channels and a.out_channels and b.in_channels
                                                          and b.out_channels):
        return None
    if a.kind == "norm":
        return a.out_channels / b.out_channels
    return (a.out_channels * a.in_channels / (a.groups or 1)) / (b.out_channels * b.in_channels / (b.groups or 1))


class _DetectorCounts:
    """Inside, the region proposals and detections of a two-stage detector's forward passes (the
    last pass's, first image): None for a model without an `rpn` and `roi_heads`."""

    def __init__(self, model: nn.Module) -> None:
        rpn, roi_heads = getattr(model, "rpn", None), getattr(model, "roi_heads", None)
        self.modules = (rpn, roi_heads) if isinstance(rpn, nn.Module) and isinstance(roi_heads, nn.Module) else None
        self.proposals: int | None = None
        self.detections: int | None = None
        self.handles: list[Any] = []

    def __enter__(self) -> _DetectorCounts:
        if self.modules is not None:
            rpn, roi_heads = self.modules
            self.handles = [rpn.register_forward_hook(self._rpn), roi_heads.register_forward_hook(self._roi_heads)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _rpn(self, module: nn.Module, inputs: Any, output: Any) -> None:
        boxes = output[0] if isinstance(output, tuple) else output
        self.proposals = int(boxes[0].shape[0]) if boxes else 0

    def _roi_heads(self, module: nn.Module, inputs: Any, output: Any) -> None:
        result = output[0] if isinstance(output, tuple) else output
        self.detections = int(result[0]["boxes"].shape[0]) if result else 0


@contextlib.contextmanager
def _score_threshold(roi_heads: nn.Module, value: float) -> Iterator[None]:
    old = getattr(roi_heads, "score_thresh", None)
    roi_heads.score_thresh = value
    try:
        yield
    finally:
        roi_heads.score_thresh = old
