"""Rules for ultralytics' modules (YOLO), registered when ultralytics is imported (see
`layer_rules._LIBRARY_RULES`); chanprune never imports ultralytics itself.

The trace follows what a forward runs. ultralytics also runs code the trace never sees, which
reads widths the modules keep as attributes: its exporter switches every C2f (and subclass:
C3k2, ...) to `forward_split`, which splits by `(self.c, self.c)` where `forward` chunks in
halves; fusing for inference rebuilds RepConv's identity branch from `self.c1`. After surgery
those attributes are set from the pruned layers (`register_width_attributes`), so export and
fused inference see the pruned widths.
"""

from __future__ import annotations

from torch import nn
from ultralytics.nn.modules import block, conv

from .layer_rules import register_width_attributes


def _halves(module: nn.Module) -> None:
    """`forward` chunks cv1's output in two halves; `forward_split` splits it by `(c, c)`."""
    module.c = module.cv1.conv.out_channels // 2


def _rep_conv(module: nn.Module) -> None:
    """RepConv(c1, c2): the identity branch of a fused RepConv is built for c1 channels."""
    layer = module.conv1.conv if hasattr(module, "conv1") else module.conv
    module.c1, module.c2 = layer.in_channels, layer.out_channels


def register_ultralytics_rules() -> None:
    # getattr: a class another ultralytics release does not have is skipped
    for name in ("C2f", "C2fAttn", "RepNCSPELAN4"):
        cls = getattr(block, name, None)
        if cls is not None:
            register_width_attributes(cls, _halves)
    if getattr(conv, "RepConv", None) is not None:
        register_width_attributes(conv.RepConv, _rep_conv)


register_ultralytics_rules()
