"""`sensitivity`: second-order (OBD-style) saliency of a channel's weights. *Reconstructed.*

The saliency of removing weights w is the loss increase a quadratic model predicts, 1/2 w^T H w.
`fisher=block` (default, with `hessian=fisher`): H is the empirical Fisher over the parameters
whose zeroing removes the channel (its BatchNorm's gamma and beta where one follows its producers,
else the producers' filter rows and biases), so the saliency is 1/2 E[(sum_q g_q w_q)^2] over
calibration batches, which is 1/2 E[(dL/dgate)^2] of a gate on the channel's final value: one
forward and backward per batch, half of `taylor`'s score.
`fisher=diagonal`: per weight q the saliency is 1/2 * H_qq * w_q^2 (the loss increase a diagonal
quadratic model predicts when w_q is set to 0); a channel scores the sum over the weights that
produce it: the filter rows (and bias entries) of every producer of its class.

Where chanprune follows the method and where it departs: no code was released with the method,
whose description gives the per-weight saliency 1/2 * H_qq * w_q^2 summed over a channel, H from
the empirical Fisher or a label-free layer-wise Hessian, and layer sensitivity (the Hessian trace)
to share a global target between layers. All of that is here (`fisher=diagonal`,
`hessian=activation`, `layer_allocation`). The default departs from the diagonal: summing
per-weight saliencies drops the cross terms between the parameters of one channel, which decide
its removal, and ranked channels no better than chance (ResNet-20, inner channels, half the MACs,
16 x 64 calibration images, BN-recalibrated, top-1 on 1 000 training images calibration never saw:
diagonal 31.7 %, diagonal over the BatchNorm parameters alone 36.2 %, random 34.0 %, l1 45.7 %;
the block over the removal parameters 55.1 %, the same ranking as `taylor`). A channel is the
unit removed, so its block of the Fisher is the second-order model of its removal.

`hessian=fisher`, `fisher=diagonal` (needs labels): H_qq is the empirical Fisher diagonal, the mean over
calibration batches of the squared gradient of the batch-mean cross-entropy w.r.t. w_q. Squaring
the *batch* gradient instead of per-sample gradients is the common cheap approximation (one
backward per batch): near a trained minimum, where the mean gradient is small, it is about
1/batch-size of the per-sample Fisher, a factor common to all weights, but noisier (one gradient
sample per batch), so give it a few dozen batches. The BatchNorm gamma/beta entries of the class
(if any) are included with their own Fisher diagonal (`include_norm`): everything is in loss units.

`hessian=activation` (label-free): the layer-wise Hessian of a layer's output error, whose
diagonal is E[x^2] of the inputs the weight multiplies: for a conv weight (o, c, kh, kw) the mean
over images and output positions of x_c^2 at the shifted, strided (zero-padded) position; for a
linear weight (o, c) the mean of x_c^2. It measures the error at the producer's output, which a
following BatchNorm rescales by gamma / sqrt(running_var + eps); that factor squared is applied so
that channels compare in the units of the normalised output (otherwise BatchNorm would undo any
rescaling of the filter). BatchNorm parameters are not counted in this mode. Transposed convs use
E[x_c^2] (mean over positions) for every kernel offset, an approximation.

Layer sensitivity (`layer_sensitivity()`): per group, the mean Hessian diagonal over all weights
of its producers (trace / number of weights), normalised to mean 1 over the groups. With
`layer_allocation=true` each group's scores are multiplied by it, so that a global ranking keeps
more channels in layers with a larger Hessian trace (off by default: on the CIFAR ResNet-56 at 50 %
MACs it concentrated the pruning in a few layers and cost 26 points of top-1 after BN
recalibration, 46.1 % vs 72.5 %, see BENCHMARKS.md); the weights are also attached
to the result as `scores.group_weights` for an allocator that normalises each group's scores.
`--target-flops` multiplies each group's scores by `group_weights` (kept in score files too), so
the layer sensitivity reaches the global ranking; with the Fisher Hessian the scores are loss
increases and are ranked across groups as they are (`--normalize auto`), with the activation
Hessian each group is first divided by its mean score. Uniform `--ratio`
pruning ranks within each group and is unaffected.

Options: hessian=fisher|activation, fisher=block|diagonal, layer_allocation=false,
include_norm=true (fisher=diagonal: add the BatchNorm gamma/beta saliency), amp=false (bf16
autocast on CUDA; statistics kept in float32).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.graph import ChannelGraph, ChannelGroup
from ..engine.layer_rules import PRODUCER_KINDS, rule_for
from .base import (
    NEEDS_DATA,
    NEEDS_LABELS,
    Batch,
    Criterion,
    Scores,
    ScoringRun,
    WeightedScores,
    register,
)
from .gates import (
    batches,
    choice,
    find_bn_pairs,
    forward_pass,
    gradients,
    output_classes,
    producer_channels,
    task_logits,
    working_model,
)
from .taylor import gate_gradients

# The Hessian estimates below are the math of convolution and BatchNorm themselves.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_BN = nn.modules.batchnorm._BatchNorm

DEFAULTS: dict[str, Any] = {"hessian": "fisher", "fisher": "block", "layer_allocation": False, "include_norm": True,
                            "amp": False}


def _producers(graph: ChannelGraph, groups: list[ChannelGroup]) -> set[str]:
    return {m for g in groups for slots in g.classes for m, k, _ in slots if k in PRODUCER_KINDS}


def _conv_pads(module: nn.Module) -> list[int]:
    """F.pad amounts (last dimension first) that pad like the conv itself does."""
    pads: list[int] = []
    if isinstance(module.padding, str):  # "valid" needs none; "same" pads like the module does
        if module.padding == "same":
            for d, k in reversed(list(zip(module.dilation, module.kernel_size))):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
    else:
        for p in reversed(module.padding):
            pads += [p, p]
    return pads


def _energy_map(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One batch's share of `_input_energy`: for a conv, the batch mean of x^2, padded as the conv
    pads x ([1, C, *padded size]); for a linear layer or a transposed conv already the E[x^2]
    per input channel. Linear in x^2, so batches average before the per-offset slicing of
    `_patch_energy` (which then runs once per scoring, not once per batch)."""
    x2 = x.detach().float().square()
    if isinstance(module, nn.Linear):
        return x2.reshape(-1, x2.shape[-1]).mean(0)
    if isinstance(module, _CONV_T):
        return x2.mean(dim=[0, *range(2, x2.dim())])
    assert isinstance(module, _CONV)
    m = x2.mean(0, keepdim=True)
    pads = _conv_pads(module)
    if any(pads):
        # Padding x^2 the way the module pads x is exact for every padding mode ((pad x)^2 = pad x^2),
        # and padding commutes with the batch mean.
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        m = F.pad(m, pads, mode=mode)
    return m


