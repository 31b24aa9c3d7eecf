"""Rules for timm's layers (registered when timm is imported; see `layer_rules._LIBRARY_RULES`).

timm writes many layers as one module whose `forward` calls a functional op with its own
parameters (`F.batch_norm`, `F.group_norm`, `F.linear`, a blur filter in `F.conv2d`). Traced
through, those parameters look like fixed per-channel tensors and pin every channel they touch;
as leaves with a rule they are followed exactly:

- norm + activation (BatchNormAct2d and kin, GroupNormAct, EvoNorm B*/S*, FilterResponseNorm*):
  the norm acts per channel (or per channel group) and the activation on each element;
- convs and pools with TF "same" padding, timm's `Linear`, its activation modules, drop-path and
  drop-block (elementwise), BlurPool2d (one filter per channel);
- weight-standardised convs (StdConv2d, ScaledStdConv2d): each filter is standardised over its own
  input channels and kernel, so output channels are independent but input channels are pinned.

LayerNorm, RmsNorm and SimpleNorm (channels-last or channels-first) follow nn.LayerNorm's rule:
pinned where they normalise over channels, unless the trace opts in to approximate removals.
Layers that mix the channels of one position are pinned with their reason: GroupNorm with one
group, ECA (a 1-D conv that slides along the channel axis). GlobalResponseNorm divides by the
mean over channels, which a rescale of its weight and eps keeps exact (its rule says how).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import UserError
from .builtin_rules import (
    ChannelwiseRule,
    ConvRule,
    GroupNormRule,
    LayerNormRule,
    LinearRule,
    NormRule,
    PassThroughRule,
    PerChannelSpatialRule,
    PReLURule,
    add_norm_cost,
    link_channel_groups,
    link_depthwise,
    link_per_channel,
)
from .layer_rules import (
    Drop,
    LayerRule,
    LayerShape,
    ModuleCall,
    ModuleCost,
    keep_indices,
    register_layer_rule,
    rule_for,
    scale_channels,
    select,
    zero_rows,
)

# Activations for which act(a * x) == a * act(x) when a >= 0: a scale of the norm's affine
# parameters is then a scale of the module's output.
_HOMOGENEOUS = (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Dropout)


def _check_scalable(module: nn.Module, factors: torch.Tensor) -> None:
    """A norm + activation module's outputs scale with its affine parameters only through a
    positively homogeneous activation."""
    act, dropout = getattr(module, "act", nn.Identity()), getattr(module, "drop", nn.Identity())
    if not (isinstance(act, _HOMOGENEOUS) and isinstance(dropout, _HOMOGENEOUS) and bool((factors >= 0).all())):
        raise UserError(f"cannot rescale the outputs of {type(module).__name__} with {type(act).__name__}: "
                        "its activation follows the norm, so no change of the norm's parameters scales them")


class NormActRule(NormRule):
    """BatchNorm + activation in one module: the norm's rule; the activation acts per element."""

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        _check_scalable(module, factors)
        super().scale_outputs(module, channels, factors)


