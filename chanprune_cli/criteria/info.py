"""`info`: information capacity and independence of a channel. *Reconstructed.*

The channel's values are taken where they are final (its BatchNorm output, else its producer
output) and, with `relu=true` (default), passed through ReLU: the information the next layer
actually receives in ReLU networks.

capacity     the entropy (nats) of the channel's activation distribution over every image and
             position: a streamed fixed-range histogram with `bins` (default 32) bins. The range is
             fixed from the first batch: `hist_range=layer` (default) one range for all channels
             hooked at the same layer output (its min/max), so a channel confined to a few bins
             of the layer's scale (weak or nearly dead) has low capacity; `hist_range=channel`
             each channel's own min/max (scale-free: only the shape of the distribution counts).
             The range is widened by `range_margin` (default 0) of the span on each side; later
             values outside it fall into the end bins (a margin leaves end bins empty and coarsens
             the rest: 10 % measured ~2 points worse below). A constant (dead) channel has entropy 0.
             Data-free (no data given): the entropy of the histogram of the producer filter's
             weights on the layer-wide weight range.
independence 1 - mean |Pearson correlation| of the channel with the other channels hooked at the
             same layer output, from running sums of x, x^2 and x x^T (float64, shifted by the first
             batch's means for stability). `samples=position` (default) counts every (image,
             position) as one sample; `samples=pooled` uses each image's spatial mean (cheaper;
             image-level co-activation only). A constant (dead) channel carries nothing of its
             own: independence 0 (and it counts as uncorrelated for the others). Data-free:
             correlations between the producer filters' weight vectors.
score        norm(capacity) + sigma * norm(independence) (`sigma`, default 1.0). `norm=mean`
             (default) divides each part by its mean over the group: scale-free across layers yet
             proportional, so the spread of each part keeps its meaning (independence varies by a
             few per cent between live channels and stays a tie-breaker; a dead channel's 0 still
             counts). `norm=minmax` maps each part to [0, 1] within the group, which stretches the
             tiny spread of independence to the full range of capacity's and lets the weaker
             signal decide half the ranking.

Measured (ResNet-56 on CIFAR-10 JPEG, inner channels, 50 % of the MACs removed globally, 8-16 x 64
calibration images, top-1 % after BN recalibration on 1000 test images; random 59-63): norm=minmax
margin 0.1 (the former default) 64-67; capacity alone 67; independence alone 35 and -independence
55 (independence is no ranking signal by itself here); norm=mean with sigma 0.1 / 0.3 / 1: 67.4 /
66.5 / 66.5; capacity with range_margin=0 69.4, with bins=128 65.3, hist_range=channel 63.2,
relu=false 66.9.

Earlier, with norm=minmax and range_margin=0.1 (ResNet-20 on CIFAR-10, 8 x 64 calibration images, 10 % of every layer masked without
fine-tuning; top-1 %, random scores 54.5, l1 60.5, taylor 75.5): default 56.6, capacity alone 57.2,
independence alone 36.8 and sigma=-1 (keep *correlated* channels) 63.6: in a trained network
the weakly correlated channels tend to be the noisy, weak ones. Without ReLU the default scores
35.9, with `hist_range=channel` (no ReLU) 35.0, data-free 42.2.

Where chanprune follows the paper (Tang et al., "Filter Pruning based on Information Capacity and
Independence", 2023; no code was released): capacity as the entropy of a filter's information,
independence as the filter's (lack of) correlation with the others of its layer, the score their
sum with a balancing factor sigma; data-free without `--data`, from the filters' weights. Where it
departs: the paper estimates a filter's capacity from its weights as a stand-in for the entropy of
its feature map, which it found correlated with it; given calibration data chanprune measures the
feature maps themselves, and their correlations for independence (the data-free path stays the
weights'). Each part is divided by its layer's mean (the paper's normalisation is not known here)
and a MACs target ranks the sums across layers, each layer divided by its mean. Measured with the
defaults (ResNet-20, half the MACs, 16 x 64 calibration images, BN-recalibrated, top-1 on 1 000
training images calibration never saw; random 34.0 / 24.8, l1 45.7 / 25.7 for inner channels /
every group): 46.7 / 44.0. On the ResNet-56 (same protocol, top-1 on the 10 000 test images)
it ranks below `l1` with inner channels: 67.4 vs l1 73.1 and random 58.6 (mean of 3 seeds); with
every group prunable 57.5 vs l1 33.4 and random 38.9.

A residual class is measured where it is first produced (`points=first`) or averaged over all its
points (`points=all`). Options: bins=32, sigma=1.0, norm=mean|minmax, samples=position|pooled,
hist_range=layer|channel, relu=true, range_margin=0.0, points=first|all, max_images=0 (0 = all the
data given), amp=false.
`info_components(...)` returns the capacity and independence vectors separately.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..engine.graph import ChannelGraph
from .base import NEEDS_WEIGHTS, Batch, Criterion, Scores, ScoringRun, producer_filter_means, register
from .gates import capture_features, choice, class_means, normalise, parse_options

DEFAULTS: dict[str, Any] = {"bins": 32, "sigma": 1.0, "norm": "mean", "samples": "position", "hist_range": "layer",
                            "relu": True, "range_margin": 0.0, "points": "first", "max_images": 0, "amp": False}


def entropy(counts: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each row of a histogram."""
    counts = counts.double()
    p = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    return -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1)


