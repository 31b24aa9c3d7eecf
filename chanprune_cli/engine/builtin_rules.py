"""The rules for torch.nn's layers and chanprune's own, registered in the layer-rule table.

Each class below is one entry's behaviour (see `layer_rules.LayerRule` for the contract); user
rules can subclass them (`ChannelwiseRule` for a per-channel layer, `ConvRule`, `LinearRule`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .layer_rules import (
    Drop,
    LayerRule,
    LayerShape,
    ModuleCall,
    ModuleCost,
    keep_indices,
    mark_builtins,
    register_layer_rule,
    scale_channels,
    select,
    zero_rows,
)


class PassThroughRule(LayerRule):
    """Acts on every element alike (activations, dropout, identity): ids pass straight through."""

    def trace(self, call: ModuleCall) -> bool:
        call.set_output(call.x)
        return True


class PerChannelSpatialRule(LayerRule):
    """Acts on each channel's spatial map on its own (pooling, padding, upsampling; channel axis 1)."""

    def trace(self, call: ModuleCall) -> bool:
        if call.x is None or call.shape is None:
            return False
        vec = call.channel_vector(call.x, 1)
        call.set_output(call.broadcast(vec, 1) if bool((vec >= 0).any()) else None)
        return True


class SoftmaxRule(LayerRule):
    """Mixes the elements along its `dim`: pins the channels when that is the channel axis."""

    def trace(self, call: ModuleCall) -> bool:
        m, x = call.module, call.x
        if x is None:
            return False
        dim = getattr(m, "dim", None)
        if (dim if dim is not None else -1) % x.dim() in call.varying_axes(x):
            call.pin_inputs(f"{type(m).__name__} {call.name} mixes channels")
            call.set_output(None)
        else:
            call.set_output(x)
        return True


class ReshapeModuleRule(LayerRule):
    """nn.Flatten / nn.Unflatten: replayed on the labels like the tensor methods."""

    def trace(self, call: ModuleCall) -> bool:
        m = call.module
        # Only nn.Unflatten carries literal sizes (nn.Flatten never splits an axis).
        call.structural(lambda *a, **k: m(*a, **k), isinstance(m, nn.Unflatten))
        return True


class LayerNormRule(LayerRule):
    """Normalises over its trailing axes: removing a channel there changes the statistics, so
    those channels are pinned, unless `TraceOptions.through_layernorm` makes a LayerNorm over one
    channel axis (normalized_shape (C,)) a per-channel member whose removals are approximate.

    `channels_first`: the layer normalises axis 1 of an NCHW tensor (ConvNeXt's LayerNorm2d,
    which permutes around `F.layer_norm` itself); else the trailing axes, as nn.LayerNorm does."""

    shape_attrs = ("normalized_shape",)
    gates_channels = True  # its bias re-creates a constant channel from a zero input

    def __init__(self, channels_first: bool = False) -> None:
        self.channels_first = channels_first

    def _axis(self, x: torch.Tensor) -> int:
        return 1 if self.channels_first else x.dim() - 1

    def trace(self, call: ModuleCall) -> bool:
        m, x = call.module, call.x
        if x is None:
            return False
        axis = self._axis(x)
        add_norm_cost(call, x, "norm", x.shape[axis])  # its "norm" slots exist only where it is followed
        normalized = [axis] if self.channels_first else range(x.dim() - len(m.normalized_shape), x.dim())
        varying = call.varying_axes(x)
        if not any(a in normalized for a in varying):
            call.set_output(x)
        elif call.options.through_layernorm and len(m.normalized_shape) == 1 and varying == [axis]:
            ids = link_per_channel(call, call.channel_vector(x, axis))
            call.approximate(ids, f"LayerNorm {call.name} normalises over these channels")
            call.set_output(x)
        else:
            call.pin_inputs(f"LayerNorm {call.name} normalises over channels (removing one changes its statistics)")
            call.set_output(None)
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        keep = keep_indices(module.normalized_shape[0], drop.get("norm", set()))
        select(module, "weight", 0, keep)
        select(module, "bias", 0, keep)
        module.normalized_shape = (len(keep),)

    def mask(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, sorted(drop.get("norm", set())))

    def output_axis(self, module: nn.Module) -> int:
        return 1 if self.channels_first else -1

    def output_width(self, module: nn.Module) -> int:
        return int(module.normalized_shape[-1])

    def describe(self, module: nn.Module) -> LayerShape | None:
        shape = module.normalized_shape  # channels are its first dim
        channels = int(shape[0]) if shape else None
        return LayerShape("norm", channels, channels)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"weight": tuple(module.normalized_shape), "bias": tuple(module.normalized_shape)}