class ChannelGroupsRule(LayerRule):
    """A norm whose statistics run over groups of channels (GroupNorm-like, EvoNorm S*): the
    channels of one group fall together ("gnorm" slots). `groups_attr` holds the group count; the
    channel count is the length of `tensors[0]`. One group normalises over every channel: pinned."""

    gates_channels = True

    def __init__(self, groups_attr: str, tensors: Sequence[str]) -> None:
        self.groups_attr = groups_attr
        self.tensors = tuple(tensors)
        self.shape_attrs = (groups_attr,)

    def _width(self, module: nn.Module) -> int:
        return int(getattr(module, self.tensors[0]).shape[0])

    def _channels(self, module: nn.Module, groups: Sequence[int]) -> list[int]:
        per = self._width(module) // getattr(module, self.groups_attr)
        return [grp * per + k for grp in groups for k in range(per)]

    def trace(self, call: ModuleCall) -> bool:
        m, x = call.module, call.x
        if x is None:
            return False
        groups = getattr(m, self.groups_attr)
        if groups == 1:
            call.pin_inputs(f"{type(m).__name__} {call.name} normalises over all channels (one group)")
            call.set_output(x)
            return True
        link_channel_groups(call, x, groups, f"{type(m).__name__} {call.name} normalises fixed channels with others")
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        groups = keep_indices(getattr(module, self.groups_attr), drop.get("gnorm", set()))
        keep = self._channels(module, groups)
        for name in self.tensors:
            select(module, name, 0, keep)
        setattr(module, self.groups_attr, len(groups))

    def mask(self, module: nn.Module, drop: Drop) -> None:
        zero_rows(module, self._channels(module, sorted(drop.get("gnorm", set()))), ("weight", "bias"))

    def output_width(self, module: nn.Module) -> int:
        return self._width(module)

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        return self._channels(module, [index])

    def describe(self, module: nn.Module) -> LayerShape | None:
        width = self._width(module)
        return LayerShape("norm", width, width, groups=getattr(module, self.groups_attr))

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: (self._width(module),) for name in self.tensors}


class GroupNormActRule(GroupNormRule):
    """timm's GroupNorm subclasses (with or without an activation): GroupNorm's rule, but one group
    normalises over every channel, so its channels are pinned with that reason."""

    def trace(self, call: ModuleCall) -> bool:
        if call.module.num_groups == 1 and call.x is not None:
            add_norm_cost(call, call.x, "gnorm", 1)
            call.pin_inputs(f"{type(call.module).__name__} {call.name} normalises over all channels (one group)")
            call.set_output(call.x)
            return True
        return super().trace(call)

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        _check_scalable(module, factors)
        super().scale_outputs(module, channels, factors)


class ChannelMixingRule(LayerRule):
    """A layer whose output at one channel depends on the other channels at the same position
    (`why` says how): pins the channels when its channel axis carries them, else passes them."""

    def __init__(self, why: str, axis: int | str = 1) -> None:
        self.why = why
        self.axis = axis  # an axis, or the name of the module attribute holding it

    def trace(self, call: ModuleCall) -> bool:
        x = call.x
        if x is None:
            return False
        axis = self.axis if isinstance(self.axis, int) else int(getattr(call.module, self.axis))
        if axis % x.dim() in call.varying_axes(x):
            call.pin_inputs(f"{type(call.module).__name__} {call.name} {self.why}")
        call.set_output(x)
        return True


class GlobalResponseNormRule(ChannelwiseRule):
    """GlobalResponseNorm (ConvNeXt-V2): y = x + bias + weight * x * |x| / (mean over channels of
    |x| + eps), |x| a channel's L2 norm over positions. A removed channel is zero at its input, so
    it adds nothing to the mean's sum, only to its count: the pruned layer divides by the mean over
    C' instead of C channels. Multiplying weight and eps by C / C' undoes that exactly."""

    def __init__(self) -> None:
        super().__init__(None, ("weight", "bias"))
        self.shape_attrs = ("eps",)  # scaled with the weight (a float, restored on reload)

    def trace(self, call: ModuleCall) -> bool:
        if call.x is None:
            call.set_output(None)
            return True
        link_per_channel(call, call.channel_vector(call.x, int(call.module.channel_dim)))
        call.set_output(call.x)
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        before = self.width(module)
        super().prune(module, drop)
        factor = before / self.width(module)
        module.weight.data *= factor
        module.eps = module.eps * factor

    def output_axis(self, module: nn.Module) -> int:
        return int(module.channel_dim)


