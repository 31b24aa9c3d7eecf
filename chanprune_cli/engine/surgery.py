"""Remove channels physically, mask them to zero, and prove the two agree.

A plan maps a group id to the class indices to remove. Surgery slices every member of those
classes in place, keeping module types and updating their shape attributes, so the result can be
saved, reloaded, re-traced and pruned again.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ChanpruneError, UserError
from .graph import ChannelGraph, Slot
from .layer_rules import PRODUCER_KINDS, LayerRule, keep_indices, rule_for, select, set_width_attributes
from .shapes import mark_size_attrs

Plan = Mapping[int, Sequence[int]]  # group id -> class indices to remove


@dataclass
class VerifyResult:
    max_abs_diff: float  # of the model outputs
    tolerance: float
    passed: bool
    outputs_compared: int
    layers_compared: int = 0  # layer outputs compared one by one (those whose width the plan kept)
    worst_layer: str | None = None  # the layer furthest outside its tolerance, when one is
    by_layers: bool = False  # outputs differ only through discontinuous post-processing (see verify)
    scale: float = 0.0  # max |masked original output|: the tolerance is rtol * max(1, scale)
    failure: str | None = None  # the pruned model could not run: the error (worst_layer: the module it came from)
    # "empty" | "constant" when the masked original's outputs were (a detector with no detections on
    # the random input): equal outputs then prove nothing, the layers compared one by one do
    outputs_degenerate: str | None = None

    @property
    def relative_diff(self) -> float:
        """max |pruned − masked original| relative to the outputs' scale (at least 1)."""
        return self.max_abs_diff / max(1.0, self.scale)


def removals(graph: ChannelGraph, plan: Plan) -> dict[str, dict[str, set[int]]]:
    """Per module, per slot kind, the indices to remove."""
    out: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    by_id = {g.id: g for g in graph.groups}
    for gid, indices in plan.items():
        group = by_id.get(gid)
        if group is None:
            raise UserError(f"the plan names channel group {gid}, which this model does not have")
        for ci in indices:
            if ci in group.pinned:
                raise UserError(f"group {group.name}: channel {ci} cannot be removed ({group.pinned[ci]})")
            if not 0 <= ci < group.channels:
                raise UserError(f"group {group.name} has {group.channels} channels; cannot remove index {ci}")
            slots: list[Slot] = group.classes[ci]
            for module, kind, index in slots:
                out[module][kind].add(index)
    return out


def _split_tensor_slots(drop: Mapping[str, set[int]]) -> tuple[dict[tuple[str, int], set[int]], dict[str, set[int]]]:
    """Slots on a module's own parameters/buffers ("tensor:ATTR:DIM", see the graph's per-channel
    tensors) apart from the slots its layer rule handles (split sizes, "split:...", have no tensor
    and are left out of both)."""
    tensors, rest = {}, {}
    for kind, indices in drop.items():
        if kind.startswith("tensor:"):
            _, attr, dim = kind.split(":")
            tensors[(attr, int(dim))] = indices
        elif not kind.startswith("split:"):
            rest[kind] = indices
    return tensors, rest


def _shrink_split_sizes(module: nn.Module, drop: Mapping[str, set[int]]) -> None:
    """Rewrite the split-size attributes ("split:ATTR" or "split:ATTR:P", see the graph's literal
    splits) by the channels each piece lost, and name them for the checkpoint record."""
    changed = []
    for kind, indices in drop.items():
        if not kind.startswith("split:"):
            continue
        _, attr, *piece = kind.split(":")
        value = getattr(module, attr)
        if piece:
            sizes = list(value)
            sizes[int(piece[0])] -= len(indices)
            setattr(module, attr, type(value)(sizes))
        else:
            setattr(module, attr, value - len(indices))
        changed.append(attr)
    if changed:
        mark_size_attrs(module, changed)


def _rule(name: str, module: nn.Module) -> LayerRule:
    rule = rule_for(module)
    if rule is None:
        raise ChanpruneError(f"internal: no layer rule for {type(module).__name__} ({name})")
    return rule


