"""A model's structure as plain rows for reports: its channel-owning layers (`layer_rows`, the
analyze table) and its channel groups (`group_rows`: analyze's groups, prune's blocked groups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..engine.layer_rules import layer_shape

if TYPE_CHECKING:
    from torch import nn

    from ..engine.graph import ChannelGraph


@dataclass(frozen=True)
class LayerRow:
    """One channel-owning leaf module of a model, as the analyze table shows it."""

    name: str
    type: str
    in_channels: int | None
    out_channels: int | None
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int
    params: int
    macs: int


def layer_rows(model: nn.Module, module_macs: dict[str, int]) -> list[LayerRow]:
    """Describe the conv / linear / norm leaf modules of `model` in definition order.

    `module_macs` maps leaf module names to MACs (measure.per_module_macs); missing names count 0.
    """
    rows: list[LayerRow] = []
    for name, module in model.named_modules():
        shape = layer_shape(module)  # the layer rules say which modules own channels
        if shape is None:
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(name, type(module).__name__, shape.in_channels, shape.out_channels, shape.kernel,
                             shape.stride, shape.groups, params, int(module_macs.get(name, 0))))
    return rows


def group_rows(graph: ChannelGraph) -> list[dict[str, Any]]:
    """The channel groups of a ChannelGraph as JSON-ready rows (analyze.groups[])."""
    return [
        {"name": g.name, "channels": g.channels, "prunable": g.prunable,
         "prunable_channels": len(g.prunable_classes) if g.prunable else 0,
         "reason": g.reason, "members": list(g.members),
         "approximate": sorted(set(g.approximate.values()))}  # why removing some is not exact (--through-layernorm)
        for g in graph.groups
    ]