class StdConvRule(ConvRule):
    """Weight-standardised convs: every filter is standardised over its own inputs and kernel
    (ScaledStdConv2d then multiplies it by a per-filter `gain`). Output channels are independent;
    removing an input channel changes the mean and variance of every filter that reads it, which
    no slicing can undo, so the inputs of a non-depthwise one are pinned. A depthwise filter reads
    one channel, which goes with it."""

    def trace(self, call: ModuleCall) -> bool:
        if not super().trace(call):
            return False
        m = call.module
        if not (m.groups > 1 and m.groups == m.in_channels):
            call.pin_inputs(f"{type(m).__name__} {call.name} standardises each filter over its input channels "
                            "(removing one changes every filter)")
        return True

    def macs_per_weight(self, module: nn.Module) -> int:
        # the standardisation is a training-mode batch_norm over the weight: 4 per element, 5 with a gain
        return 5 if getattr(module, "gain", None) is not None else 4

    def prune(self, module: nn.Module, drop: Drop) -> None:
        keep = keep_indices(module.out_channels, set(self._producer_rows(module, drop)))
        super().prune(module, drop)
        select(module, "gain", 0, keep)

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        gain = getattr(module, "gain", None)
        if gain is None or bool((factors < 0).any()):
            # the standardisation undoes any scale of the weight rows
            raise UserError(f"cannot rescale the outputs of {type(module).__name__}: it standardises its filters")
        scale_channels(gain, 0, channels, factors)
        scale_channels(module.bias, 0, channels, factors)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        shapes = super().expected_shapes(module)
        if getattr(module, "gain", None) is not None:
            shapes["gain"] = (module.out_channels, 1, 1, 1)
        return shapes


class BlurPoolRule(ChannelwiseRule):
    """BlurPool2d: one fixed binomial filter per channel (a depthwise conv with no weights to learn)."""

    def __init__(self) -> None:
        super().__init__("channels", ("filt",), masked=(), gates_channels=False)

    def trace(self, call: ModuleCall) -> bool:
        if call.module.channels is None:  # one shared filter, expanded to the input's channels
            return PerChannelSpatialRule().trace(call)
        if call.x is None or call.shape is None:
            return False
        vec = call.channel_vector(call.x, 1)
        link_per_channel(call, vec)
        call.set_output(call.broadcast(vec, 1))
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        super().prune(module, drop)
        # `filt` is not saved with the model: a pruned one must be, since a model built from the
        # architecture has the full-width filter (and apply_shape_attrs resizes it from the file).
        module.register_buffer("filt", module.filt, persistent=True)

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        if module.channels is None:
            return {}
        return {"filt": (module.channels, 1, module.filt_size, module.filt_size)}


_CONV = ConvRule()