def link_per_channel(call: ModuleCall, vec: torch.Tensor) -> list[int]:
    """One "norm" slot per channel id of `vec` (a per-channel entry of the layer), linked to it."""
    ids = [call.new_slot("norm", c) for c in range(len(vec))]
    for sid, i in zip(ids, vec.tolist()):
        call.link(sid, i)
    return ids


def norm_macs_per_element(module: nn.Module) -> int:
    """What fvcore counts per element of a norm layer's input in eval mode (so the allocator's MACs
    are the ones `measure.count_macs` reports): batch_norm on running statistics 1 (+1 affine);
    batch_norm on batch statistics, group, instance and layer norms 4 (+1 affine); 0 for the rest
    (frozen BatchNorms' x * scale + shift, RMS norms: ops fvcore does not count)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return (1 if module.track_running_stats else 4) + int(module.affine)
    if isinstance(module, (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return 4 + int(module.affine)
    if isinstance(module, nn.LayerNorm):
        return 4 + int(module.elementwise_affine)
    return 0


def add_norm_cost(call: ModuleCall, x: torch.Tensor, kind: str, slots: int) -> None:
    """Record a norm's MACs as `slots` equal shares of its input, one per slot of `kind` ("norm":
    a channel, "gnorm": a group), so removing a slot removes its share."""
    per_element = norm_macs_per_element(call.module)
    if per_element and slots:
        call.add_cost(ModuleCost(kind, x[0].numel() // slots * per_element, 1, slots, slots))


class ChannelwiseRule(LayerRule):
    """A layer with one entry per channel along axis 1 and no mixing between channels (a norm
    over each channel, a per-channel scale). Its entries are "norm" slots of the channel's class.

    `tensors`: the per-channel parameters/buffers (sliced, and zeroed by `mask` when listed in
    `masked`); `size_attr`: the attribute holding the channel count (None: the layer keeps none,
    the first tensor's length is the count)."""

    def __init__(self, size_attr: str | None, tensors: Sequence[str], masked: Sequence[str] = ("weight", "bias"),
                 gates_channels: bool = True) -> None:
        self.size_attr = size_attr
        self.tensors = tuple(tensors)
        self.masked = tuple(masked)
        self.gates_channels = gates_channels
        self.shape_attrs = (size_attr,) if size_attr else ()

    def width(self, module: nn.Module) -> int:
        if self.size_attr:
            return int(getattr(module, self.size_attr))
        return int(getattr(module, self.tensors[0]).shape[0])

    def trace(self, call: ModuleCall) -> bool:
        if call.x is None:
            call.set_output(None)
            return True
        vec = call.channel_vector(call.x, 1)
        link_per_channel(call, vec)
        add_norm_cost(call, call.x, "norm", len(vec))
        call.set_output(call.x)
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        keep = keep_indices(self.width(module), drop.get("norm", set()))
        for name in self.tensors:
            select(module, name, 0, keep)
        if self.size_attr:
            setattr(module, self.size_attr, len(keep))

    def mask(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, sorted(drop.get("norm", set())), self.masked)

    def output_width(self, module: nn.Module) -> int:
        return self.width(module)

    def describe(self, module: nn.Module) -> LayerShape | None:
        return LayerShape("norm", self.width(module), self.width(module)) if self.gates_channels else None

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        n = (self.width(module),)
        return {name: n for name in self.tensors}


class NormRule(ChannelwiseRule):
    """BatchNorm*, SyncBatchNorm, InstanceNorm* (and frozen BatchNorms, which keep no count):
    per-channel affine and running statistics."""

    def __init__(self, folds_producer: bool, size_attr: str | None = "num_features") -> None:
        super().__init__(size_attr, ("weight", "bias", "running_mean", "running_var"))
        self.folds_producer = folds_producer


class PReLURule(ChannelwiseRule):
    """PReLU: one slope per channel (or one shared slope: then it acts like an activation).
    PReLU(0) == 0, so a zeroed channel stays zero: no mask, no gate point."""

    def __init__(self) -> None:
        super().__init__("num_parameters", ("weight",), masked=(), gates_channels=False)

    def trace(self, call: ModuleCall) -> bool:
        if call.module.num_parameters > 1:
            return super().trace(call)
        call.set_output(call.x)
        return True

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"weight": (module.num_parameters,)}


