"""Helpers shared by the engine tests."""

from __future__ import annotations

import torch
from torch import nn


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm/PReLU parameters and running statistics, random biases; eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
                for name in ("weight", "bias", "running_mean"):
                    t = getattr(m, name, None)
                    if isinstance(t, torch.Tensor) and t.is_floating_point():
                        t.copy_(torch.randn(t.shape, generator=g))
                if getattr(m, "running_var", None) is not None:
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
            elif isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model.eval()
