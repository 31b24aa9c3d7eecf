"""The op-rule table: how channel ids pass through a torch function or tensor method.

The layer-rule table (`layer_rules`) covers module calls; this one covers the functional ops the
traced graph calls between them (`torch.cat`, `F.relu`, `x.view(...)`, `x + y`, ...). An op rule
is a function of one `OpCall` that labels the op's output, unioning the ids that meet and pinning
what it cannot follow:

    def roll(call: OpCall) -> bool:
        x, dims = call.label(call.node.args[0]), call.argument(2, "dims")
        if x is None or dims is None:  # no dims: rolls the flattened tensor
            return False
        if any(d % x.dim() in call.varying_axes(x) for d in ([dims] if isinstance(dims, int) else dims)):
            call.pin_inputs(f"roll over channels ({call.node.name})")
            call.set_output(None)
        else:
            call.set_output(x)  # rolled over other axes: every channel stays where it was
        return True

    register_op_rule(torch.roll, roll)   # torch.roll(x, ...)
    register_op_rule("roll", roll)       # x.roll(...)

A rule runs only when some tensor input carries channel ids (otherwise the output carries none).
Returning False means "cannot follow this call": the engine pins its inputs with the reason
"unsupported op NAME (node)", as it does for an op no rule is registered for. An exception the
rule raises pins them too ("cannot follow node: ExcType"). The default entries are in
`builtin_ops` (elementwise, binary, per-channel spatial, reductions, softmaxes, shape-only ops)
and `structural_ops` (ops replayed on the labels: reshapes, cat, split, slicing, pad, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from .layer_rules import Slot

if TYPE_CHECKING:
    from torch import fx


class OpCall(Protocol):
    """One call of a torch function or tensor method in the traced graph, as its op rule sees it.

    A *label* is a tensor of the argument's shape whose elements are channel ids (UNTRACKED for
    fixed values); `shape` is the output's shape (None when the output is not a tensor)."""

    node: fx.Node
    target: Any  # the torch function, or the tensor method's name
    op: str  # its name, as reasons show it
    shape: tuple[int, ...] | None
    inputs: list[torch.Tensor]  # the labels of every tensor argument
    tracked: list[torch.Tensor]  # those that carry channel ids (never empty)

    # -- what every rule uses --------------------------------------------------------------------
    def label(self, arg: Any) -> torch.Tensor | None: ...  # an argument's label; None: not a tensor
    def value(self, arg: Any) -> Any: ...  # the Python value an argument had in the traced run
    def argument(self, index: int, keyword: str, default: Any = None) -> Any: ...  # value of a positional-or-keyword argument
    def set_output(self, label: Any) -> None: ...  # a label, a tuple of labels (several outputs), or None
    def varying_axes(self, label: torch.Tensor) -> list[int]: ...  # axes along which the ids change
    def channel_vector(self, label: torch.Tensor, axis: int, what: str | None = None) -> torch.Tensor: ...
    def broadcast(self, vec: torch.Tensor, axis: int) -> torch.Tensor: ...  # ids along `axis` of the output
    def union(self, a: int, b: int) -> None: ...
    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None: ...  # ids meeting position by position
    def pin_inputs(self, reason: str) -> None: ...  # every tracked input, the reason listed as not followed
    def cannot_follow(self, ids: torch.Tensor | Sequence[int], reason: str) -> None: ...  # pin, listed as not followed
    def pin(self, ids: torch.Tensor | Sequence[int], reason: str) -> None: ...  # pin, not listed
    def replay(self, fn: Callable[..., Any] | None = None, args: Any = None, kwargs: Any = None) -> Any: ...

    # -- what the default entries also use -------------------------------------------------------
    modules: Mapping[str, nn.Module]  # the model's modules by qualified name
    def label_args(self) -> tuple[Any, Any]: ...  # (args, kwargs) with labels for tensors
    def shape_of(self, arg: Any) -> tuple[int, ...] | None: ...
    def relabel(self, node: fx.Node, label: torch.Tensor) -> None: ...  # another node's label (in-place writes)
    def link_slot(self, slot: Slot, label: int) -> None: ...  # the slot stands or falls with channel `label`
    def running_module(self) -> tuple[str, dict[str, Any]] | None: ...  # (name, plain attributes), fx only


#: An op rule: labels the output of one call; False when it cannot follow it.
OpRule = Callable[[OpCall], bool]

_OPS: dict[Any, OpRule] = {}


def register_op_rule(op: Callable[..., Any] | str, rule: OpRule) -> None:
    """Use `rule` for calls of `op`: a torch function (or any callable the traced graph calls:
    `operator.add`, `F.relu`, a `torch.ops` overload), or a tensor method's name ("roll" for
    `x.roll(...)`). Replaces any earlier rule for it, the default entries included."""
    if not (callable(op) or isinstance(op, str)):
        raise TypeError(f"register_op_rule needs a function or a tensor method's name, got {op!r}")
    if not callable(rule):
        raise TypeError(f"register_op_rule needs a function of one OpCall, got {type(rule).__name__}")
    _OPS[op] = rule


def op_rule_for(op: Any) -> OpRule | None:
    """The rule registered for a call's target (a function, or a tensor method's name), or None."""
    return _OPS.get(op)


# The default entries register themselves when imported (they need the names above).
from . import builtin_ops, structural_ops  # noqa: E402, F401