class MixedConvRule(LayerRule):
    """MixedConv2d (MixNet): the input is split into pieces (`splits`), each convolved by its own
    child conv (depthwise, or dense from its piece to its share of the outputs) with its own kernel
    size, and the outputs concatenated. Channels are followed piece by piece; surgery slices the
    children and updates `splits`. The first channel of every piece is kept, so no child is emptied.
    Its MACs are recorded as one layer's, averaged over the kernel sizes (an estimate)."""

    shape_attrs = ("in_channels", "out_channels", "splits")

    @staticmethod
    def _convs(module: nn.Module) -> list[nn.Module]:
        return list(module.values())

    def _depthwise(self, module: nn.Module) -> bool:
        convs = self._convs(module)
        return all(c.groups == c.in_channels for c in convs) and any(c.groups > 1 for c in convs)

    def _pieces(self, module: nn.Module) -> list[tuple[nn.Module, int, int]]:
        """(child conv, first input channel, first output channel) of every piece."""
        pieces, start, out_start = [], 0, 0
        for conv in self._convs(module):
            pieces.append((conv, start, out_start))
            start, out_start = start + conv.in_channels, out_start + conv.out_channels
        return pieces

    def _local(self, module: nn.Module, drop: Drop) -> list[tuple[nn.Module, dict[str, set[int]]]]:
        """Each child conv with the part of `drop` that falls on it, in its own indices."""
        out = []
        for conv, start, out_start in self._pieces(module):
            local = {"dw": {i - start for i in drop.get("dw", ()) if start <= i < start + conv.in_channels},
                     "in": {i - start for i in drop.get("in", ()) if start <= i < start + conv.in_channels},
                     "out": {i - out_start for i in drop.get("out", ()) if out_start <= i < out_start + conv.out_channels}}
            out.append((conv, {k: v for k, v in local.items() if v}))
        return out

    def _locate(self, module: nn.Module, kind: str, index: int) -> tuple[nn.Module, int, int]:
        """(child conv, local index, first output channel of the piece) of slot (kind, index)."""
        for conv, start, out_start in self._pieces(module):
            if kind == "out" and out_start <= index < out_start + conv.out_channels:
                return conv, index - out_start, out_start
            if kind != "out" and start <= index < start + conv.in_channels:
                return conv, index - start, out_start
        raise IndexError(f"{kind} {index} is not a channel of this MixedConv2d")

    def trace(self, call: ModuleCall) -> bool:
        m, x, shape = call.module, call.x, call.shape
        if x is None or shape is None or len(self._convs(m)) != len(m.splits):
            return False
        vec = call.channel_vector(x, 1).tolist()
        depthwise, spatial = self._depthwise(m), math.prod(shape[2:])
        keep = f"MixedConv2d {call.name} keeps a channel for every kernel size"
        out_ids: list[int] = []
        macs = 0
        for conv, start, out_start in self._pieces(m):
            macs += conv.in_channels // conv.groups * conv.out_channels * math.prod(conv.kernel_size) * spatial
            if depthwise:
                out_ids += link_depthwise(call, vec[start:start + conv.in_channels], conv.out_channels // conv.in_channels, start)
                call.pin([call.new_slot("dw", start)], keep)
                continue
            for j in range(conv.in_channels):
                call.link(call.new_slot("in", start + j), vec[start + j])
            outs = [call.new_slot("out", out_start + k) for k in range(conv.out_channels)]
            out_ids.extend(outs)
            call.pin([call.new_slot("in", start), outs[0]], keep)
        if depthwise:
            call.add_cost(ModuleCost("depthwise", max(1, round(macs / m.in_channels)), m.in_channels, m.in_channels, m.in_channels))
        else:
            call.add_cost(ModuleCost("conv", max(1, round(macs / (m.in_channels * m.out_channels))), 1, m.in_channels, m.out_channels))
        call.set_output(call.broadcast(torch.tensor(out_ids, dtype=torch.long), 1))
        return True

    def prune(self, module: nn.Module, drop: Drop) -> None:
        for conv, local in self._local(module, drop):
            if local:
                _CONV.prune(conv, local)
        module.splits = tuple(c.in_channels for c in self._convs(module))
        module.in_channels = sum(module.splits)
        module.out_channels = sum(c.out_channels for c in self._convs(module))

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        return int(module.in_channels if kind == "dw" else module.out_channels)

    def mask(self, module: nn.Module, drop: Drop) -> None:
        for conv, local in self._local(module, drop):
            _CONV.mask(conv, local)

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        for conv, local in self._local(module, drop):
            _CONV.zero_producers(conv, local)

    def output_width(self, module: nn.Module) -> int:
        return int(module.out_channels)

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        conv, local, out_start = self._locate(module, kind, index)
        return [out_start + c for c in _CONV.output_channels(conv, kind, local)]

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        conv, local, _ = self._locate(module, kind, index)
        return _CONV.producer_rows(conv, kind, local)

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        conv, local, _ = self._locate(module, "in", index)
        return _CONV.consumer_columns(conv, local)

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        for conv, _, out_start in self._pieces(module):
            inside = (channels >= out_start) & (channels < out_start + conv.out_channels)
            if bool(inside.any()):
                _CONV.scale_outputs(conv, channels[inside] - out_start, factors[inside])

    def describe(self, module: nn.Module) -> LayerShape | None:
        first = self._convs(module)[0]
        groups = module.in_channels if self._depthwise(module) else 1
        return LayerShape("conv", module.in_channels, module.out_channels, tuple(first.kernel_size), tuple(first.stride), groups)


class SelectiveKernelRule(LayerRule):
    """SelectiveKernel (SKNet): the input (split into `num_paths` equal pieces when `split_input`)
    goes through one conv + norm + activation per path; an attention over the paths' sum weighs
    them per channel (softmax over paths) and the weighted paths are summed. Output slot k is
    output k of every path (in every conv group, as for a grouped conv), its norm entries,
    attention input k and the attention's outputs for k in every path; input slot j is input j of
    every piece and conv group (the pieces stay equal, as the split size `in_channels //
    num_paths` requires). Paths with anti-aliasing are not followed."""

    shape_attrs = ("in_channels", "out_channels")

    @staticmethod
    def _supported(m: nn.Module) -> bool:
        return all(isinstance(p.conv, nn.Conv2d) and getattr(p, "aa", None) is None
                   and isinstance(p.bn, nn.modules.batchnorm._BatchNorm) for p in m.paths)

    @staticmethod
    def _pieces(m: nn.Module) -> int:
        return m.num_paths if m.split_input else 1

    @staticmethod
    def _channels(m: nn.Module, local: set[int]) -> set[int]:
        """The output channels of local output indices (one per conv group of the paths)."""
        conv = m.paths[0].conv
        opg = conv.out_channels // conv.groups
        return {grp * opg + k for grp in range(conv.groups) for k in local}

    def trace(self, call: ModuleCall) -> bool:
        m, x, shape = call.module, call.x, call.shape
        if x is None or shape is None or not self._supported(m):
            return False
        conv = m.paths[0].conv
        vec = call.channel_vector(x, 1).tolist()
        cpg, opg = conv.in_channels // conv.groups, conv.out_channels // conv.groups
        for j in range(len(vec)):
            call.link(call.new_slot("in", j % cpg), vec[j])  # channel j of each piece and conv group
        macs = sum(p.conv.in_channels // p.conv.groups * p.conv.out_channels * math.prod(p.conv.kernel_size)
                   for p in m.paths) * math.prod(shape[2:])
        call.add_cost(ModuleCost("conv", max(1, round(macs / (conv.groups * cpg * opg))), conv.groups, cpg, opg))
        call.set_output(call.broadcast(call.new_slots("out", opg).repeat(conv.groups), 1))
        return True

    def _parts(self, m: nn.Module, drop: Drop) -> list[tuple[nn.Module, dict[str, set[int]]]]:
        """Every child layer with the slots it loses (in its own indices)."""
        ins, outs = drop.get("in", set()), drop.get("out", set())
        channels = self._channels(m, outs)
        parts: list[tuple[nn.Module, dict[str, set[int]]]] = []
        for path in m.paths:
            parts += [(path.conv, {"in": ins, "out": outs}), (path.bn, {"norm": channels})]
        rows = {p * m.out_channels + c for p in range(m.num_paths) for c in channels}
        parts += [(m.attn.fc_reduce, {"in": channels}), (m.attn.fc_select, {"out": rows})]
        return [(layer, {k: v for k, v in d.items() if v}) for layer, d in parts]

    @staticmethod
    def _child_rule(layer: nn.Module) -> LayerRule:
        rule = rule_for(layer)
        assert rule is not None, type(layer).__name__  # convs and BatchNorms (checked by `_supported`)
        return rule

    def prune(self, module: nn.Module, drop: Drop) -> None:
        for layer, local in self._parts(module, drop):
            if local:
                self._child_rule(layer).prune(layer, local)
        module.in_channels = self._pieces(module) * module.paths[0].conv.in_channels
        module.out_channels = module.paths[0].conv.out_channels

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        return _CONV.producer_width(module.paths[0].conv, kind)

    def mask(self, module: nn.Module, drop: Drop) -> None:
        for layer, local in self._parts(module, drop):
            self._child_rule(layer).mask(layer, local)

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        for path in module.paths:
            _CONV.zero_producers(path.conv, drop)

    def output_width(self, module: nn.Module) -> int:
        return int(module.out_channels)

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        return sorted(self._channels(module, {index}))

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        rows = self.output_channels(module, kind, index)
        return torch.cat([path.conv.weight.detach()[rows].reshape(-1) for path in module.paths])

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        return torch.cat([path.conv.weight.detach()[:, index].reshape(-1) for path in module.paths])

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        raise UserError("cannot rescale the outputs of SelectiveKernel: its attention reads them")

    def describe(self, module: nn.Module) -> LayerShape | None:
        conv = module.paths[0].conv
        return LayerShape("conv", module.in_channels, module.out_channels, tuple(conv.kernel_size),
                          tuple(conv.stride), conv.groups)


class CondConvRule(ConvRule):
    """CondConv2d: a conv whose filters are a per-sample mix of `num_experts` expert filters, mixed
    by routing weights given as its second input. Channels are those of a conv in every expert:
    its weight [experts, out * in/groups * k] is sliced as [experts, out, in/groups, *k]. The
    routing weights (one per expert) are kept."""

    shape_attrs = (*ConvRule.shape_attrs, "weight_shape", "bias_shape")

    def trace(self, call: ModuleCall) -> bool:
        if not super().trace(call):
            return False
        call.pin_other_inputs(f"{type(call.module).__name__} {call.name} mixes its experts by these weights")
        return True

    def can_prune_whole_groups(self, module: nn.Module) -> bool:
        return False

    @staticmethod
    def _experts(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
        """A weight-like tensor as [experts, out, in/groups, *k]."""
        return t.view(module.num_experts, module.out_channels, module.in_channels // module.groups,
                      *module.kernel_size)

    def prune(self, module: nn.Module, drop: Drop) -> None:
        m = module
        keep_out = keep_indices(m.out_channels, set(self._producer_rows(m, drop)))
        keep_in = keep_indices(m.in_channels // m.groups, drop.get("in", set()))
        weight = self._experts(m, m.weight.detach())[:, keep_out][:, :, keep_in]
        bias = None if m.bias is None else m.bias.detach()[:, keep_out]
        if drop.get("dw"):
            m.in_channels, m.groups = m.in_channels - len(drop["dw"]), m.groups - len(drop["dw"])
        else:
            m.in_channels = m.groups * len(keep_in)
        m.out_channels = len(keep_out)
        m.weight_shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
        m.bias_shape = (m.out_channels,)
        m.weight = nn.Parameter(weight.reshape(m.num_experts, -1).contiguous(), requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias.contiguous(), requires_grad=m.bias.requires_grad)

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        rows = self._producer_rows(module, drop)
        if rows:
            self._experts(module, module.weight.data)[:, rows] = 0
            if module.bias is not None:
                module.bias.data[:, rows] = 0

    def mask(self, module: nn.Module, drop: Drop) -> None:
        self.zero_producers(module, drop)
        cols = sorted(drop.get("in", set()))
        if cols:
            self._experts(module, module.weight.data)[:, :, cols] = 0

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        rows = self.output_channels(module, kind, index)
        return self._experts(module, module.weight.detach())[:, rows].reshape(-1)

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        return self._experts(module, module.weight.detach())[:, :, index].reshape(-1)

    def weight_rows(self, module: nn.Module, weight_like: torch.Tensor, channels: list[int]) -> torch.Tensor:
        return self._experts(module, weight_like)[:, channels].transpose(0, 1)

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        scale_channels(self._experts(module, module.weight.data), 1, channels, factors)
        scale_channels(module.bias, 1, channels, factors)  # [experts, out]

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        m = module
        return {"weight": (m.num_experts, m.out_channels * (m.in_channels // m.groups) * math.prod(m.kernel_size)),
                "bias": (m.num_experts, m.out_channels)}


def _classes(names: str) -> list[type[nn.Module]]:
    """timm's layer classes named `module.Class` (under timm.layers); those an older timm lacks are
    skipped."""
    found = []
    for dotted in names.split():
        module_name, _, cls_name = dotted.rpartition(".")
        try:
            cls = getattr(importlib.import_module(f"timm.layers.{module_name}"), cls_name, None)
        except ImportError:
            cls = None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            found.append(cls)
    return found


def _register(names: str, rule: LayerRule) -> None:
    for cls in _classes(names):
        register_layer_rule(cls, rule)


def register_timm_rules() -> None:
    _register("norm_act.BatchNormAct2d norm_act.SyncBatchNormAct", NormActRule(folds_producer=True))
    _register("norm_act.FrozenBatchNormAct2d", NormActRule(folds_producer=True, size_attr=None))
    _register("norm_act.GroupNormAct norm_act.GroupNorm1Act norm.GroupNorm norm.GroupNorm1", GroupNormActRule())
    # Norms over the channels of one position: the statistics change when a channel goes.
    _register("norm.LayerNorm norm.LayerNormFp32 norm.RmsNorm norm.RmsNormFp32 norm.SimpleNorm norm.SimpleNormFp32 "
              "norm_act.LayerNormAct norm_act.LayerNormActFp32 norm_act.RmsNormAct norm_act.RmsNormActFp32",
              LayerNormRule())
    _register("norm.LayerNorm2d norm.LayerNorm2dFp32 norm.LayerNormExp2d norm.RmsNorm2d norm.RmsNorm2dFp32 "
              "norm.SimpleNorm2d norm.SimpleNorm2dFp32 norm_act.LayerNormAct2d norm_act.LayerNormAct2dFp32 "
              "norm_act.RmsNormAct2d norm_act.RmsNormAct2dFp32", LayerNormRule(channels_first=True))
    _register("grn.GlobalResponseNorm", GlobalResponseNormRule())
    _register("eca.EcaModule eca.CecaModule",
              ChannelMixingRule("gates each channel by a 1-D conv sliding along the channels (removing one shifts its neighbours)"))
    _register("evo_norm.EvoNorm2dB0 evo_norm.EvoNorm2dB1 evo_norm.EvoNorm2dB2",
              ChannelwiseRule(None, ("weight", "bias", "v", "running_var")))
    _register("evo_norm.EvoNorm2dS0 evo_norm.EvoNorm2dS0a evo_norm.EvoNorm2dS1 evo_norm.EvoNorm2dS1a "
              "evo_norm.EvoNorm2dS2 evo_norm.EvoNorm2dS2a", ChannelGroupsRule("groups", ("weight", "bias", "v")))
    # max(x, tau): a masked channel must give max(0, 0) = 0, so tau is zeroed with the affine terms
    _register("filter_response_norm.FilterResponseNormTlu2d",
              ChannelwiseRule(None, ("weight", "bias", "tau"), masked=("weight", "bias", "tau")))
    _register("filter_response_norm.FilterResponseNormAct2d", ChannelwiseRule(None, ("weight", "bias")))
    _register("std_conv.StdConv2d std_conv.StdConv2dSame std_conv.ScaledStdConv2d std_conv.ScaledStdConv2dSame",
              StdConvRule())
    # "same" padding computes its pad from the input size with math.ceil, which torch.fx cannot trace
    _register("conv2d_same.Conv2dSame conv2d_same.Conv2dSameExport", ConvRule())
    _register("pool2d_same.AvgPool2dSame pool2d_same.MaxPool2dSame", PerChannelSpatialRule())
    _register("blur_pool.BlurPool2d", BlurPoolRule())
    _register("mixed_conv2d.MixedConv2d", MixedConvRule())
    _register("cond_conv2d.CondConv2d", CondConvRule())
    _register("selective_kernel.SelectiveKernel", SelectiveKernelRule())
    _register("linear.Linear", LinearRule())  # its forward calls F.linear
    _register("activations.PReLU", PReLURule())
    _register("activations.Swish activations.Mish activations.Sigmoid activations.Tanh activations.HardSwish "
              "activations.HardSigmoid activations.HardMish activations.GELU activations.GELUTanh "
              "activations.QuickGELU activations_me.SwishMe activations_me.MishMe activations_me.HardSigmoidMe "
              "activations_me.HardSwishMe activations_me.HardMishMe drop.DropPath drop.DropBlock2d",
              PassThroughRule())


register_timm_rules()
