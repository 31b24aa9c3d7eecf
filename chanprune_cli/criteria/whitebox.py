"""`whitebox`: class-wise channel masks trained on labelled data (White-Box pruning, Zhang et al.).

Every prunable group gets a mask M in R^{K x C} (K = the model's number of classes, read from its
output; C = the group's channels). For a sample of class y the gate of channel c, multiplied onto
the channel wherever it is produced (BatchNorm output, else producer output), is

    gate[c] = M[y, c] + sum_{k != y} u_k * M[k, c],     u_k ~ U(0, 1) redrawn per sample.

Initialisation: M = 2 / (K + 1) everywhere, so the expected initial gate is
2/(K+1) * (1 + (K-1)/2) = 1 (the trained network is unchanged on average) and sum_k M[k, c] =
2K/(K+1) ~ 2, which is why the paper rescales the BatchNorm of surviving channels by
sum_k M[k, c] / 2 after pruning.

Training: cross-entropy + lam * sum over groups of ||sum_k M[k, :]||_2 (the L2 norm over the
group's channels; `norm=l1` uses the L1 norm instead), plain SGD with `lr` (default 0.1) on the
masks, one step per calibration batch (steps = batches given; pass several epochs of batches for
the paper's "a few epochs"). Weights are frozen and the model runs in eval mode (BatchNorm
running statistics). `train_weights=true` also trains the weights of a deep copy with SGD at
`weight_lr` (the caller's model is never modified).

Budget and lam: the masks start equal, so the ranking only forms as they train; after a few
batches it is dominated by the signed loss gradient, which ranks worse than random on a trained
network (BENCHMARKS.md, "White-Box: mask budget and lam"). Give it at least an epoch of batches
(`--calib-batches`), as the paper trains for a few epochs.

Safeguard (not in the paper): the masks' gradient is clipped to a global norm of
`max_grad_norm` (default 5; 0 disables), which only acts when the loss is far from a trained
model's (an untrained or mismatched checkpoint) and keeps SGD at lr 0.1 from diverging there.

Score: |sum_k M[k, c]|. BN rescale (`rescale=true`, default): the scores carry sum_k M[k, c] / 2
per channel and `prune` multiplies every surviving channel by it where it takes its final value
(its BatchNorm's gamma and beta, else the producer's weight rows and bias), as the paper does after
pruning: the masks' average effect is folded into the weights (score files store the factors too).
Options: lam=0.05, lr=0.1, norm=l2|l1, train_weights=false, weight_lr=0.001, max_grad_norm=5.0,
rescale=true, amp=false. Deterministic given `seed` (u is drawn from a seeded generator).
`whitebox_masks(...)` returns the trained masks themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.graph import ChannelGraph
from .base import NEEDS_LABELS, Batch, Criterion, Scores, ScoringRun, WeightedScores, register
from .gates import (
    ChannelGates,
    batches,
    choice,
    output_classes,
    parse_options,
    task_logits,
    working_model,
)

DEFAULTS: dict[str, Any] = {"lam": 0.05, "lr": 0.1, "norm": "l2", "train_weights": False, "weight_lr": 1e-3,
                            "max_grad_norm": 5.0, "rescale": True, "amp": False}


def num_classes(net: nn.Module, graph: ChannelGraph, device: torch.device) -> int:
    return output_classes(net, graph, device, "whitebox")


def class_gates(masks: dict[int, torch.Tensor], y: torch.Tensor, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Per-sample gates [B, C] = A @ M with A[b, y_b] = 1 and A[b, k] = u_bk ~ U(0, 1) otherwise."""
    k = next(iter(masks.values())).shape[0]
    u = torch.rand((y.shape[0], k), generator=generator, device=y.device)
    a = u.scatter(1, y[:, None], 1.0)
    return {gid: a @ m for gid, m in masks.items()}


def whitebox_masks(model: nn.Module, graph: ChannelGraph, data: Iterable[Batch], device: torch.device | str,
                   *, seed: int = 0, **options: Any) -> dict[int, torch.Tensor]:
    """The trained class-wise masks {group id: [K, C]} (on the CPU).

    The masks of all groups are one [K, total channels] tensor (each group's gates are a slice of
    one matrix product), so a step costs a few whole-tensor operations however many groups there
    are, and the gradient clipping never makes the host wait for the device."""
    opts = parse_options("whitebox", options, DEFAULTS)
    norm = choice("whitebox", "norm", opts["norm"], ("l2", "l1"))
    device = torch.device(device)
    with working_model(model, device, copy_model=opts["train_weights"]) as net, ChannelGates(net, graph) as gates:
        k = num_classes(net, graph, device)
        sizes = list(gates.channels.values())
        masks = torch.full((k, sum(sizes)), 2.0 / (k + 1), device=device, requires_grad=True)
        # Each group's columns as one row of `padded` (index sum(sizes) is a zero): the per-group
        # L2 norms of the column sums in one call, with the norm's safe gradient at zero.
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        padded = torch.tensor([[s + j if j < c else sum(sizes) for j in range(max(sizes, default=0))]
                               for s, c in zip(starts, sizes)], dtype=torch.long, device=device)
        weights = [p for p in net.parameters() if p.is_floating_point()] if opts["train_weights"] else []
        for p in weights:
            p.requires_grad_(True)
        generator = torch.Generator(device=device).manual_seed(seed)
        for x, y in batches(data, device, description="whitebox", need_labels=True, classes=k):
            assert y is not None
            u = torch.rand((y.shape[0], k), generator=generator, device=y.device)  # as class_gates draws it
            gates.gates = dict(zip(gates.channels, (u.scatter(1, y[:, None], 1.0) @ masks).split(sizes, 1)))
            logits = task_logits(net, x, device, opts["amp"])
            loss = F.cross_entropy(logits, y)
            sums = masks.sum(0)
            if norm == "l2":
                penalty = torch.linalg.vector_norm(torch.cat([sums, sums.new_zeros(1)])[padded], dim=1).sum()
            else:
                penalty = sums.abs().sum()
            total = loss + opts["lam"] * penalty
            grads = torch.autograd.grad(total, [masks, *weights], allow_unused=True)
            with torch.no_grad():
                step = grads[0] * opts["lr"]
                if opts["max_grad_norm"] > 0:
                    grad_norm = grads[0].double().square().sum().sqrt()
                    step *= (opts["max_grad_norm"] / grad_norm.clamp_min(1e-12)).clamp(max=1.0).float()
                masks -= step
                for p, g in zip(weights, grads[1:]):
                    if g is not None:
                        p -= opts["weight_lr"] * g
        gates.gates = {}
    return {gid: m.clone() for gid, m in zip(gates.channels, masks.detach().cpu().split(sizes, 1))}


@register("whitebox", needs=NEEDS_LABELS, defaults=DEFAULTS,
          summary="|sum over classes| of class-wise channel masks trained with CE + group penalty (labels, short training)")
class WhiteBox(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        assert run.data is not None
        training = {key: value for key, value in run.options.items() if key != "rescale"}
        masks = whitebox_masks(run.model, run.graph, run.data, run.device, seed=run.seed, **training)
        sums = {gid: m.double().sum(0) for gid, m in masks.items()}
        scores = WeightedScores({gid: s.abs() for gid, s in sums.items()})
        if run.options["rescale"]:  # pruning multiplies the surviving channels by sum_k M[k, c] / 2 (the paper's BN rescale)
            scores.channel_scale = {gid: s / 2 for gid, s in sums.items()}
        return scores