def link_channel_groups(call: ModuleCall, x: torch.Tensor, groups: int, fixed_reason: str) -> None:
    """A norm over `groups` equal groups of channels: one "gnorm" slot per group, linked to each of
    its channels (a fixed channel pins its group with `fixed_reason`); the output passes `x` on."""
    vec = call.channel_vector(x, 1)
    per = vec.numel() // groups
    add_norm_cost(call, x, "gnorm", groups)
    for grp in range(groups):
        sid = call.new_slot("gnorm", grp)
        for i in vec[grp * per:(grp + 1) * per].tolist():
            if i >= 0:
                call.link(sid, i)
            else:
                call.pin([sid], fixed_reason)
    call.set_output(x)


class GroupNormRule(LayerRule):
    """GroupNorm: the channels of one group are normalised together, so they fall together."""

    shape_attrs = ("num_groups", "num_channels")
    gates_channels = True

    def trace(self, call: ModuleCall) -> bool:
        m, x = call.module, call.x
        if x is None:
            return False
        link_channel_groups(call, x, m.num_groups, f"GroupNorm {call.name} mixes fixed channels")
        return True

    @staticmethod
    def _channels(m: nn.Module, groups: Sequence[int]) -> list[int]:
        per = m.num_channels // m.num_groups
        return [grp * per + k for grp in groups for k in range(per)]

    def prune(self, module: nn.Module, drop: Drop) -> None:
        groups = keep_indices(module.num_groups, drop.get("gnorm", set()))
        keep = self._channels(module, groups)
        select(module, "weight", 0, keep)
        select(module, "bias", 0, keep)
        module.num_groups, module.num_channels = len(groups), len(keep)

    def mask(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, self._channels(module, sorted(drop.get("gnorm", set()))))

    def output_width(self, module: nn.Module) -> int:
        return int(module.num_channels)

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        return self._channels(module, [index])

    def describe(self, module: nn.Module) -> LayerShape | None:
        return LayerShape("norm", module.num_channels, module.num_channels, groups=module.num_groups)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"weight": (module.num_channels,), "bias": (module.num_channels,)}


def _dense_labels(call: ModuleCall, x: torch.Tensor, axis: int, outputs: int) -> None:
    """A layer that reads every input channel for every output (groups == 1): each input channel
    is an "in" slot, each output a fresh "out" slot."""
    for j, i in enumerate(call.channel_vector(x, axis).tolist()):
        call.link(call.new_slot("in", j), i)
    call.set_output(call.broadcast(call.new_slots("out", outputs), axis))


def _slice_dense(m: nn.Module, drop: Drop, ins: tuple[str, int], outs: tuple[str, int]) -> None:
    """Slice a groups == 1 layer: (count attribute, weight dim) of its inputs and its outputs."""
    (in_attr, in_dim), (out_attr, out_dim) = ins, outs
    keep_in = keep_indices(getattr(m, in_attr), drop.get("in", set()))
    keep_out = keep_indices(getattr(m, out_attr), drop.get("out", set()))
    select(m, "weight", in_dim, keep_in)
    select(m, "weight", out_dim, keep_out)
    select(m, "bias", 0, keep_out)
    setattr(m, in_attr, len(keep_in))
    setattr(m, out_attr, len(keep_out))


