"""The pruning engine: tracing channel groups, the layer-rule table, allocation, surgery.

`register_layer_rule(MyLayer, rule)` teaches every part of chanprune a new module type; see
`layer_rules` and docs/architecture.md.
"""

from .builtin_rules import ChannelwiseRule, ConvRule, LinearRule, PassThroughRule, PerChannelSpatialRule
from .layer_rules import LayerRule, LayerShape, ModuleCall, ModuleCost, register_layer_rule, rule_for

__all__ = [
    "ChannelwiseRule",
    "ConvRule",
    "LayerRule",
    "LayerShape",
    "LinearRule",
    "ModuleCall",
    "ModuleCost",
    "PassThroughRule",
    "PerChannelSpatialRule",
    "register_layer_rule",
    "rule_for",
]
