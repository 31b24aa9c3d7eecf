"""Remove channels physically, mask them to zero, and prove the two agree (DESIGN §2).

A plan maps a group id to the class indices to remove. Surgery slices every member of those
classes in place, keeping module types and updating their shape attributes, so the result can be
saved, reloaded, re-traced and pruned again.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ChanpruneError, UserError
from .graph import ChannelGraph, Slot
from ..models.layers import OptionAShortcut

Plan = Mapping[int, Sequence[int]]  # group id -> class indices to remove


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    passed: bool
    outputs_compared: int


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


def _keep(n: int, drop: set[int]) -> list[int]:
    return [i for i in range(n) if i not in drop]


def _set_param(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    old = getattr(module, name, None)
    if old is None or value is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value.contiguous())


def _select(module: nn.Module, name: str, dim: int, index: list[int]) -> None:
    t = getattr(module, name, None)
    if t is not None:
        _set_param(module, name, t.detach().index_select(dim, torch.tensor(index, dtype=torch.long, device=t.device)))


def _prune_module(name: str, m: nn.Module, drop: Mapping[str, set[int]]) -> None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if drop.get("dw"):
            keep_in = _keep(m.in_channels, drop["dw"])
            mult = m.out_channels // m.in_channels
            keep_out = [j * mult + t for j in keep_in for t in range(mult)]
            _select(m, "weight", 0, keep_out)
            _select(m, "bias", 0, keep_out)
            m.in_channels, m.out_channels, m.groups = len(keep_in), len(keep_out), len(keep_in)
            return
        g = m.groups
        cpg, opg = m.in_channels // g, m.out_channels // g
        keep_in_local = _keep(cpg, drop.get("in", set()))
        keep_out_local = _keep(opg, drop.get("out", set()))
        keep_out = [grp * opg + k for grp in range(g) for k in keep_out_local]
        _select(m, "weight", 0, keep_out)
        _select(m, "weight", 1, keep_in_local)
        _select(m, "bias", 0, keep_out)
        m.in_channels, m.out_channels = g * len(keep_in_local), g * len(keep_out_local)
    elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        keep_in = _keep(m.in_channels, drop.get("in", set()))
        keep_out = _keep(m.out_channels, drop.get("out", set()))
        _select(m, "weight", 0, keep_in)
        _select(m, "weight", 1, keep_out)
        _select(m, "bias", 0, keep_out)
        m.in_channels, m.out_channels = len(keep_in), len(keep_out)
    elif isinstance(m, nn.Linear):
        keep_in = _keep(m.in_features, drop.get("in", set()))
        keep_out = _keep(m.out_features, drop.get("out", set()))
        _select(m, "weight", 0, keep_out)
        _select(m, "weight", 1, keep_in)
        _select(m, "bias", 0, keep_out)
        m.in_features, m.out_features = len(keep_in), len(keep_out)
    elif isinstance(m, nn.modules.batchnorm._NormBase):  # BatchNorm*, SyncBatchNorm, InstanceNorm*
        keep = _keep(m.num_features, drop.get("norm", set()))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _select(m, attr, 0, keep)
        m.num_features = len(keep)
    elif isinstance(m, nn.PReLU):
        keep = _keep(m.num_parameters, drop.get("norm", set()))
        _select(m, "weight", 0, keep)
        m.num_parameters = len(keep)
    elif isinstance(m, nn.GroupNorm):
        per = m.num_channels // m.num_groups
        groups = _keep(m.num_groups, drop.get("gnorm", set()))
        keep = [grp * per + k for grp in groups for k in range(per)]
        _select(m, "weight", 0, keep)
        _select(m, "bias", 0, keep)
        m.num_groups, m.num_channels = len(groups), len(keep)
    elif isinstance(m, OptionAShortcut):
        m.pad_front -= len(drop.get("pad_front", set()))
        m.pad_back -= len(drop.get("pad_back", set()))
    else:
        raise ChanpruneError(f"internal: no surgery rule for {type(m).__name__} ({name})")


def _producer_width(m: nn.Module, kind: str) -> int | None:
    if kind == "dw":
        return m.in_channels
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return m.out_channels // m.groups  # local output index, shared by every conv group
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    return None


def prune_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Physically remove the planned channels from `model`, in place."""
    modules = dict(model.named_modules())
    drops = removals(graph, plan)
    # Fix: a plan may keep channels in a group yet empty one of its layers (the option-A stage
    # chain: all 16 stage-1 classes are among the group's lowest scores); surgery then built a
    # 0-channel conv that crashed at the first forward. Refuse before touching the model.
    for name, drop in drops.items():
        for kind in ("out", "dw"):
            width = _producer_width(modules[name], kind) if drop.get(kind) else None
            if width is not None and len(drop[kind]) >= width:
                raise UserError(f"the plan removes all {width} output channels of {name}; keep at least one "
                                "(the allocator's per-layer floor, --min-keep, does this)")
    for name, drop in drops.items():
        _prune_module(name, modules[name], drop)