def prune_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Physically remove the planned channels from `model`, in place."""
    modules = dict(model.named_modules())
    drops = removals(graph, plan)
    # A plan may keep channels in a group yet empty one of its layers (the option-A stage chain can
    # rank all 16 stage-1 classes lowest): refuse before touching the model.
    for name, drop in drops.items():
        for kind in PRODUCER_KINDS:
            width = _rule(name, modules[name]).producer_width(modules[name], kind) if drop.get(kind) else None
            if width is not None and len(drop[kind]) >= width:
                raise UserError(f"the plan removes all {width} output channels of {name}; keep at least one "
                                "(the allocator's per-layer floor, --min-keep, does this)")
    for name, drop in drops.items():
        tensors, rest = _split_tensor_slots(drop)
        _shrink_split_sizes(modules[name], drop)
        for (attr, dim), indices in tensors.items():
            select(modules[name], attr, dim, keep_indices(getattr(modules[name], attr).shape[dim], indices))
        if rest:
            _rule(name, modules[name]).prune(modules[name], rest)
    set_width_attributes(model)


@torch.no_grad()
def mask_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Zero the planned channels in place: their producers' rows, norm entries and the consumers'
    input weights, so the masked model computes exactly what the pruned one does."""
    modules = dict(model.named_modules())
    for name, drop in removals(graph, plan).items():
        # Producers, norm entries *and* the consumers' inputs: a removed channel need not be zero
        # where it is consumed (sigmoid(0) = 0.5, an affine-free BatchNorm gives -mean/std).
        # Per-channel tensors stay: the consumers' zeroed inputs already cut what they add.
        rest = _split_tensor_slots(drop)[1]
        if rest:
            _rule(name, modules[name]).mask(modules[name], rest)


