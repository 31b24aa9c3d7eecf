"""`hrank`: average rank of a channel's feature maps (Lin et al., CVPR 2020).

For every calibration image, the feature map of each channel (an H x W matrix) is taken at the
point where the channel's value is final (its BatchNorm output, or the producer output when no
BatchNorm follows), passed through ReLU as in the HRank code (option `relu`), and its matrix rank
is computed with `torch.linalg.matrix_rank` (default tolerance: max(H, W) * eps * largest singular
value). The score is the rank averaged over images: an all-zero (dead) map has rank 0 and is
removed first. A residual class is measured where it is first produced in execution order
(`points=first`, default) or averaged over every point that produces it (`points=all`, slower);
a class hooked at several channels of one output (a grouped conv's coupled channels) averages them. Maps with a single spatial
axis are L x 1 matrices, outputs without spatial axes 1 x 1 (rank 0 or 1). 3-d maps are
reshaped to (D*H) x W.

Cost: one SVD per channel per image, so the images are bounded by `max_images` (default 512; the
paper uses 500) on top of what the caller passes. Options: max_images=512, relu=true,
points=first|all, amp=false (bf16 autocast on CUDA; ranks are computed in float32).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..engine.graph import ChannelGraph
from .base import NEEDS_DATA, Batch, Criterion, Scores, register
from .gates import ChannelGates, autocast, batches, choice, parse_options, working_model

DEFAULTS: dict[str, Any] = {"max_images": 512, "relu": True, "points": "first", "amp": False}


def feature_ranks(feats: torch.Tensor) -> torch.Tensor:
    """Rank of every [B, k, ...] map as a matrix: returns [B, k] (float)."""
    b, k = feats.shape[:2]
    if feats.dim() == 2:
        maps = feats.reshape(b, k, 1, 1)
    elif feats.dim() == 3:
        maps = feats.unsqueeze(-1)
    else:
        maps = feats.reshape(b, k, -1, feats.shape[-1])
    maps = maps.float()
    if maps.shape[-1] == 1 or maps.shape[-2] == 1:  # a vector: rank 1 unless all zero
        return (maps.flatten(2).abs().amax(-1) > 0).float()
    return torch.linalg.matrix_rank(maps).float()


@register
class HRank(Criterion):
    name = "hrank"
    summary = "mean matrix rank of the channel's feature maps over calibration images (unlabelled)"
    needs = NEEDS_DATA
    defaults: ClassVar[dict[str, Any]] = DEFAULTS  # option -> default (documented in the module docstring)

    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device, *, seed: int = 0, **options: Any) -> Scores:
        opts = parse_options(self.name, options, DEFAULTS)
        mode = choice(self.name, "points", opts["points"], ("first", "all"))
        assert data is not None
        with working_model(model, device) as net, ChannelGates(net, graph, capture_mode=mode) as gates:
            # Per point: the running sum of ranks of its captured channels.
            sums = {(gid, p): torch.zeros(len(pt.channels), dtype=torch.float64, device=device)
                    for gid, pts in gates.points.items() for p, pt in enumerate(pts)}
            counts = dict.fromkeys(sums, 0)
            selection = {key: (None if mode == "all" else gates.primary(*key).to(device)) for key in sums}

            def capture(gid: int, p: int, feats: torch.Tensor) -> None:
                sel = selection[(gid, p)]
                if sel is not None:
                    feats = feats.index_select(1, sel)
                if opts["relu"]:
                    feats = feats.clamp_min(0)
                ranks = feature_ranks(feats).sum(0).double()
                if sel is None:
                    sums[(gid, p)] += ranks
                else:
                    sums[(gid, p)].index_add_(0, sel, ranks)
                counts[(gid, p)] += feats.shape[0]

            gates.capture = capture
            with torch.inference_mode():
                for x, _ in batches(data, device, description="hrank", max_images=opts["max_images"] or None):
                    with autocast(device, opts["amp"]):
                        net(x)
            gates.capture = None
            scores: Scores = {}
            for gid, pts in gates.points.items():
                total = torch.zeros(gates.channels[gid], dtype=torch.float64)
                n = torch.zeros(gates.channels[gid], dtype=torch.float64)
                for p, pt in enumerate(pts):
                    if counts[(gid, p)] == 0:
                        continue
                    pos = torch.arange(len(pt.classes)) if mode == "all" else gates.primary(gid, p)
                    mean = sums[(gid, p)].cpu() / counts[(gid, p)]
                    total.index_add_(0, pt.classes[pos], mean[pos])
                    n.index_add_(0, pt.classes[pos], torch.ones(len(pos), dtype=torch.float64))
                scores[gid] = total / n.clamp_min(1)
        return scores
