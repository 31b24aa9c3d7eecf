"""`taylor`: first-order Taylor importance of a channel gate (Molchanov et al., CVPR 2019).

Every channel class gets a gate g = 1 multiplied onto its final value (the output of its
BatchNorm, or of its producer when no BatchNorm follows; every producer of a residual class shares
the gate). For each labelled batch, the mean cross-entropy L is back-propagated to the gates only
(no weight gradients are computed) and the channel's importance is

    variant=squared (default, the paper's "Taylor-FO on gates"):  mean over batches of (dL/dg)^2
    variant=abs     (Molchanov et al. 2017 style):             mean over batches of |dL/dg|

Since dL/dg at g = 1 equals sum over positions of activation * gradient, `abs` is the
|sum activation*gradient| criterion. `per_sample=true` squares (or takes |.|) the gradient of
every sample separately (per-sample gates) instead of the batch-mean gradient: less dependent on
batch size, a little more memory.

Options: variant=squared|abs, per_sample=false, amp=false (bf16 autocast, CUDA only).
The model is scored in eval mode (BatchNorm running statistics); it is left unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.graph import ChannelGraph
from .base import NEEDS_LABELS, Batch, Criterion, Scores, ScoringRun, register
from .gates import (
    ChannelGates,
    batches,
    choice,
    gradients,
    output_classes,
    task_logits,
    working_model,
)

DEFAULTS: dict[str, Any] = {"variant": "squared", "per_sample": False, "amp": False}


@register("taylor", needs=NEEDS_LABELS, defaults=DEFAULTS,
          summary="first-order Taylor: (dLoss/dgate)^2 of each channel over labelled batches",
          cost="1 forward + backward per batch")
class Taylor(Criterion):
    def in_loss_units(self, options: dict[str, Any] | None = None) -> bool:
        return True  # (dL/dg)^2 or |dL/dg| of one loss, whatever the layer

    def compute(self, run: ScoringRun) -> Scores:
        opts = run.options
        variant = choice(self.name, "variant", opts["variant"], ("squared", "abs"))
        assert run.data is not None
        return gate_gradients(run.model, run.graph, run.data, run.device, squared=variant == "squared",
                              per_sample=opts["per_sample"], amp=opts["amp"], description=self.name)


def gate_gradients(model: nn.Module, graph: ChannelGraph, data: Iterable[Batch], device: torch.device, *,
                   squared: bool = True, per_sample: bool = False, amp: bool = False,
                   description: str = "taylor") -> Scores:
    """Per group: the mean over labelled batches of (dL/dg)^2 (`squared`) or |dL/dg| of every
    channel's gate g = 1, L the batch-mean cross-entropy (`per_sample`: each sample's own)."""
    with working_model(model, device) as net, ChannelGates(net, graph) as gates:
        total = {gid: torch.zeros(c, dtype=torch.float64, device=device) for gid, c in gates.channels.items()}
        steps = 0
        classes = output_classes(net, graph, device, description)  # labels checked on the host, before they move
        for x, y in batches(data, device, description=description, need_labels=True, classes=classes):
            assert y is not None
            lead = (x.shape[0],) if per_sample else ()
            g = {gid: torch.ones((*lead, c), device=device, requires_grad=True) for gid, c in gates.channels.items()}
            gates.gates = dict(g)
            logits = task_logits(net, x, device, amp)
            loss = F.cross_entropy(logits, y, reduction="sum" if per_sample else "mean")
            grads = gradients(loss, list(g.values()))
            for gid, grad in zip(g, grads):
                if grad is None:
                    continue
                grad = grad.double()
                contrib = grad.square() if squared else grad.abs()
                total[gid] += contrib.mean(0) if per_sample else contrib
            steps += 1
        gates.gates = {}
    return {gid: (t / max(steps, 1)).cpu() for gid, t in total.items()}