class _WeightedRule(LayerRule):
    """Shared by convs and linear layers: output-side operations on the weight's first axis."""

    def output_width(self, module: nn.Module) -> int:
        return int(module.out_channels)

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, self._producer_rows(module, drop))

    def _producer_rows(self, module: nn.Module, drop: Drop) -> list[int]:
        return sorted(drop.get("out", set()))

    def mask(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, self._producer_rows(module, drop))
        cols = sorted(drop.get("in", set()))
        weight = getattr(module, "weight", None)
        if cols and weight is not None:
            weight[:, cols] = 0  # local input index, the same in every conv group

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        return None if weight is None else weight.detach()[:, index].reshape(-1)


def link_depthwise(call: ModuleCall, vec: Sequence[int], mult: int, start: int = 0) -> list[int]:
    """A depthwise conv over input channels `vec`: one "dw" slot per channel (index `start` + j),
    linked to it (a fixed input pins it); returns the output ids, `mult` per input channel."""
    ids = []
    for j, i in enumerate(vec):
        sid = call.new_slot("dw", start + j)
        if i >= 0:
            call.link(sid, i)
        else:
            call.pin([sid], f"depthwise conv {call.name} reads a fixed input")
        ids.extend([sid] * mult)
    return ids


class ConvRule(_WeightedRule):
    """Conv1d/2d/3d, grouped and depthwise (channel multiplier out/in)."""

    shape_attrs = ("in_channels", "out_channels", "groups")

    def trace(self, call: ModuleCall) -> bool:
        m, x, shape = call.module, call.x, call.shape
        if x is None or shape is None:
            return False
        vec = call.channel_vector(x, 1)
        cin, cout, g = m.in_channels, m.out_channels, m.groups
        # per weight element: its multiply-adds over the output positions, plus what the layer
        # computes on the weight itself (weight standardisation)
        spatial = math.prod(m.kernel_size) * (math.prod(shape[2:]) + self.macs_per_weight(m))
        cpg, opg = cin // g, cout // g
        if g > 1 and g == cin:  # depthwise (channel multiplier cout // cin)
            mult = cout // cin
            out = torch.tensor(link_depthwise(call, vec.tolist(), mult), dtype=torch.long)
            call.add_cost(ModuleCost("depthwise", spatial * mult, g, cin, cin))
        elif call.name in call.options.whole_conv_groups:
            # conv group k reads inputs [k*cpg, (k+1)*cpg) only: they go with its outputs
            slots = call.new_slots("grp", g)
            for j, i in enumerate(vec.tolist()):
                call.link(int(slots[j // cpg]), i)
            out = slots.repeat_interleave(opg)
            call.add_cost(ModuleCost("groupwise", spatial, g, cpg, opg))
        else:
            for j, i in enumerate(vec.tolist()):
                call.link(call.new_slot("in", j % cpg), i)
            out = call.new_slots("out", opg).repeat(g)
            call.add_cost(ModuleCost("conv", spatial, g, cpg, opg))
        call.set_output(call.broadcast(out, 1))
        return True

    def macs_per_weight(self, module: nn.Module) -> int:
        """MACs fvcore counts per weight element for computing the weight used (0: used as it is)."""
        return 0

    def can_prune_whole_groups(self, module: nn.Module) -> bool:
        return 1 < module.groups < module.in_channels

    def prune(self, module: nn.Module, drop: Drop) -> None:
        m = module
        if drop.get("grp"):
            keep = keep_indices(m.groups, drop["grp"])
            opg, cpg = m.out_channels // m.groups, m.in_channels // m.groups
            keep_out = [grp * opg + k for grp in keep for k in range(opg)]
            select(m, "weight", 0, keep_out)  # dim 1 is the local input index, unchanged
            select(m, "bias", 0, keep_out)
            m.in_channels, m.out_channels, m.groups = len(keep) * cpg, len(keep_out), len(keep)
            return
        if drop.get("dw"):
            keep_in = keep_indices(m.in_channels, drop["dw"])
            mult = m.out_channels // m.in_channels
            keep_out = [j * mult + t for j in keep_in for t in range(mult)]
            select(m, "weight", 0, keep_out)
            select(m, "bias", 0, keep_out)
            m.in_channels, m.out_channels, m.groups = len(keep_in), len(keep_out), len(keep_in)
            return
        g = m.groups
        cpg, opg = m.in_channels // g, m.out_channels // g
        keep_in_local = keep_indices(cpg, drop.get("in", set()))
        keep_out_local = keep_indices(opg, drop.get("out", set()))
        keep_out = [grp * opg + k for grp in range(g) for k in keep_out_local]
        select(m, "weight", 0, keep_out)
        select(m, "weight", 1, keep_in_local)
        select(m, "bias", 0, keep_out)
        m.in_channels, m.out_channels = g * len(keep_in_local), g * len(keep_out_local)

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        if kind == "dw":
            return int(module.in_channels)
        if kind == "grp":
            return int(module.groups)
        return module.out_channels // module.groups  # local output index, shared by every conv group

    def _producer_rows(self, module: nn.Module, drop: Drop) -> list[int]:
        m = module
        if drop.get("dw"):
            mult = m.out_channels // m.in_channels
            return [j * mult + t for j in drop["dw"] for t in range(mult)]
        opg = m.out_channels // m.groups
        if drop.get("grp"):
            return [grp * opg + k for grp in sorted(drop["grp"]) for k in range(opg)]
        return [grp * opg + k for grp in range(m.groups) for k in drop.get("out", set())]

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        if kind == "dw":
            mult = module.out_channels // module.in_channels
            return list(range(index * mult, (index + 1) * mult))
        opg = module.out_channels // module.groups
        if kind == "grp":
            return list(range(index * opg, (index + 1) * opg))
        return [g * opg + index for g in range(module.groups)]

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        if weight is None:
            return None
        return weight.detach()[self.output_channels(module, kind, index)].reshape(-1)

    def describe(self, module: nn.Module) -> LayerShape | None:
        return LayerShape("conv", module.in_channels, module.out_channels, tuple(module.kernel_size),
                          tuple(module.stride), module.groups)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        k = tuple(module.kernel_size)
        return {"weight": (module.out_channels, module.in_channels // module.groups, *k), "bias": (module.out_channels,)}


class ConvTransposeRule(ConvRule):
    """ConvTranspose1d/2d/3d with groups == 1 (weight [in, out, *k]); grouped ones are pinned."""

    def trace(self, call: ModuleCall) -> bool:
        m, x, shape = call.module, call.x, call.shape
        if m.groups != 1 or x is None or shape is None:
            return False
        _dense_labels(call, x, 1, m.out_channels)
        call.add_cost(ModuleCost("conv", math.prod(m.kernel_size) * math.prod(shape[2:]), 1, m.in_channels, m.out_channels))
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        _slice_dense(module, drop, ("in_channels", 0), ("out_channels", 1))

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        return int(module.out_channels)

    def _zero_outputs(self, module: nn.Module, drop: Drop) -> None:
        cols = sorted(drop.get("out", set()))
        if cols:
            module.weight[:, cols] = 0  # output channels are the weight's second axis
            if module.bias is not None:
                module.bias[cols] = 0

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        self._zero_outputs(module, drop)

    def mask(self, module: nn.Module, drop: Drop) -> None:
        if module.weight is not None:
            self._zero_outputs(module, drop)
            cols = sorted(drop.get("in", set()))
            if cols:
                module.weight[cols] = 0

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        return None if weight is None else weight.detach()[:, index].reshape(-1)

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        return None if weight is None else weight.detach()[index].reshape(-1)

    def weight_rows(self, module: nn.Module, weight_like: torch.Tensor, channels: list[int]) -> torch.Tensor:
        # weight [in, out/g, *k]; output o = g * opg + k reads the inputs of group g
        ipg, opg = module.in_channels // module.groups, module.out_channels // module.groups
        return torch.stack([weight_like[(r // opg) * ipg:(r // opg + 1) * ipg, r % opg] for r in channels])

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        if module.groups != 1 or module.weight is None:
            return  # grouped transposed convs: the bias alone would be inconsistent, leave as is
        scale_channels(module.weight, 1, channels, factors)  # output channels are the weight's second axis
        scale_channels(module.bias, 0, channels, factors)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        k = tuple(module.kernel_size)
        return {"weight": (module.in_channels, module.out_channels // module.groups, *k), "bias": (module.out_channels,)}


class LinearRule(_WeightedRule):
    """nn.Linear over the last axis (tokens, if any, are the axes before it)."""

    shape_attrs = ("in_features", "out_features")

    def trace(self, call: ModuleCall) -> bool:
        m, x, shape = call.module, call.x, call.shape
        if x is None or shape is None:
            return False
        _dense_labels(call, x, -1, m.out_features)
        call.add_cost(ModuleCost("linear", math.prod(shape[1:-1]) if len(shape) > 2 else 1, 1, m.in_features, m.out_features))
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        _slice_dense(module, drop, ("in_features", 1), ("out_features", 0))

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        return int(module.out_features)

    def output_axis(self, module: nn.Module) -> int:
        return -1

    def output_width(self, module: nn.Module) -> int:
        return int(module.out_features)

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        weight = getattr(module, "weight", None)
        return None if weight is None else weight.detach()[index].reshape(-1)

    def describe(self, module: nn.Module) -> LayerShape | None:
        return LayerShape("linear", module.in_features, module.out_features)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {"weight": (module.out_features, module.in_features), "bias": (module.out_features,)}


class OptionAShortcutRule(LayerRule):
    """The CIFAR ResNet option-A shortcut: its zero-padded channels are slots of their own, so
    the channels they meet in the residual add can be removed together with a pad position."""

    shape_attrs = ("pad_front", "pad_back")

    def trace(self, call: ModuleCall) -> bool:
        m, x = call.module, call.x
        if x is None:
            return False
        vec = call.channel_vector(x, 1)
        front = call.new_slots("pad_front", m.pad_front)
        back = call.new_slots("pad_back", m.pad_back)
        if call.shape is not None:
            call.set_output(call.broadcast(torch.cat([front, vec, back]), 1))
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        module.pad_front -= len(drop.get("pad_front", set()))
        module.pad_back -= len(drop.get("pad_back", set()))


def register_builtins() -> None:
    from torchvision.models.convnext import LayerNorm2d
    from torchvision.ops import FrozenBatchNorm2d

    from ..models import OptionAShortcut


    conv, norm = ConvRule(), NormRule(folds_producer=False)
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        register_layer_rule(t, conv, leaf=False)
    for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
        register_layer_rule(t, ConvTransposeRule(), leaf=False)
    batchnorm = NormRule(folds_producer=True)
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        register_layer_rule(t, batchnorm, leaf=False)
    for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
        register_layer_rule(t, norm, leaf=False)
    register_layer_rule(nn.Linear, LinearRule(), leaf=False)
    register_layer_rule(nn.GroupNorm, GroupNormRule(), leaf=False)
    register_layer_rule(nn.LayerNorm, LayerNormRule(), leaf=False)
    register_layer_rule(nn.PReLU, PReLURule(), leaf=False)
    passthrough = PassThroughRule()
    for t in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
              nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
              nn.Tanhshrink, nn.LogSigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
              nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        register_layer_rule(t, passthrough, leaf=False)
    spatial = PerChannelSpatialRule()
    for t in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
              nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
              nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
              nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d,
              nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d):
        register_layer_rule(t, spatial, leaf=False)
    softmax = SoftmaxRule()
    for t in (nn.Softmax, nn.LogSoftmax, nn.Softmin):
        register_layer_rule(t, softmax, leaf=False)
    reshape = ReshapeModuleRule()
    for t in (nn.Flatten, nn.Unflatten):
        register_layer_rule(t, reshape, leaf=False)
    # torchvision's detection backbones freeze their BatchNorms as x * scale + shift from buffers:
    # traced through, those buffers look like fixed per-channel tensors and pin every channel.
    register_layer_rule(FrozenBatchNorm2d, NormRule(folds_producer=True, size_attr=None))
    register_layer_rule(LayerNorm2d, LayerNormRule(channels_first=True))  # ConvNeXt: channels-first LayerNorm
    register_layer_rule(OptionAShortcut, OptionAShortcutRule())
    mark_builtins()


register_builtins()
