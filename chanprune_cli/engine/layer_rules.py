"""The layer-rule table: everything chanprune knows about a module type, in one place.

A `LayerRule` says, for one module type, how it
- carries channel ids through the traced graph (`trace`, with the MACs a channel costs),
- removes channels (`prune`), zeroes them (`mask`, `zero_producers`), rescales them (`scale_outputs`),
- exposes the weight rows that produce a channel and the columns that read one (criteria),
- lays out its output (`output_channels`, `output_axis`, `output_width`: where criteria gate), and
- describes itself (`describe`, `shape_attrs`, `expected_shapes`: reports and checkpoints).

The rules for torch.nn's layers and the option-A shortcut are in `builtin_rules`. The graph
engine, surgery, hook points, criteria, training schedules, reports and checkpoints ask the table
instead of naming module types (only the sensitivity criterion's Hessian estimates, which are the
math of convolution itself, name them). `register_layer_rule(MyLayer, rule)` adds a type (or
replaces a built-in rule); the rule of a module is the one registered for the nearest class in its MRO, so
`nn.LazyConv2d` uses the `nn.Conv2d` rule. Modules the tracer enters instead of treating as leaves
(user subclasses of torch.nn layers with their own `forward`) are traced through as before.

Slot kinds a rule creates (see docs/architecture.md, "channel graph"):
  out / in   output / input channel of a conv or linear (local index within a conv group)
  dw         channel of a depthwise conv (its input channel and the output channels it feeds)
  norm       per-channel entry of a norm, PReLU or other per-channel layer
  gnorm      one GroupNorm group (its channels always fall together)
  any other  a layer's own kind (the option-A shortcut's pad_front / pad_back zero channels)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from ..errors import ChanpruneError, UserError

if TYPE_CHECKING:
    from torch import fx

Slot = tuple[str, str, int]  # (module qualified name, kind, index)
Drop = Mapping[str, set[int]]  # slot kind -> indices to remove from one module
# "grp": a whole conv group of a grouped conv (its inputs and outputs stand or fall together)
PRODUCER_KINDS = ("out", "dw", "grp")
#: slot kinds a layer's width is counted in (the allocator's per-layer floor)
WIDTH_KINDS = (*PRODUCER_KINDS, "in")
UNTRACKED = -1


@dataclass
class ModuleCost:
    """What a layer costs per unit of its channel counts (MACs = counts × `per_unit`)."""

    # "conv" | "depthwise" | "groupwise" (whole conv groups) | "linear"; "norm" | "gnorm": a norm,
    # `ins` equal shares, one per slot of that kind (channel, group)
    kind: str
    per_unit: int  # kernel elements × output positions (× tokens for linear); a norm: its MACs per slot
    groups: int
    ins: int  # input channels per group (depthwise: channels)
    outs: int  # output channels per group (depthwise: channels)


@dataclass(frozen=True)
class LayerShape:
    """A layer as reports show it. `kind`: "conv" | "linear" | "norm"."""

    kind: str
    in_channels: int | None
    out_channels: int | None
    kernel: tuple[int, ...] | None = None
    stride: tuple[int, ...] | None = None
    groups: int = 1


@dataclass(frozen=True)
class TraceOptions:
    """Choices that change what the graph may remove.

    `through_layernorm`: channels normalised together by a LayerNorm become removable; the pruned
    model then differs from the masked original (the statistics change), so such removals are
    *approximate*: measured and reported, not proven."""

    through_layernorm: bool = False
    #: grouped convs traced as whole conv groups instead of the same local index in every group
    #: (`graph.build_graph` picks them when the local-index coupling leaves nothing to remove)
    whole_conv_groups: frozenset[str] = frozenset()


class ModuleCall(Protocol):
    """One call of a leaf module in the traced graph, as a rule's `trace` sees it.

    `x` is the label tensor of the first input (channel ids, UNTRACKED for fixed values; None when
    the input is not a tensor), `shape` the output shape (None when the output is not a tensor)."""

    name: str
    module: nn.Module
    node: fx.Node
    x: torch.Tensor | None
    shape: tuple[int, ...] | None
    options: TraceOptions

    def set_output(self, label: Any) -> None: ...
    def channel_vector(self, label: torch.Tensor, axis: int) -> torch.Tensor: ...
    def new_slot(self, kind: str, index: int) -> int: ...
    def new_slots(self, kind: str, count: int) -> torch.Tensor: ...
    def link(self, slot_id: int, label: int) -> None: ...
    def pin(self, ids: torch.Tensor | Sequence[int], reason: str) -> None: ...
    def pin_inputs(self, reason: str) -> None: ...
    def pin_other_inputs(self, reason: str) -> None: ...  # every tensor input but the first
    def approximate(self, ids: torch.Tensor | Sequence[int], reason: str) -> None: ...
    def varying_axes(self, label: torch.Tensor) -> list[int]: ...
    def broadcast(self, vec: torch.Tensor, axis: int) -> torch.Tensor: ...
    def add_cost(self, cost: ModuleCost) -> None: ...
    def structural(self, fn: Callable[..., Any], literal_sizes: bool) -> None: ...


def keep_indices(n: int, drop: set[int]) -> list[int]:
    return [i for i in range(n) if i not in drop]


def set_tensor(module: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace a parameter or buffer, keeping its kind and requires_grad."""
    old = getattr(module, name, None)
    if old is None or value is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value.contiguous(), requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, value.contiguous())


