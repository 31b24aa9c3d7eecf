"""`hrank`: average rank of a channel's feature maps (Lin et al., CVPR 2020).

For every calibration image, the feature map of each channel (an H x W matrix) is taken at the
point where the channel's value is final (its BatchNorm output, or the producer output when no
BatchNorm follows), passed through ReLU as in the HRank code (option `relu`), and its matrix rank
is computed with `torch.linalg.matrix_rank` (default tolerance: max(H, W) * eps * largest singular
value). The score is the rank averaged over images: an all-zero (dead) map has rank 0 and is
removed first. A residual class is measured where it is first produced in execution order
(`points=first`, default) or averaged over every point that produces it (`points=all`, slower);
a class hooked at several channels of one output (a grouped conv's coupled channels) averages them.
Maps with a single spatial axis are L x 1 matrices, outputs without spatial axes 1 x 1 (rank 0 or
1). 3-d maps are reshaped to (D*H) x W.

Where chanprune follows the authors (lmbxmu/HRank, rank_generation.py and main.py): the rank of
each ReLU'd feature map by `matrix_rank` with its default tolerance, averaged over the images; the
lowest ranks go. ~500 images (their `--limit 5` batches of 100): `max_images` 512.
Where it departs: (1) the authors compute the ranks on the *test* split; chanprune reads the
calibration data it is given (the test split is for measuring). (2) The authors do not rank
across layers: every conv has a hand-set compress rate (ResNet-56: 0.1 for the stem, 0.6 for most
inner convs, their README) and each layer is pruned and fine-tuned in turn (15 epochs, lr 0.01 at
batch 128, divided by 10 at epochs 5 and 10). A MACs target needs one ranking over all layers: each
layer's ranks are divided by their mean (`--normalize auto`). Ranks as fractions of the full rank
min(H, W), ranked as they are, did worse (ResNet-20, inner channels, half the MACs, 16 x 64
calibration images, BN-recalibrated, 1 000 held-out training images: 27.4 % vs 46.4 %). (3) A block's output channels are ranked
after the residual addition and its ReLU in the authors' code; chanprune measures a residual class
at its first producer's BatchNorm (`points=all`: every producer's), before the addition; ranked
so, residual streams went first and the ResNet-20 with every group prunable scored below random
(21.4 % vs 23.8 %, half the MACs, BN-recalibrated, 10 000 test images), so scoring a graph whose
streams are prunable warns in one line (`--ignore` their producers, as HRank does). With inner
channels only, ranked across layers so, it beats random on the ResNet-56 by less than 5 points
and ranks below `l1` (63.2 vs random 58.6, mean of 3 seeds, and l1 73.1; half the MACs,
BN-recalibrated, 10 000 test images): the authors' hand-set per-layer rates are what their
ranking is used with.

Cost: one SVD per channel per image, so the images are bounded by `max_images` (default 512) on
top of what the caller passes. Options: max_images=512, relu=true, points=first|all, amp=false
(bf16 autocast on CUDA; ranks are computed in float32).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..data.base import DataWarning
from ..engine.graph import ChannelGraph
from ..engine.layer_rules import PRODUCER_KINDS
from .base import NEEDS_DATA, Criterion, Scores, ScoringRun, register
from .gates import capture_features, choice, class_means

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


@register("hrank", needs=NEEDS_DATA, defaults=DEFAULTS,
          summary="mean matrix rank of the channel's feature maps over calibration images (unlabelled)",
          cost="1 forward over at most `max_images` images (512) + 1 SVD per channel and image")
class HRank(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        opts = run.options
        mode = choice(self.name, "points", opts["points"], ("first", "all"))
        assert run.data is not None
        # Per point: the running sum of the ranks of its channels (those read, see capture_features).
        sums: dict[tuple[int, int], torch.Tensor] = {}
        counts: dict[tuple[int, int], int] = {}

        def update(gid: int, p: int, feats: torch.Tensor, positions: torch.Tensor | None) -> None:
            if (gid, p) not in sums:
                sums[(gid, p)] = torch.zeros(feats.shape[1], dtype=torch.float64, device=feats.device)
                counts[(gid, p)] = 0
            if positions is not None:
                feats = feats.index_select(1, positions)
            ranks = feature_ranks(feats).sum(0).double()
            if positions is None:
                sums[(gid, p)] += ranks
            else:
                sums[(gid, p)].index_add_(0, positions, ranks)
            counts[(gid, p)] += feats.shape[0]

        _say_if_streams(run.graph)
        gates = capture_features(run.model, run.graph, run.data, run.device, update, mode=mode, description="hrank",
                                 max_images=opts["max_images"] or None, relu=opts["relu"], amp=opts["amp"])
        return class_means(gates, mode, {key: sums[key].cpu() / n for key, n in counts.items() if n})


def _say_if_streams(graph: ChannelGraph) -> None:
    """One warning line when residual streams (channels with several producers) are prunable."""
    streams = [g.name for g in graph.prunable_groups()
               if any(sum(kind in PRODUCER_KINDS for _, kind, _ in slots) > 1 for slots in g.classes)]
    if streams:
        warnings.warn(DataWarning(
            f"hrank ranks the channels of {len(streams)} residual stream(s) ({', '.join(streams[:3])}) by their maps before the "
            "addition, which ranked them worse than random on the CIFAR ResNet-20 with every group prunable; --ignore "
            "their producers (HRank prunes inner channels) or rank them with taylor or cac"), stacklevel=3)
