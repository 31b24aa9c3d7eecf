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
group's channels; `norm=l1` uses the L1 norm instead), SGD on the masks (`lr`, `momentum`,
`weight_decay` as torch.optim.SGD takes them) for `steps` steps, one calibration batch each: the
batches given are cycled until the steps are done (or only the first `steps` of them are used).
Weights are frozen and the model runs in eval mode (BatchNorm running statistics).
`train_weights=true` also trains the weights of a deep copy with SGD at `weight_lr` (the caller's
model is never modified).

Score: |sum_k M[k, c]|, ranked across layers as it is (the authors' global voting; `--normalize
auto` gives none). BN rescale (`rescale=true`): the scores carry sum_k M[k, c] / 2 per channel and
`prune` multiplies every surviving channel by it where it takes its final value (its BatchNorm's
gamma and beta, else the producer's weight rows and bias), as the paper does after pruning (score
files store the factors too).

Where chanprune follows the authors (zyxxmu/White-Box, cifar.py, model/resnet_cifar.py,
scripts/resnet56.sh): the gate formula with u ~ U(0, 1) and 1 for the sample's class, the group
L2 penalty on the mask sums, lr 0.1, weight decay 5e-4 on the masks, the score |sum_k M[k, c]|
voted over all layers at once and the BN rescale by sum_k M[k, c] / 2 (their 30 % floor per layer
is `prune --min-keep 0.3`).
Where it departs, and why:
* The authors train the masks *and the weights* for 30 epochs of 50 000 images (batch 256, momentum
  0.9, train-mode BatchNorm), starting from a randomly initialised network, with masks of ones
  placed before each block's first BatchNorm; lam was 0.0005 when the scripts were published and 0
  since July 2021. chanprune scores a network already trained, so the weights stay frozen
  (`train_weights=true` trains a copy), the gates sit after the BatchNorm and start at
  2 / (K + 1) (the trained function unchanged on average).
* Budget. On a trained network with frozen weights the ranking forms in a few hundred steps and
  then degrades, so the budget is a number of steps, not epochs: ResNet-20, inner channels, half
  the MACs removed, 16 x 64 calibration images cycled, BN-recalibrated, top-1 on 1 000 training
  images the calibration never saw (random 34.0, l1 45.7, taylor 55.1): plain SGD, lam 0.05,
  16 / 32 / 64 / 160 / 240 / 320 / 480 steps: 33.5 / 53.4 / 54.7 / 62.1 / 54.9 / 54.6 / 23.1; with
  momentum 0.9 the same peak comes ~10x sooner and falls as fast (16 / 48 / 96 / 160 steps:
  52.6 / 36.6 / 23.5 / 16.4), hence momentum 0 and `steps=160` (about 2.5 passes over 1 024
  images; these figures are with the rescale below). With fewer than 100 steps the ranking is still dominated by the signed loss gradient,
  which ranks worse than random on a trained network; chanprune then says so in one warning line.
* No BN rescale by default: the authors' weights trained with the masks on, so folding the masks
  into them keeps the function the weights learnt; frozen weights never adapted to the masks, and
  folding them in cost accuracy once the masks had moved (same setting, BN-recalibrated, plain SGD:
  62.1 / 54.6 / 23.1 with the rescale at 160 / 320 / 480 steps, 62.8 / 62.5 without it at 160 / 320).
* lam 0.05, not their 0.0005 or 0: with frozen weights the penalty is what drives the masks of
  unneeded channels down (lam 0.0005, momentum 0.9: 37.1-43.7 over 16-96 steps against 52.6 at
  lam 0.05).

Safeguard (not in the paper): the masks' gradient is clipped to a global norm of
`max_grad_norm` (default 5; 0 disables), which only acts when the loss is far from a trained
model's (an untrained or mismatched checkpoint) and keeps SGD at lr 0.1 from diverging there.

Options: steps=160, lam=0.05, lr=0.1, momentum=0.0, weight_decay=0.0005, norm=l2|l1,
train_weights=false, weight_lr=0.001, max_grad_norm=5.0, rescale=false, amp=false. Deterministic
given `seed` (u is drawn from a seeded generator). `whitebox_masks(...)` returns the trained masks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.base import DataWarning
from ..engine.graph import ChannelGraph
from ..errors import UserError
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

DEFAULTS: dict[str, Any] = {"steps": 160, "lam": 0.05, "lr": 0.1, "momentum": 0.0,
                            "weight_decay": 5e-4, "norm": "l2", "train_weights": False, "weight_lr": 1e-3,
                            "max_grad_norm": 5.0, "rescale": False, "amp": False}
# Below this many mask-training steps the ranking is still the signed loss gradient (see the docstring).
MIN_STEPS = 100


def num_classes(net: nn.Module, graph: ChannelGraph, device: torch.device) -> int:
    return output_classes(net, graph, device, "whitebox")


def class_gates(masks: dict[int, torch.Tensor], y: torch.Tensor, generator: torch.Generator) -> dict[int, torch.Tensor]:
    """Per-sample gates [B, C] = A @ M with A[b, y_b] = 1 and A[b, k] = u_bk ~ U(0, 1) otherwise."""
    k = next(iter(masks.values())).shape[0]
    u = torch.rand((y.shape[0], k), generator=generator, device=y.device)
    a = u.scatter(1, y[:, None], 1.0)
    return {gid: a @ m for gid, m in masks.items()}


def _replayable(data: Iterable[Batch]) -> Iterable[Batch]:
    """`data` itself when it can be iterated again (a loader, a list); else its batches kept in a
    list as the first pass draws them, so that several epochs see the same batches."""
    if iter(data) is not data:
        return data
    kept: list[Batch] = []

    def first_pass_then_kept() -> Iterator[Batch]:
        if kept:
            yield from kept
            return
        for batch in data:
            kept.append(batch)
            yield batch

    class Replay:
        def __iter__(self) -> Iterator[Batch]:
            return first_pass_then_kept()

    return Replay()


def whitebox_masks(model: nn.Module, graph: ChannelGraph, data: Iterable[Batch], device: torch.device | str,
                   *, seed: int = 0, **options: Any) -> dict[int, torch.Tensor]:
    """The trained class-wise masks {group id: [K, C]} (on the CPU).

    The masks of all groups are one [K, total channels] tensor (each group's gates are a slice of
    one matrix product), so a step costs a few whole-tensor operations however many groups there
    are, and the gradient clipping never makes the host wait for the device."""
    opts = parse_options("whitebox", options, DEFAULTS)
    norm = choice("whitebox", "norm", opts["norm"], ("l2", "l1"))
    if opts["steps"] < 1 or not 0 <= opts["momentum"] < 1 or opts["weight_decay"] < 0:
        raise UserError("criterion 'whitebox': steps must be >= 1, momentum in [0, 1) and weight_decay >= 0, got "
                        f"{opts['steps']}, {opts['momentum']}, {opts['weight_decay']}")
    device = torch.device(device)
    data = _replayable(data)
    with working_model(model, device, copy_model=opts["train_weights"]) as net, ChannelGates(net, graph) as gates:
        k = num_classes(net, graph, device)
        sizes = list(gates.channels.values())
        masks = torch.full((k, sum(sizes)), 2.0 / (k + 1), device=device, requires_grad=True)
        velocity = torch.zeros_like(masks, requires_grad=False)
        # Each group's columns as one row of `padded` (index sum(sizes) is a zero): the per-group
        # L2 norms of the column sums in one call, with the norm's safe gradient at zero.
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        padded = torch.tensor([[s + j if j < c else sum(sizes) for j in range(max(sizes, default=0))]
                               for s, c in zip(starts, sizes)], dtype=torch.long, device=device)
        weights = [p for p in net.parameters() if p.is_floating_point()] if opts["train_weights"] else []
        for p in weights:
            p.requires_grad_(True)
        generator = torch.Generator(device=device).manual_seed(seed)
        steps = 0
        while steps < opts["steps"]:
            for x, y in batches(data, device, description="whitebox", need_labels=True, classes=k,
                                max_batches=opts["steps"] - steps):
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
                    grad = grads[0]
                    if opts["max_grad_norm"] > 0:
                        grad_norm = grad.double().square().sum().sqrt()
                        grad = grad * (opts["max_grad_norm"] / grad_norm.clamp_min(1e-12)).clamp(max=1.0).float()
                    # a step of torch.optim.SGD: weight decay, then momentum
                    velocity.mul_(opts["momentum"]).add_(grad + opts["weight_decay"] * masks)
                    masks -= opts["lr"] * velocity
                    for p, g in zip(weights, grads[1:]):
                        if g is not None:
                            p -= opts["weight_lr"] * g
                steps += 1
        gates.gates = {}
    _say_if_short(steps)
    return {gid: m.clone() for gid, m in zip(gates.channels, masks.detach().cpu().split(sizes, 1))}


def _say_if_short(steps: int) -> None:
    if steps < MIN_STEPS:
        warnings.warn(DataWarning(
            f"whitebox trained its masks for {steps} steps; they need at least {MIN_STEPS} "
            f"(--criterion-opt steps=N) to rank better than random: with fewer the ranking is the signed loss "
            f"gradient"), stacklevel=3)


@register("whitebox", needs=NEEDS_LABELS, defaults=DEFAULTS,
          summary="|sum over classes| of class-wise channel masks trained with CE + group penalty (labels, short training)",
          cost="`steps` forward + backward passes, one batch each, the batches cycled (160)")
class WhiteBox(Criterion):
    def in_loss_units(self, options: dict[str, Any] | None = None) -> bool:
        # Gate values, one scale in every group: the authors' global voting ranks them as they are.
        return True

    def compute(self, run: ScoringRun) -> Scores:
        assert run.data is not None
        training = {key: value for key, value in run.options.items() if key != "rescale"}
        masks = whitebox_masks(run.model, run.graph, run.data, run.device, seed=run.seed, **training)
        sums = {gid: m.double().sum(0) for gid, m in masks.items()}
        scores = WeightedScores({gid: s.abs() for gid, s in sums.items()})
        if run.options["rescale"]:  # pruning multiplies the surviving channels by sum_k M[k, c] / 2 (the paper's BN rescale)
            scores.channel_scale = {gid: s / 2 for gid, s in sums.items()}
        return scores
