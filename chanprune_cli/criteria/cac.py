"""`cac`: conditional accuracy change under random channel gates. *Reconstructed.*

Every channel class of every prunable group gets a per-sample gate drawn from Bernoulli(1 - p)
(`drop_prob` p, default 0.1): 0 switches the channel off for that sample at every point it is
produced (BatchNorm output, else producer output). One forward/backward per batch gives, for each
sample b, its loss l_b, whether it was classified correctly, and dl_b/dg_bc for every channel.
Two running estimates of "how much worse without channel c" are kept:

  Monte-Carlo  E[l | g_c = 0] - E[l | g_c = 1] from the per-sample draws (sums of l_b over the
               samples where c was off / on, and their counts); `metric=accuracy` uses the error
               (1 - correct) instead of the loss. `paired=true` (default) subtracts each sample's
               loss with every gate on (one extra forward without gradients, +~25 % time): a
               control variate that removes the per-sample difficulty from both means without
               biasing their difference (the draws are independent of the sample).
  first order  from dl_b/dg_bc at the drawn gates. `first_order=abs` (default): mean over samples
               of |dl_b/dg_bc|. `first_order=signed`: the literal -dL/dgate, as a trapezoid
               estimate of l(0) - l(1) (mean of -dl/dg over on-samples and over off-samples,
               averaged). The signed mean is ~0 at a trained minimum and ranked worse than random in
               our check (ResNet-20 on CIFAR-10, 10 % of every layer masked, no fine-tuning: 26 %
               top-1 vs 55 % random, 73 % for abs), hence the magnitude by default.

importance = w * norm(MC) + (1 - w) * norm(first order), where norm is the identity with
`units=loss` (both parts are loss changes, see below) and divides by the group's mean absolute value
(sign kept) with `units=group`, so both parts weigh the same within a group. Channels never switched
off in the data fall back to the first-order estimate. The Monte-Carlo part needs many samples (it
is a difference of two noisy means per channel), so by default (`mc_weight=auto`) its weight grows
with the evidence: per channel w = n_off / (n_off + mc_halfway), n_off the samples in which the
channel was off, `mc_halfway` = 1000 (the two parts weigh equally after 1000 off-samples, i.e.
10,000 images at drop_prob 0.1). Over a few calibration batches the first-order part carries the
ranking; a training loop running the estimator for many steps (the method's dynamic schedule) is
where the Monte-Carlo part takes over. A fixed `mc_weight` in [0, 1] overrides this. Measured
with `units=group` (ResNet-56 on CIFAR-10 JPEG, inner channels, 50 % of the MACs removed, 16 x 64 calibration images,
top-1 % after BN recalibration on 1000 test images; ~102 off-samples per channel): fixed mc_weight
0.5 (the former default) 71.4, 0.1 80.4, 0 (first order alone) 78.4; auto (w ~ 0.09) 79.0 in
bench/criteria.py where random scores 60.1.

Across groups (`units=loss`, default) both parts stay in the loss's units: the Monte-Carlo part is
a loss difference and the first-order part the linearised loss change of switching the gate off,
so the combination is ranked across layers as it is (`--normalize auto` gives none), and a
residual-stream channel, whose gate switches it off in every block, keeps what it is worth.
`units=group` divides each part by its group's mean instead (as `metric=accuracy` always does: an
error rate and a loss change do not add). Measured (ResNet-20, half the MACs, 16 x 64 calibration
images, BN-recalibrated, top-1 on 1 000 training images calibration never saw; random 34.0 / 24.8,
l1 45.7 / 25.7 for inner channels / every group): units=loss 54.5 / 45.8, units=group 62.8 / 35.9.
Every group prunable is the default of `prune`, and there the per-group scale lost 10 points.

Where chanprune follows the paper (Chen et al., "Dynamical Channel Pruning by Conditional Accuracy
Change for Deep Neural Networks", TNNLS 2021; no code was released, so the method section is all
there is): per-sample random channel gates, the conditional accuracy change with a channel off vs
on estimated as it trains, by a Monte-Carlo estimate and a first-order one, and DCPH (double the
channels, prune half) as the `cac` schedule's `--dcph`. Where it departs: the paper estimates CAC
during training from scratch and prunes early in that training (the `cac` schedule of `finetune`
does that); as a criterion the weights are frozen (eval mode, BatchNorm running statistics) and the
estimates come from the calibration batches alone (steps = batches given), and the first-order
part is a magnitude (see above) where the paper's is signed.
`CACEstimator` holds the running sums and is what a training loop reuses (draw gates with `draw`,
run the model under `ChannelGates`, then `update` with the per-sample losses, correctness and gate
gradients).

Options: drop_prob=0.1, mc_weight=auto|0..1, mc_halfway=1000, metric=loss|accuracy,
first_order=abs|signed, paired=true, units=loss|group, amp=false. Deterministic given `seed` (the
gates come from a generator seeded with it).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import NEEDS_LABELS, Criterion, Scores, ScoringRun, register
from .gates import (
    ChannelGates,
    batches,
    choice,
    gradients,
    normalise,
    output_classes,
    task_logits,
    working_model,
)

DEFAULTS: dict[str, Any] = {"drop_prob": 0.1, "mc_weight": "auto", "mc_halfway": 1000.0, "metric": "loss",
                            "first_order": "abs", "paired": True, "units": "loss", "amp": False}


# The running sums, in the order of the estimator's one [9, channels] block: the rows each update
# adds as one matrix product (off, then on) stay adjacent.
_SUMS = ("loss_off", "err_off", "n_off", "loss_on", "err_on", "n_on", "fo_off", "fo_on", "fo_abs")


class CACEstimator:
    """Running Monte-Carlo and first-order estimates of the loss/error increase per channel.

    Training loops reuse it: `gates = est.draw(batch)`, run the model under `ChannelGates` with
    those gates, then `est.update(losses, correct, gates, grads)`; `est.scores()` at any time.
    The sums of every group live in one block (`loss_off[gid]` etc. are views of it), so an
    update is a few whole-block operations however many groups there are.
    """

    def __init__(self, channels: dict[int, int], device: torch.device | str, *, drop_prob: float = 0.1,
                 seed: int = 0) -> None:
        if not 0 < drop_prob < 1:
            raise ValueError(f"drop_prob must be in (0, 1), got {drop_prob}")
        self.channels = dict(channels)
        self.device = torch.device(device)
        self.drop_prob = drop_prob
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._block = torch.zeros((len(_SUMS), sum(self.channels.values())), dtype=torch.float64, device=self.device)
        sizes = list(self.channels.values())
        for row, name in zip(self._block, _SUMS):
            setattr(self, name, dict(zip(self.channels, row.split(sizes))))
        self.samples = 0

    def draw(self, batch: int) -> dict[int, torch.Tensor]:
        """Per-sample 0/1 gates [batch, channels] for every group (requires_grad, float32)."""
        # One uniform draw per group, in group order (the stream a seed gives), compared at once.
        uniform = [torch.rand((batch, c), generator=self.generator, device=self.device) for c in self.channels.values()]
        on = (torch.cat(uniform, 1) >= self.drop_prob).float()
        return {gid: part.requires_grad_(True) for gid, part in zip(self.channels, on.split(list(self.channels.values()), 1))}

    @torch.no_grad()
    def update(self, losses: torch.Tensor, correct: torch.Tensor, gates: dict[int, torch.Tensor],
               grads: dict[int, torch.Tensor | None], *, clean_losses: torch.Tensor | None = None,
               clean_correct: torch.Tensor | None = None) -> None:
        """Add one batch: per-sample losses [B] and correctness [B] (bool) under `gates` ([B, C]
        for every group), d(sum of losses)/d(gates) [B, C] (None: the group did not affect the
        output), and optionally the same sample's loss/correctness with every gate on (a control
        variate: subtracting it removes the per-sample difficulty from the Monte-Carlo differences
        without biasing them, as the gate draws are independent of the sample)."""
        if set(gates) != set(self.channels):
            raise ValueError("CACEstimator.update needs the gates of every group")
        loss = losses.detach().double()
        err = 1 - correct.detach().double()
        if clean_losses is not None:
            loss = loss - clean_losses.detach().double()
        if clean_correct is not None:
            err = err - (1 - clean_correct.detach().double())
        on = torch.cat([gates[gid].detach() for gid in self.channels], 1).double()
        off = 1 - on
        weights = torch.stack([loss, err, torch.ones_like(loss)])  # [3, B]: loss, error, count
        self._block[0:3] += weights @ off
        self._block[3:6] += weights @ on
        minus = torch.cat([-g.detach().double() if (g := grads.get(gid)) is not None
                           else on.new_zeros((on.shape[0], c)) for gid, c in self.channels.items()], 1)
        self._block[6] += (minus * off).sum(0)
        self._block[7] += (minus * on).sum(0)
        self._block[8] += minus.abs().sum(0)
        self.samples += int(losses.shape[0])

    def monte_carlo(self, metric: str = "loss") -> dict[int, torch.Tensor]:
        """E[response | c off] - E[response | c on]; NaN where c was never off (or never on)."""
        off, on = (self.loss_off, self.loss_on) if metric == "loss" else (self.err_off, self.err_on)
        out = {}
        for gid in self.channels:
            seen = (self.n_off[gid] > 0) & (self.n_on[gid] > 0)
            diff = off[gid] / self.n_off[gid].clamp_min(1) - on[gid] / self.n_on[gid].clamp_min(1)
            out[gid] = torch.where(seen, diff, torch.full_like(diff, float("nan"))).cpu()
        return out

    def first_order_estimate(self, kind: str = "abs") -> dict[int, torch.Tensor]:
        """`abs`: mean over samples of |dl_b/dg_bc| (the per-sample size of the linearised loss
        change). `signed`: trapezoid estimate of l(gate 0) - l(gate 1), the mean of -dl/dg over the
        samples where the channel was on (tangent at g = 1) and where it was off (tangent at g = 0),
        averaged; the g = 1 tangent alone where the channel was never off."""
        if kind == "abs":
            return {gid: (v / max(self.samples, 1)).cpu() for gid, v in self.fo_abs.items()}
        out = {}
        for gid in self.channels:
            at_on = self.fo_on[gid] / self.n_on[gid].clamp_min(1)
            at_off = self.fo_off[gid] / self.n_off[gid].clamp_min(1)
            out[gid] = torch.where(self.n_off[gid] > 0, 0.5 * (at_on + at_off), at_on).cpu()
        return out

    def scores(self, mc_weight: float | str = 0.5, metric: str = "loss", first_order: str = "abs",
               mc_halfway: float = 1000.0, *, per_group: bool = True) -> Scores:
        """mc_weight * norm(MC) + (1 - mc_weight) * norm(first order); `mc_weight="auto"`: per
        channel n_off / (n_off + mc_halfway), n_off = samples in which the channel was off (the MC
        difference's noise shrinks as 1/sqrt(n_off), so it earns its weight as evidence grows).
        norm divides by the group's mean absolute value with `per_group`; without it both parts stay
        in the loss's units (the Monte-Carlo loss difference and the first-order loss change of
        switching the gate off), comparable across groups as they are."""
        mc, fo = self.monte_carlo(metric), self.first_order_estimate(first_order)
        norm = (lambda v: normalise(v, "mean")) if per_group else (lambda v: v.double())
        out: Scores = {}
        for gid in self.channels:
            first = norm(fo[gid])
            m = mc[gid]
            unseen = torch.isnan(m)
            m = norm(torch.where(unseen, torch.zeros_like(m), m))
            m = torch.where(unseen, first, m)
            if mc_weight == "auto":
                n_off = self.n_off[gid].cpu()
                w = n_off / (n_off + max(float(mc_halfway), 1e-12))
            else:
                w = torch.full_like(m, float(mc_weight))
            out[gid] = w * m + (1 - w) * first
        return out


@register("cac", needs=NEEDS_LABELS, defaults=DEFAULTS,
          summary="loss change with the channel randomly gated off vs on (Monte-Carlo + first order; reconstructed)",
          cost="1 forward + backward per batch, + 1 forward with paired=true")
class CAC(Criterion):
    def in_loss_units(self, options: dict[str, Any] | None = None) -> bool:
        # Loss changes of switching a channel off, in every group alike (the error rate with
        # metric=accuracy is another unit than the first-order part's: those are normalised per group).
        opts = {**self.defaults, **(options or {})}
        return str(opts["units"]) == "loss" and str(opts["metric"]) == "loss"

    def compute(self, run: ScoringRun) -> Scores:
        opts, device = run.options, run.device
        metric = choice(self.name, "metric", opts["metric"], ("loss", "accuracy"))
        choice(self.name, "units", opts["units"], ("loss", "group"))
        first_order = choice(self.name, "first_order", opts["first_order"], ("abs", "signed"))
        mc_weight: float | str = opts["mc_weight"]
        if mc_weight != "auto":
            try:
                mc_weight = float(mc_weight)
            except ValueError:
                mc_weight = -1.0
            if not 0 <= mc_weight <= 1:
                raise UserError(f"criterion 'cac': mc_weight must be 'auto' or a number in [0, 1], got {opts['mc_weight']!r}")
        if not 0 < opts["drop_prob"] < 1:
            raise UserError(f"criterion 'cac': drop_prob must be between 0 and 1, got {opts['drop_prob']}")
        assert run.data is not None
        with working_model(run.model, device) as net, ChannelGates(net, run.graph) as gates:
            est = CACEstimator(gates.channels, device, drop_prob=opts["drop_prob"], seed=run.seed)
            classes = output_classes(net, run.graph, device, self.name)
            for x, y in batches(run.data, device, description="cac", need_labels=True, classes=classes):
                assert y is not None
                clean_losses = clean_correct = None
                if opts["paired"]:
                    gates.gates = {}
                    with torch.no_grad():
                        clean = task_logits(net, x, device, opts["amp"])
                    clean_losses, clean_correct = F.cross_entropy(clean, y, reduction="none"), clean.argmax(-1) == y
                g = est.draw(x.shape[0])
                gates.gates = dict(g)
                logits = task_logits(net, x, device, opts["amp"])
                losses = F.cross_entropy(logits, y, reduction="none")
                grads = gradients(losses.sum(), list(g.values()))
                est.update(losses, logits.argmax(-1) == y, g, dict(zip(g, grads)),
                           clean_losses=clean_losses, clean_correct=clean_correct)
            gates.gates = {}
        return est.scores(mc_weight, metric, first_order, mc_halfway=opts["mc_halfway"],
                          per_group=not self.in_loss_units(dict(opts)))