def independence_from_moments(n: float, s: torch.Tensor, ss: torch.Tensor) -> torch.Tensor:
    """1 - mean |corr| with the other channels, from the count, sum [k] and sum of products [k, k]."""
    k = s.shape[0]
    if k < 2 or n < 2:
        return torch.ones(k, dtype=torch.float64)
    mean = s / n
    cov = ss / n - torch.outer(mean, mean)
    var = cov.diagonal().clamp_min(0)
    std = var.sqrt()
    live = std > 1e-12 * max(float(std.max()), 1e-300)
    denom = torch.outer(std, std)
    corr = torch.where(torch.outer(live, live), cov / denom.clamp_min(1e-300), torch.zeros_like(cov)).clamp(-1, 1)
    corr.fill_diagonal_(0)
    return torch.where(live, 1 - corr.abs().sum(1) / (k - 1), torch.zeros_like(std))


class _PointStats:
    """Streaming histogram and moments of the k channels of one hook point."""

    def __init__(self, k: int, bins: int, margin: float, device: torch.device, shared_range: bool) -> None:
        self.k, self.bins, self.margin, self.shared = k, bins, margin, shared_range
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.counts = torch.zeros(k * bins, dtype=torch.float64, device=device)
        self.shift: torch.Tensor | None = None
        self.n = 0.0
        self.s = torch.zeros(k, dtype=torch.float64, device=device)
        self.ss = torch.zeros(k, k, dtype=torch.float64, device=device)

    def update(self, feats: torch.Tensor, pooled: bool) -> None:
        x = feats.float().transpose(0, 1).reshape(self.k, -1)  # [k, samples]
        if self.lo is None:
            lo, hi = x.amin(1), x.amax(1)
            if self.shared:
                lo, hi = lo.min().expand(self.k), hi.max().expand(self.k)
            span = (hi - lo) * self.margin
            self.lo, self.hi = lo - span, hi + span
        width = (self.hi - self.lo).clamp_min(1e-12)
        idx = ((x - self.lo[:, None]) / width[:, None] * self.bins).floor().clamp_(0, self.bins - 1).long()
        idx += torch.arange(self.k, device=x.device)[:, None] * self.bins
        self.counts += torch.bincount(idx.reshape(-1), minlength=self.k * self.bins).double()
        samples = feats.float().flatten(2).mean(2).t() if pooled and feats.dim() > 2 else x  # [k, n]
        if self.shift is None:
            self.shift = samples.mean(1)
        centred = samples - self.shift[:, None]
        self.n += centred.shape[1]
        self.s += centred.sum(1).double()
        self.ss += (centred @ centred.t()).double()

    def capacity(self) -> torch.Tensor:
        return entropy(self.counts.reshape(self.k, self.bins)).cpu()

    def independence(self) -> torch.Tensor:
        return independence_from_moments(self.n, self.s.cpu(), self.ss.cpu())


def _data_free(model: nn.Module, graph: ChannelGraph, bins: int) -> tuple[Scores, Scores]:
    def capacity(filters: torch.Tensor) -> torch.Tensor:
        filters = filters.cpu()
        lo, hi = filters.min(), filters.max()
        width = float(hi - lo) or 1.0
        b = ((filters - lo) / width * bins).floor().clamp(0, bins - 1).long()
        counts = torch.zeros(filters.shape[0], bins, dtype=torch.float64).scatter_add_(1, b, torch.ones_like(filters))
        return entropy(counts)

    def independence(filters: torch.Tensor) -> torch.Tensor:
        filters = filters.cpu()
        return independence_from_moments(float(filters.shape[1]), filters.t().sum(0), filters @ filters.t())

    groups = graph.prunable_groups()
    return ({g.id: producer_filter_means(model, g, capacity) for g in groups},
            {g.id: producer_filter_means(model, g, independence) for g in groups})


def info_components(model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
                    device: torch.device | str = "cpu", **options: Any) -> tuple[Scores, Scores]:
    """(capacity, independence) per prunable group; data-free when `data` is None."""
    opts = parse_options("info", {k: v for k, v in options.items() if k != "norm"}, DEFAULTS)
    mode = choice("info", "points", opts["points"], ("first", "all"))
    pooled = choice("info", "samples", opts["samples"], ("position", "pooled")) == "pooled"
    hist_range = choice("info", "hist_range", opts["hist_range"], ("layer", "channel"))
    opts["bins"] = max(opts["bins"], 2)
    if data is None:
        return _data_free(model, graph, opts["bins"])
    stats: dict[tuple[int, int], _PointStats] = {}

    def update(gid: int, p: int, feats: torch.Tensor, positions: torch.Tensor | None) -> None:
        # Every channel of the point counts: independence correlates each with all the others.
        if (gid, p) not in stats:
            stats[(gid, p)] = _PointStats(feats.shape[1], opts["bins"], opts["range_margin"], feats.device,
                                          shared_range=hist_range == "layer")
        stats[(gid, p)].update(feats, pooled)

    gates = capture_features(model, graph, data, torch.device(device), update, mode=mode, description="info",
                             max_images=opts["max_images"] or None, relu=opts["relu"], amp=opts["amp"])
    return (class_means(gates, mode, {key: st.capacity() for key, st in stats.items()}),
            class_means(gates, mode, {key: st.independence() for key, st in stats.items()}))


@register("info", needs=NEEDS_WEIGHTS, defaults=DEFAULTS,  # uses calibration data when given
          summary="information capacity (entropy) + independence (1 - mean |corr|); data-free without --data (reconstructed)",
          cost="1 forward per batch (every batch given, or `max_images`); none without --data")
class Info(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        how = choice(self.name, "norm", run.options["norm"], ("mean", "minmax"))
        capacity, independence = info_components(run.model, run.graph, run.data, run.device, **run.options)
        sigma = run.options["sigma"]
        return {gid: normalise(capacity[gid], how) + sigma * normalise(independence[gid], how) for gid in capacity}