def select(module: nn.Module, name: str, dim: int, index: list[int]) -> None:
    """Keep only `index` along `dim` of a parameter or buffer (absent or None: nothing to do)."""
    t = getattr(module, name, None)
    if t is not None:
        set_tensor(module, name, t.detach().index_select(dim, torch.tensor(index, dtype=torch.long, device=t.device)))


def scale_channels(tensor: torch.Tensor | None, dim: int, channels: torch.Tensor, factors: torch.Tensor) -> None:
    """Multiply entries `channels` along `dim` of a weight, bias or gain by `factors`, in place
    (None: nothing to do). `scale_outputs` of every rule that owns such tensors uses it."""
    if tensor is None:
        return
    rows = tensor.data.movedim(dim, 0)
    rows[channels.to(rows.device)] *= factors.to(rows.device, rows.dtype).view([-1] + [1] * (rows.dim() - 1))


def zero_rows(module: nn.Module, rows: Sequence[int], names: Sequence[str] = ("weight", "bias")) -> None:
    if rows:
        for name in names:
            t = getattr(module, name, None)
            if t is not None:
                t[sorted(rows)] = 0


class LayerRule:
    """Everything type-specific about one module type. The defaults suit a module that owns no
    channel slots; a rule that creates slots in `trace` implements the methods for its kinds."""

    #: attributes that surgery changes and a pruned checkpoint records (`engine.shapes`)
    shape_attrs: tuple[str, ...] = ()
    #: its per-channel slots re-create a constant from a zero input (a norm's bias): criteria
    #: gate the channel at this module's output too
    gates_channels: bool = False
    #: its output may stand in for a producer's output that feeds it directly (BatchNorm)
    folds_producer: bool = False

    def trace(self, call: ModuleCall) -> bool:
        """Label the output of `call` (and union/pin ids). False: this call cannot be followed;
        the engine pins its inputs as an unsupported module."""
        return False

    def can_prune_whole_groups(self, module: nn.Module) -> bool:
        """Whether `trace` can couple whole conv groups (`TraceOptions.whole_conv_groups`)."""
        return False

    # -- surgery -------------------------------------------------------------------------------
    def prune(self, module: nn.Module, drop: Drop) -> None:
        """Remove the slots in `drop` (kind -> indices) in place, updating shape attributes."""
        raise ChanpruneError(f"internal: no surgery rule for {type(module).__name__}")

    def producer_width(self, module: nn.Module, kind: str) -> int | None:
        """How many slots of producer `kind` the module has (surgery refuses to remove all)."""
        return None

    def mask(self, module: nn.Module, drop: Drop) -> None:
        """Zero the slots in `drop` so the module computes what its pruned version computes:
        producer rows, per-channel entries and consumer input columns."""

    def zero_producers(self, module: nn.Module, drop: Drop) -> None:
        """Zero only the producer rows (weight and bias) of the slots in `drop` (soft pruning:
        norms and consumers keep their values, so the channel can recover)."""

    # -- where channels are --------------------------------------------------------------------
    def output_axis(self, module: nn.Module) -> int:
        return 1

    def output_width(self, module: nn.Module) -> int:
        raise UserError(f"cannot gate module of type {type(module).__name__}")

    def output_channels(self, module: nn.Module, kind: str, index: int) -> list[int]:
        """Output channels of the module that slot (kind, index) stands for."""
        return [index]

    def producer_rows(self, module: nn.Module, kind: str, index: int) -> torch.Tensor | None:
        """The weights (flattened) that produce slot (kind, index); None when it has none."""
        return None

    def consumer_columns(self, module: nn.Module, index: int) -> torch.Tensor | None:
        """The weights (flattened) that read input slot ("in", index); None when it has none."""
        return None

    def weight_rows(self, module: nn.Module, weight_like: torch.Tensor, channels: list[int]) -> torch.Tensor:
        """Entries of a tensor shaped like the weight that produce output `channels`: [len, ...]."""
        return weight_like[channels]

    def scale_outputs(self, module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
        """Multiply output `channels` by `factors` where they take their value (weight rows and
        bias); a module without weight cannot carry a scale and is left alone."""
        weight = getattr(module, "weight", None)
        if weight is None:
            return
        scale_channels(weight, 0, channels, factors)
        scale_channels(getattr(module, "bias", None), 0, channels, factors)

    # -- description ---------------------------------------------------------------------------
    def describe(self, module: nn.Module) -> LayerShape | None:
        return None

    def expected_shapes(self, module: nn.Module) -> dict[str, tuple[int, ...]]:
        """Parameter/buffer shapes implied by the shape attributes (checkpoint consistency)."""
        return {}


# ------------------------------------------------------------------------------------------------
# The table

_RULES: dict[type[nn.Module], LayerRule] = {}
_LEAVES: set[type[nn.Module]] = set()


def register_layer_rule(module_type: type[nn.Module], rule: LayerRule, *, leaf: bool = True) -> None:
    """Use `rule` for `module_type` and its subclasses (replacing any earlier rule for that type).

    `leaf`: the tracer treats modules of this type (and subclasses) as opaque calls handled by the
    rule instead of tracing into their `forward` (torch.nn layers are leaves anyway)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer_rule needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, LayerRule):
        raise TypeError(f"register_layer_rule needs a LayerRule, got {type(rule).__name__}")
    _RULES[module_type] = rule
    if leaf:
        _LEAVES.add(module_type)
    else:
        _LEAVES.discard(module_type)


# Width attributes a module keeps for code paths a trace does not run: set after surgery.
_WIDTHS: dict[type[nn.Module], Callable[[nn.Module], None]] = {}


def register_width_attributes(module_type: type[nn.Module], set_widths: Callable[[nn.Module], None]) -> None:
    """After surgery, `set_widths(module)` sets, from its pruned layers, the widths a module of this
    type (or a subclass) keeps as attributes for code the trace did not run: a library's export or
    fusing code (ultralytics' C2f.forward_split splits by `self.c`)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_width_attributes needs an nn.Module subclass, got {module_type!r}")
    _WIDTHS[module_type] = set_widths


def set_width_attributes(model: nn.Module) -> None:
    """Run the registered `set_widths` of every module of `model` (see `register_width_attributes`)."""
    _load_library_rules()
    for module in model.modules():
        for cls in type(module).__mro__:
            if cls in _WIDTHS:
                _WIDTHS[cls](module)
                break


# Layer libraries with rules of their own: registered once the process has imported the library
# (a model built from it), never imported by chanprune for that (timm takes seconds to import).
_LIBRARY_RULES = {"timm": "chanprune_cli.engine.rules_timm", "ultralytics": "chanprune_cli.engine.rules_ultralytics"}
_LIBRARIES_LOADED: set[str] = set()


def _load_library_rules() -> None:
    if len(_LIBRARIES_LOADED) == len(_LIBRARY_RULES):
        return
    for library, rules in _LIBRARY_RULES.items():
        if library not in _LIBRARIES_LOADED and library in sys.modules:
            _LIBRARIES_LOADED.add(library)
            importlib.import_module(rules)


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule registered for the nearest class in the module's MRO, or None."""
    _load_library_rules()
    for cls in type(module).__mro__:
        rule = _RULES.get(cls)
        if rule is not None:
            return rule
    return None


def layer_shape(module: nn.Module) -> LayerShape | None:
    """How reports show `module` (None: not a layer that owns channels)."""
    rule = rule_for(module)
    return rule.describe(module) if rule is not None else None


def is_registered_leaf(module: nn.Module) -> bool:
    _load_library_rules()
    return any(cls in _LEAVES for cls in type(module).__mro__)


def shape_attr_names(module: nn.Module | None = None) -> tuple[str, ...]:
    """The shape attributes of every built-in rule, plus those of `module`'s own rule, in a fixed
    order (checkpoints record these for every module that has them)."""
    names = dict.fromkeys(_BUILTIN_SHAPE_ATTRS)
    rule = rule_for(module) if module is not None else None
    if rule is not None:
        names.update(dict.fromkeys(rule.shape_attrs))
    return tuple(names)


def mark_builtins() -> None:
    """Fix the built-in rules' shape attributes, in registration order (`builtin_rules` calls this
    once it has registered them): recorded for every module that has them, in this order."""
    global _BUILTIN_SHAPE_ATTRS
    _BUILTIN_SHAPE_ATTRS = tuple(dict.fromkeys(a for rule in _RULES.values() for a in rule.shape_attrs))


_BUILTIN_SHAPE_ATTRS: tuple[str, ...] = ()

# The built-in rules register themselves when imported (they need the names above).
from . import builtin_rules  # noqa: E402, F401
