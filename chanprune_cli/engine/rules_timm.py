"""Rules for timm's layers (registered when timm is imported; see `layer_rules._LIBRARY_RULES`).

timm fuses norms with their activation (and drop-out) in one module whose `forward` calls
`F.batch_norm` directly; traced through, those calls read the module's parameters as fixed
tensors and pin every channel. As leaves with a norm's rule they are followed exactly: the
activation acts on each element, so the channels pass through like a BatchNorm's.
"""

from __future__ import annotations

from timm import layers

from .builtin_rules import NormRule
from .layer_rules import register_layer_rule

for _norm_act in (layers.BatchNormAct2d, layers.SyncBatchNormAct, layers.FrozenBatchNormAct2d):
    register_layer_rule(_norm_act, NormRule(folds_producer=True))