@torch.no_grad()
def mask_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Zero the planned channels in place: their producers' rows, norm entries and the consumers'
    input weights, so the masked model computes exactly what the pruned one does."""
    modules = dict(model.named_modules())
    for name, drop in removals(graph, plan).items():
        m = modules[name]
        weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and drop.get("dw"):
            mult = m.out_channels // m.in_channels
            rows = [j * mult + t for j in drop["dw"] for t in range(mult)]
        elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            opg = m.out_channels // m.groups
            rows = [grp * opg + k for grp in range(m.groups) for k in drop.get("out", set())]
        elif isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            if weight is not None and drop.get("out"):
                weight[:, sorted(drop["out"])] = 0
            rows = []
            if bias is not None and drop.get("out"):
                bias[sorted(drop["out"])] = 0
        elif isinstance(m, nn.Linear):
            rows = sorted(drop.get("out", set()))
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            rows = sorted(drop.get("norm", set()))
        elif isinstance(m, nn.GroupNorm):
            per = m.num_channels // m.num_groups
            rows = [grp * per + k for grp in drop.get("gnorm", set()) for k in range(per)]
        else:
            rows = []  # PReLU(0) == 0 and pads are already zero
        if rows:
            for t in (weight, bias):
                if t is not None:
                    t[sorted(rows)] = 0
        # Fix: also cut the consumers' inputs. Zeroing the producer is not enough when the removed
        # channel is not zero where it is consumed (sigmoid(0) = 0.5, an affine-free BatchNorm
        # gives -mean/std, a bias-only path): verify then failed on correct surgery.
        cols = sorted(drop.get("in", set()))
        if cols and weight is not None:
            if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                weight[cols] = 0  # transposed conv weight: (in, out / groups, *k)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                weight[:, cols] = 0  # local input index, the same in every conv group


def _flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_outputs(v)]
    return []


@torch.no_grad()
def verify(original: nn.Module, graph: ChannelGraph, plan: Plan, pruned: nn.Module,
           input_shape: Sequence[int], *, batch_size: int = 2, seed: int = 0,
           rtol: float = 1e-5) -> VerifyResult:
    """Compare `pruned` with `original` masked by `plan`, in float64 on random inputs (eval mode).

    Float64 makes the tolerance meaningful: a correct surgery differs only by rounding (~1e-12),
    while any structural mistake shows up at the scale of the activations.
    """
    reference = copy.deepcopy(original).double().eval()
    mask_model(reference, graph, plan)
    candidate = copy.deepcopy(pruned).double().eval()
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    x = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    ref_out = _flatten_outputs(reference(x))
    got_out = _flatten_outputs(candidate(x))
    if len(ref_out) != len(got_out) or any(a.shape != b.shape for a, b in zip(ref_out, got_out)):
        return VerifyResult(float("inf"), 0.0, False, len(ref_out))
    diff = max((float((a - b).abs().max()) for a, b in zip(ref_out, got_out) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in ref_out if a.numel()), default=0.0)
    tolerance = rtol * max(1.0, scale)
    return VerifyResult(diff, tolerance, diff <= tolerance, len(ref_out))
