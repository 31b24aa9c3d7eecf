"""How closely `--target-flops` is met, in the MACs the reports show (fvcore's count).

For each model, allocate a global MACs target from random scores (several seeds) and from L1
norms, prune, and count the pruned model's MACs with `measure.count_macs`. Prints the fraction of
MACs removed per seed. Random weights (the count does not depend on them; L1 ranks them). The recorded run, from
this tree and from a `git worktree` of an older commit:

    .venv/bin/python bench/target_flops.py --target 0.5 --seeds 6
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import TYPE_CHECKING

import torch
import torchvision

from chanprune_cli.engine.allocate import AllocationOptions, allocate
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.engine.surgery import prune_model
from chanprune_cli.measure import count_macs
from chanprune_cli.models import build_model, parse_arch
from chanprune_cli.prune.scoring import compute_scores
from provenance import describe, provenance

if TYPE_CHECKING:
    from chanprune_cli.engine.graph import ChannelGraph

MODELS = {
    "cifar_resnet56": (lambda: build_model(parse_arch("cifar_resnet56", None)), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (3, 96, 96)),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(), (3, 96, 96)),
    "resnet18_groupnorm": (lambda: torchvision.models.resnet18(norm_layer=lambda c: torch.nn.GroupNorm(8, c)),
                           (3, 64, 64)),
}


def removed_pct(model: torch.nn.Module, graph: ChannelGraph, shape: tuple[int, int, int], before: int,
                scores: dict[int, torch.Tensor], target: float) -> str:
    """Percent of `model`'s MACs (`before`, by fvcore) that pruning to `target` by `scores` removes."""
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, allocate(graph, scores, AllocationOptions(target_flops=target)).plan)
    return f"{100 * (1 - count_macs(pruned, shape) / before):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    print(describe(provenance()) + "\n")
    print(f"| model | scores | MACs removed by fvcore (target {args.target:.0%}) |\n|---|---|---|")
    for name in args.models.split(","):
        make, shape = MODELS[name]
        torch.manual_seed(0)
        model = make().eval()
        graph = build_graph(model, shape)
        before = count_macs(model, shape)
        randoms = []
        for seed in range(args.seeds):
            g = torch.Generator().manual_seed(seed)
            scores = {grp.id: torch.rand(grp.channels, generator=g, dtype=torch.float64) for grp in graph.prunable_groups()}
            randoms.append(removed_pct(model, graph, shape, before, scores, args.target))
        print(f"| {name} {'x'.join(map(str, shape))} | random, seeds 0-{args.seeds - 1} | {', '.join(randoms)} |")
        l1 = compute_scores(model, graph, "l1", None, torch.device("cpu"))
        print(f"| {name} | l1 | {removed_pct(model, graph, shape, before, l1, args.target)} |", flush=True)


if __name__ == "__main__":
    main()
