"""One forward of the model as a graph, and its channel ids propagated.

torch.fx traces the model symbolically and an interpreter runs the trace once on the example
input to learn every tensor's shape and every Python value (sizes, split points). Where torch.fx
cannot trace the model, one real forward is recorded instead (`recording`). Either graph is then
walked by the `Propagator`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .labels import UnionFind
from .layer_rules import ModuleCost, TraceOptions, is_registered_leaf
from .propagate import Propagator
from .recording import record, summarize


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph)


class _ShapeInterpreter(fx.Interpreter):
    """Runs the traced model once, keeping shapes of tensors and values of everything else."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = summarize(result)
        return result


def propagate_mode(model: nn.Module, example: Any, train: bool, uf: UnionFind,
                   costs: dict[str, ModuleCost], unfollowed: list[str], options: TraceOptions) -> str:
    """Trace `model` in one mode and propagate channel ids; returns how it was traced: "fx"
    (symbolic) or "recorded" (one real forward, for models torch.fx cannot trace)."""
    subject = copy.deepcopy(model) if train else model  # train mode updates BN statistics
    was_training = subject.training
    subject.train(train)
    try:
        try:
            gm = trace(subject)
        except Exception:  # noqa: BLE001  (control flow, iterated proxies, ...: record a real run instead)
            recording = record(subject, example, _Tracer().is_leaf_module)
            Propagator(recording.graph, dict(subject.named_modules()), recording.values, uf, costs, unfollowed, options).run()
            return "recorded"
        interpreter = _ShapeInterpreter(gm)
        with torch.no_grad():
            interpreter.run(example)
        Propagator(gm.graph, dict(subject.named_modules()), interpreter.values, uf, costs, unfollowed, options).run()
        return "fx"
    finally:
        subject.train(was_training)
