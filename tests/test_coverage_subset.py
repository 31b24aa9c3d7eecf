"""A fast slice of bench/coverage.py for CI: torchvision CNNs of different families, small inputs.

Each model: build the channel graph (eval + train mode), remove 30 % of every prunable group by
L1 norm, verify against the masked original, then run one training step on the pruned model.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

from chanprune_cli.engine.allocate import AllocationOptions
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.prune import pruning
from chanprune_cli.prune.scoring import compute_scores

# (name, input side): one model per coupling family — residual adds, channel shuffle + split,
# concat (fire modules), depthwise + SE + stochastic depth, train-only auxiliary heads, grouped conv.
MODELS = [
    ("resnet18", 64),
    ("shufflenet_v2_x0_5", 64),
    ("squeezenet1_1", 64),
    ("mobilenet_v3_small", 64),
    ("googlenet", 32),
    ("regnet_x_400mf", 32),
]


@pytest.mark.parametrize("name,side", MODELS, ids=[m for m, _ in MODELS])
def test_prune_verify_and_train(name: str, side: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    shape = (3, side, side)
    graph = build_graph(model, shape)
    assert graph.prunable_groups(), f"{name}: nothing prunable"
    scores = compute_scores(model, graph, "l1", None, torch.device("cpu"))
    outcome = pruning.prune(model, graph, scores, shape, criterion="l1", options=AllocationOptions(ratio=0.3))
    assert outcome.verify is not None and outcome.verify.passed
    assert outcome.after["params"] < outcome.before["params"]
    pruned = outcome.model.train()
    out = pruned(torch.randn(2, *shape))
    heads = list(out) if isinstance(out, tuple) else [out]  # GoogLeNet trains its aux heads too
    sum(torch.nn.functional.cross_entropy(h, torch.tensor([0, 1])) for h in heads).backward()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad and p.numel())