def _patch_energy(module: nn.Module, m: torch.Tensor) -> torch.Tensor:
    """`_input_energy` from (the average of) `_energy_map`s."""
    if isinstance(module, nn.Linear):
        return m
    if isinstance(module, _CONV_T):
        return m.reshape(-1, *([1] * len(module.kernel_size))).expand(-1, *module.kernel_size)
    sizes = m.shape[2:]
    out = [(s - d * (k - 1) - 1) // st + 1 for s, d, k, st in zip(sizes, module.dilation, module.kernel_size, module.stride)]
    h = torch.empty((m.shape[1], *module.kernel_size), device=m.device)
    for offs in itertools.product(*[range(k) for k in module.kernel_size]):
        sl = [slice(None), slice(None)] + [slice(o * d, o * d + st * (n - 1) + 1, st)
                                           for o, d, st, n in zip(offs, module.dilation, module.stride, out)]
        h[(slice(None), *offs)] = m[tuple(sl)].mean(dim=[0, *range(2, m.dim())])
    return h


def _input_energy(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-weight-input Hessian diagonal E[x^2]: [in_channels, *kernel] for convs, [in] for linear."""
    return _patch_energy(module, _energy_map(module, x))


def _weight_hessian(module: nn.Module, h_in: torch.Tensor) -> torch.Tensor:
    """The activation-Hessian diagonal for every weight of `module`, shaped like its weight."""
    w = module.weight
    if isinstance(module, nn.Linear):
        return h_in.unsqueeze(0).expand_as(w)
    if isinstance(module, _CONV_T):  # weight [in, out/g, *k]: input channel energy for every output
        return h_in.unsqueeze(1).expand_as(w)
    g = module.groups
    cpg, opg = module.in_channels // g, module.out_channels // g
    per_group = h_in.reshape(g, cpg, *h_in.shape[1:])
    return per_group.repeat_interleave(opg, dim=0)  # row o uses the inputs of its conv group o // opg


def fisher_diagonals(net: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], data: Iterable[Batch],
                     device: torch.device, *, include_norm: bool, amp: bool) -> dict[tuple[str, str], torch.Tensor]:
    """(module, parameter name) -> mean squared batch gradient, for producers (+ their BatchNorms)."""
    modules = dict(net.named_modules())
    names = _producers(graph, groups)
    if include_norm:
        names |= {m for g in groups for slots in g.classes for m, k, _ in slots if k == "norm" and isinstance(modules[m], _BN)}
    params = [((m, pn), p) for m in sorted(names) for pn, p in modules[m].named_parameters(recurse=False) if pn in ("weight", "bias")]
    sums = {key: torch.zeros_like(p, dtype=torch.float32) for key, p in params}
    for _, p in params:
        p.requires_grad_(True)
    steps = 0
    classes = output_classes(net, graph, device, "sensitivity")
    for x, y in batches(data, device, description="sensitivity (fisher)", need_labels=True, classes=classes):
        assert y is not None
        logits = task_logits(net, x, device, amp)
        loss = F.cross_entropy(logits, y)
        grads = gradients(loss, [p for _, p in params])
        got = [(sums[key], grad.float()) for (key, _), grad in zip(params, grads) if grad is not None]
        if got:  # sum += grad^2 for every parameter in one multi-tensor kernel (not two per parameter)
            acc, g = [a for a, _ in got], [b for _, b in got]
            torch._foreach_addcmul_(acc, g, g)
        steps += 1
    return {key: s / max(steps, 1) for key, s in sums.items()}


def activation_diagonals(net: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], data: Iterable[Batch],
                         device: torch.device, *, amp: bool) -> dict[str, torch.Tensor]:
    """producer module -> mean E[x^2] of its input patches ([in, *kernel] or [in])."""
    modules = dict(net.named_modules())
    names = sorted(_producers(graph, groups))
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def pre_hook(name: str) -> Any:
        def hook(m: nn.Module, inputs: Any) -> None:
            h = _energy_map(m, inputs[0])
            sums[name] = sums[name] + h if name in sums else h
        return hook

    for name in names:
        handles.append(modules[name].register_forward_pre_hook(pre_hook(name)))
    try:
        steps = forward_pass(net, data, device, description="sensitivity (activation)", amp=amp)
    finally:
        for h in handles:
            h.remove()
    return {k: _patch_energy(modules[k], v / max(steps, 1)) for k, v in sums.items()}


def _full_hessian(m: nn.Module, name: str, hessian: str, diag: dict[Any, torch.Tensor]) -> torch.Tensor | None:
    if hessian == "fisher":
        return diag.get((name, "weight"))
    return _weight_hessian(m, diag[name]) if name in diag else None


def _saliencies(net: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], hessian: str,
                diag: dict[Any, torch.Tensor], include_norm: bool) -> tuple[Scores, dict[int, float]]:
    """Per group: the saliency of every class, and the group's mean Hessian diagonal (normalised).

    The device computes one saliency per weight row (output channel) of every module and one
    Hessian sum per module, and hands them over in one transfer; the sums over each class's rows
    are host arithmetic (a read per channel would make the host wait for the device each time)."""
    modules = dict(net.named_modules())
    pairs = find_bn_pairs(net, graph, _producers(graph, groups)) if hessian == "activation" else {}
    # What every class reads: producer rows (module, rows) and BatchNorm entries (module, index).
    producer_rows: dict[str, set[int]] = {}
    uses: list[tuple[int, int, str, str, Any]] = []  # (group id, class, kind, module, rows or index)
    for g in groups:
        for ci, slots in enumerate(g.classes):
            for name, kind, index in slots:
                m = modules[name]
                if kind in PRODUCER_KINDS and getattr(m, "weight", None) is not None:
                    rows = producer_channels(m, kind, index)
                    producer_rows.setdefault(name, set()).update(rows)
                    uses.append((g.id, ci, "rows", name, rows))
                elif kind == "norm" and hessian == "fisher" and include_norm and isinstance(m, _BN) and (name, "weight") in diag:
                    uses.append((g.id, ci, "norm", name, index))
    parts: list[torch.Tensor] = []  # float64 on the device, concatenated for one transfer
    layout: dict[tuple[str, str], tuple[int, int]] = {}  # -> (offset, length) in `parts`
    offset = 0

    def add(key: tuple[str, str], values: torch.Tensor) -> None:
        nonlocal offset
        parts.append(values.detach().double().reshape(-1))
        layout[key] = (offset, parts[-1].numel())
        offset += parts[-1].numel()

    numel: dict[str, int] = {}
    position: dict[str, dict[int, int]] = {}  # module -> output channel -> its place in the "rows" values
    for name in sorted(producer_rows):
        m = modules[name]
        full = _full_hessian(m, name, hessian, diag)
        if full is None:
            continue
        rows = sorted(producer_rows[name])
        rule = rule_for(m)
        w2 = rule.weight_rows(m, m.weight.detach().float(), rows).square()
        per_row = (rule.weight_rows(m, full, rows) * w2).flatten(1).sum(1)
        if hessian == "fisher":
            if getattr(m, "bias", None) is not None and (name, "bias") in diag:
                per_row = per_row + diag[(name, "bias")][rows] * m.bias.detach()[rows].float().square()
        else:
            bn = modules.get(pairs.get(name, ""))
            if isinstance(bn, _BN) and bn.weight is not None and bn.running_var is not None:
                idx = torch.tensor(rows, device=bn.weight.device)
                factor = bn.weight.detach().float()[idx].square() / (bn.running_var.float()[idx] + bn.eps)
                per_row = per_row * factor.to(per_row.device)
        add((name, "rows"), per_row)
        add((name, "trace"), full.double().sum())
        numel[name] = full.numel()
        position[name] = {r: i for i, r in enumerate(rows)}
    for name in sorted({u[3] for u in uses if u[2] == "norm"}):
        m = modules[name]
        add((name, "norm_w"), diag[(name, "weight")] * m.weight.detach().float() ** 2)
        if (name, "bias") in diag:
            add((name, "norm_b"), diag[(name, "bias")] * m.bias.detach().float() ** 2)
    host = torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.float64)

    def values(key: tuple[str, str]) -> torch.Tensor:
        start, length = layout[key]
        return host[start:start + length]

    scores: Scores = {g.id: torch.zeros(g.channels, dtype=torch.float64) for g in groups}
    trace_sum: dict[int, float] = dict.fromkeys(scores, 0.0)
    trace_n: dict[int, int] = dict.fromkeys(scores, 0)
    seen: set[tuple[int, str]] = set()
    for gid, ci, what, name, where in uses:
        if what == "rows":
            if (name, "rows") not in layout:
                continue  # no Hessian for this module
            index = position[name]
            scores[gid][ci] += 0.5 * float(values((name, "rows"))[[index[r] for r in where]].sum())
            if (gid, name) not in seen:
                seen.add((gid, name))
                trace_sum[gid] += float(values((name, "trace"))[0])
                trace_n[gid] += numel[name]
        else:
            val = 0.5 * float(values((name, "norm_w"))[where])
            if (name, "norm_b") in layout:
                val += 0.5 * float(values((name, "norm_b"))[where])
            scores[gid][ci] += val
    trace = {gid: trace_sum[gid] / max(trace_n[gid], 1) for gid in scores}
    mean = sum(trace.values()) / max(len(trace), 1)
    weights = {gid: (t / mean if mean > 0 else 1.0) for gid, t in trace.items()}
    return scores, weights


def _diagonals(net: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup], data: Iterable[Batch],
               device: torch.device, hessian: str, include_norm: bool, amp: bool) -> dict[Any, torch.Tensor]:
    if hessian == "fisher":
        return fisher_diagonals(net, graph, groups, data, device, include_norm=include_norm, amp=amp)
    return activation_diagonals(net, graph, groups, data, device, amp=amp)


def layer_sensitivity(model: nn.Module, graph: ChannelGraph, data: Iterable[Batch], device: torch.device | str = "cpu",
                      *, hessian: str = "fisher", amp: bool = False) -> dict[int, float]:
    """Per prunable group: mean Hessian diagonal over its producers' weights, normalised to mean 1."""
    choice("sensitivity", "hessian", hessian, ("fisher", "activation"))
    device = torch.device(device)
    groups = graph.prunable_groups()
    with working_model(model, device) as net:
        diag = _diagonals(net, graph, groups, data, device, hessian, False, amp)
        return _saliencies(net, graph, groups, hessian, diag, False)[1]


@register("sensitivity", needs=NEEDS_LABELS, defaults=DEFAULTS,
          summary="second-order saliency 1/2*H*w^2 of the channel's weights (Fisher or activation Hessian; reconstructed)",
          cost="1 forward + backward per batch (fisher); 1 forward (activation)")
class Sensitivity(Criterion):
    def in_loss_units(self, options: dict[str, Any] | None = None) -> bool:
        # The Fisher saliency is a loss increase; the activation Hessian is each layer's own output error.
        return str({**self.defaults, **(options or {})}["hessian"]) == "fisher"

    def requires(self, options: dict[str, Any] | None = None) -> str:
        return NEEDS_DATA if (options or {}).get("hessian", DEFAULTS["hessian"]) == "activation" else NEEDS_LABELS

    def compute(self, run: ScoringRun) -> Scores:
        opts, graph = run.options, run.graph
        hessian = choice(self.name, "hessian", opts["hessian"], ("fisher", "activation"))
        block = choice(self.name, "fisher", opts["fisher"], ("block", "diagonal")) == "block" and hessian == "fisher"
        assert run.data is not None
        groups = graph.prunable_groups()
        if block:
            # 1/2 E[(sum_q g_q w_q)^2] over the channel's removal parameters = 1/2 E[(dL/dgate)^2]
            scores = {gid: 0.5 * v for gid, v in gate_gradients(run.model, graph, run.data, run.device, amp=opts["amp"],
                                                                 description="sensitivity (fisher, block)").items()}
            weights = (layer_sensitivity(run.model, graph, run.data, run.device, amp=opts["amp"])
                       if opts["layer_allocation"] else dict.fromkeys(scores, 1.0))
        else:
            with working_model(run.model, run.device) as net:
                diag = _diagonals(net, graph, groups, run.data, run.device, hessian, opts["include_norm"], opts["amp"])
                scores, weights = _saliencies(net, graph, groups, hessian, diag, opts["include_norm"])
        result = WeightedScores()
        for gid, s in scores.items():
            result[gid] = s * weights[gid] if opts["layer_allocation"] else s
        result.group_weights = weights if opts["layer_allocation"] else dict.fromkeys(scores, 1.0)
        return result
