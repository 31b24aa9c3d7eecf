"""The pruning engine: tracing channel groups, the layer-rule and op-rule tables, allocation, surgery.

`register_layer_rule(MyLayer, rule)` teaches every part of chanprune a new module type;
`register_op_rule(torch.roll, rule)` a new functional op; `register_width_attributes` sets the
widths a module keeps for code paths the trace does not run. See `layer_rules`, `op_rules` and
docs/architecture.md.
"""

from .builtin_rules import ChannelwiseRule, ConvRule, LinearRule, PassThroughRule, PerChannelSpatialRule
from .layer_rules import (
    LayerRule,
    LayerShape,
    ModuleCall,
    ModuleCost,
    register_layer_rule,
    register_width_attributes,
    rule_for,
)
from .op_rules import OpCall, OpRule, op_rule_for, register_op_rule

__all__ = [
    "ChannelwiseRule",
    "ConvRule",
    "LayerRule",
    "LayerShape",
    "LinearRule",
    "ModuleCall",
    "ModuleCost",
    "OpCall",
    "OpRule",
    "PassThroughRule",
    "PerChannelSpatialRule",
    "op_rule_for",
    "register_layer_rule",
    "register_op_rule",
    "register_width_attributes",
    "rule_for",
]