@torch.no_grad()
def zero_producers(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Zero the producer filters (weight rows and bias) of the planned channel classes, in place.

    Unlike `mask_model`, norms and the consumers' input weights are kept, so the zeroed filters
    still receive gradients and can recover (soft filter pruning)."""
    modules = dict(model.named_modules())
    for name, drop in removals(graph, plan).items():
        rest = _split_tensor_slots(drop)[1]
        if rest:
            _rule(name, modules[name]).zero_producers(modules[name], rest)


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (tuples, lists, dicts and detections' lists of dicts)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flatten_outputs(v)]
    return []


def _hooked_forward(model: nn.Module, x: torch.Tensor, hook_for: Callable[[str], Any]) -> Any:
    """`model(x)` with `hook_for(name)` as the forward hook of every leaf module (removed after)."""
    leaves = [(name, m) for name, m in model.named_modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(hook_for(name)) for name, m in leaves]
    try:
        return model(x)
    finally:
        for h in handles:
            h.remove()


def _tolerance(reference: torch.Tensor, rtol: float) -> float:
    return rtol * max(1.0, float(reference.abs().max()) if reference.numel() else 0.0)


def _compare(ref_out: list[torch.Tensor], got_out: list[torch.Tensor], rtol: float) -> tuple[float, float, bool, float]:
    """(max difference, tolerance, within it, scale of the reference outputs)."""
    scale = max((float(a.abs().max()) for a in ref_out if a.numel()), default=0.0)
    if len(ref_out) != len(got_out) or any(a.shape != b.shape for a, b in zip(ref_out, got_out)):
        return float("inf"), 0.0, False, scale
    diff = max((float((a - b).abs().max()) for a, b in zip(ref_out, got_out) if a.numel()), default=0.0)
    tolerance = rtol * max(1.0, scale)
    return diff, tolerance, diff <= tolerance, scale


class _LayerCheck:
    """Runs the reference recording every leaf's output, then the candidate with every leaf whose
    output kept its width compared with the reference's and replaced by it: each layer is checked
    on exactly the reference's inputs, and what follows the last layers (sorting, thresholds, NMS)
    sees the same values in both models."""

    def __init__(self, reference: nn.Module, candidate: nn.Module, rtol: float,
                 candidate_shapes: dict[str, list[Any]]) -> None:
        self.reference, self.candidate, self.rtol = reference, candidate, rtol
        # Only outputs the candidate's layer will match in shape are kept: in float64 at detection
        # sizes, copies of every layer's output took more memory than a 24 GiB machine has.
        self.candidate_shapes = candidate_shapes
        self.outputs: dict[str, list[Any]] = {}
        self.compared = 0
        self.worst: tuple[float, str] | None = None  # (diff / tolerance, layer)

    def run(self, x: torch.Tensor) -> tuple[Any, Any]:
        ref = _hooked_forward(self.reference, x, self._recorder)  # first: the candidate's hooks read what it records
        return ref, _hooked_forward(self.candidate, x, self._substitute)

    def _recorder(self, name: str) -> Any:
        shapes = self.candidate_shapes.get(name, [])

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            seen = self.outputs.setdefault(name, [])
            wanted = len(seen) < len(shapes) and isinstance(output, torch.Tensor) and shapes[len(seen)] == output.shape
            # a copy: later in-place ops (`x += y` after a module) must not change what was seen
            seen.append(output.clone() if wanted else None)
        return hook

    def _substitute(self, name: str) -> Any:
        calls = iter(self.outputs.get(name, []))

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            ref = next(calls, None)
            if ref is None or not isinstance(output, torch.Tensor) or ref.shape != output.shape:
                return None
            self.compared += 1
            diff = float((ref - output).abs().max()) if ref.numel() else 0.0
            excess = diff / _tolerance(ref, self.rtol)
            if excess > 1 and (self.worst is None or excess > self.worst[0]):
                self.worst = (excess, name)
            return ref.clone()
        return hook


class _Running:
    """The modules whose forward is running, innermost last (pre- and post-hooks on every named
    module); after a forward that raised, `failed_in` is the innermost one it raised in."""

    def __init__(self, model: nn.Module) -> None:
        self.stack: list[str] = []
        self.failed_in: str | None = None
        self.handles = [h for name, m in model.named_modules() if name
                        for h in (m.register_forward_pre_hook(self._enter(name)), m.register_forward_hook(self._leave))]

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append(name)
        return hook

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        self.stack.pop()

    def __enter__(self) -> _Running:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            self.failed_in = self.stack[-1] if self.stack else "(the model's own forward)"
        for h in self.handles:
            h.remove()


def _recording_shapes(model: nn.Module, x: torch.Tensor, shapes: dict[str, list[Any]]) -> Any:
    """`model(x)`, noting in `shapes` the output shape of every leaf call (None: not a tensor)."""
    def recorder(name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            shapes.setdefault(name, []).append(output.shape if isinstance(output, torch.Tensor) else None)
        return hook

    return _hooked_forward(model, x, recorder)


@torch.no_grad()
def verify(original: nn.Module, graph: ChannelGraph, plan: Plan, pruned: nn.Module,
           input_shape: Sequence[int], *, batch_size: int = 2, seed: int = 0,
           rtol: float = 1e-5) -> VerifyResult:
    """Compare `pruned` with `original` masked by `plan`, in float64 on random inputs (eval mode).

    Float64 makes the tolerance meaningful: a correct surgery differs only by rounding (~1e-12),
    while any structural mistake shows up at the scale of the activations. Besides the model
    outputs, every layer whose output kept its width is compared on the reference's own inputs.
    When only the outputs differ, and the same outputs agree once every layer's output is the
    reference's, the difference comes from discontinuous post-processing after the last layers
    (detections sorted by nearly tied scores, thresholds): the model is verified layer by layer.
    """
    reference = copy.deepcopy(original).double().eval()
    mask_model(reference, graph, plan)
    candidate = copy.deepcopy(pruned).double().eval()
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    x = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    ref_out = flatten_outputs(reference(x))
    shapes: dict[str, list[Any]] = {}
    running = _Running(candidate)
    try:
        with running:
            got = _recording_shapes(candidate, x, shapes)
    except Exception as exc:  # noqa: BLE001  (a pruned form that cannot run fails verification, naming where)
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return VerifyResult(float("inf"), 0.0, False, len(ref_out), worst_layer=running.failed_in,
                            failure=f"{type(exc).__name__}: {first}")
    diff, tolerance, passed, scale = _compare(ref_out, flatten_outputs(got), rtol)
    layers = _LayerCheck(reference, candidate, rtol, shapes)
    ref_again, substituted = layers.run(x)
    layers_ok = layers.worst is None
    by_layers = not passed and layers_ok and _compare(flatten_outputs(ref_again), flatten_outputs(substituted), rtol)[2]
    return VerifyResult(diff, tolerance, (passed and layers_ok) or by_layers, len(ref_out), layers.compared,
                        None if layers_ok else layers.worst[1], by_layers, scale, outputs_degenerate=_degenerate(ref_out))


def _degenerate(outputs: Sequence[torch.Tensor]) -> str | None:
    """"empty" when no output holds a value, "constant" when every value is one number, else None."""
    values = [t.reshape(-1) for t in outputs if t.numel()]
    if not values:
        return "empty"
    if all(bool((v == values[0][0]).all()) for v in values):
        return "constant"
    return None
