"""The op-rule table: a functional op chanprune does not know, taught with one registration.

`torch.roll` over the spatial axes moves each channel's map on its own, so channels pass through
it; the engine has no rule for it, so left alone it pins the channels it touches. The rule below
is written in this file only (no engine code changes): registered, the model is pruned and
verified, traced by torch.fx or recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from chanprune_cli.engine import OpCall, op_rule_for, op_rules, register_op_rule
from chanprune_cli.engine.graph import ChannelGraph, ChannelGroup, build_graph
from chanprune_cli.engine.surgery import prune_model, verify
from engine_helpers import randomize

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 10, 10)


def roll(call: OpCall) -> bool:
    """torch.roll moves elements along `dims`: the channels stay where they are unless a rolled
    axis carries them (then a removed channel would change where the others land)."""
    x = call.label(call.node.args[0])
    dims = call.argument(2, "dims")
    if x is None or dims is None:  # no dims: rolls the flattened tensor
        return False
    if any(d % x.dim() in call.varying_axes(x) for d in ([dims] if isinstance(dims, int) else dims)):
        call.pin_inputs(f"roll over channels ({call.node.name})")
        call.set_output(None)
    else:
        call.set_output(x)
    return True


class Shifted(nn.Module):
    """conv1 → BN → ReLU → roll → conv2 → mean over space → fc. `form`: how roll is called;
    `dims`: the rolled axes; `record`: control flow on a tensor's size, so torch.fx cannot trace
    it and a real forward is recorded instead."""

    def __init__(self, form: str = "function", dims: tuple[int, ...] = (2, 3), record: bool = False) -> None:
        super().__init__()
        self.form, self.dims, self.record = form, dims, record
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        shifts = (1, -2)[:len(self.dims)]
        if self.form == "function":
            x = torch.roll(x, shifts=shifts, dims=self.dims)
        else:
            x = x.roll(shifts, self.dims)
        if self.record and x.shape[-1] % 2 == 0:  # a Python condition on a size: torch.fx cannot trace it
            x = x * 0.5
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test are undone afterwards."""
    monkeypatch.setattr(op_rules, "_OPS", dict(op_rules._OPS))
    yield


def conv1_group(model: nn.Module) -> tuple[ChannelGraph, ChannelGroup]:
    graph = build_graph(model, SHAPE)
    return graph, next(g for g in graph.groups if g.name == "conv1")


@pytest.mark.parametrize("form", ["function", "method"])
def test_an_unknown_op_pins_the_channels_it_touches_naming_it(table: None, form: str) -> None:
    assert op_rule_for(torch.roll) is None and op_rule_for("roll") is None
    _, group = conv1_group(randomize(Shifted(form)))
    assert not group.prunable and "unsupported op roll (roll)" in (group.reason or "")


@pytest.mark.parametrize(("form", "record"), [("function", False), ("method", False), ("function", True)])
def test_a_registered_op_is_followed_and_the_model_pruned_and_verified(table: None, form: str, record: bool) -> None:
    register_op_rule(torch.roll, roll)
    register_op_rule("roll", roll)
    torch.manual_seed(0)
    model = randomize(Shifted(form, record=record))
    graph, group = conv1_group(model)
    assert graph.tracing == ("recorded" if record else "fx")
    assert group.prunable and group.reason is None and group.channels == 8
    assert {m for slots in group.classes for m, _, _ in slots} == {"conv1", "bn1", "conv2"}

    plan = {group.id: [1, 4, 6]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert pruned.conv1.out_channels == pruned.bn1.num_features == pruned.conv2.in_channels == 5
    assert verify(model, graph, plan, pruned, SHAPE).passed


def test_a_rule_pins_with_its_own_reason(table: None) -> None:
    # Rolled over the channel axis, a removed channel would shift where the others land.
    register_op_rule(torch.roll, roll)
    _, group = conv1_group(randomize(Shifted(dims=(1,))))
    assert not group.prunable and group.reason == "roll over channels (roll)"


def test_default_entries_are_table_entries_and_can_be_replaced(table: None) -> None:
    # The built-in ops are the table's default entries; replacing one changes what the engine does.
    model = randomize(Shifted())
    register_op_rule(torch.roll, roll)
    assert conv1_group(model)[1].prunable
    assert op_rule_for(torch.relu) is not None and op_rule_for("view") is not None and op_rule_for(torch.cat) is not None
    register_op_rule(torch.relu, lambda call: False)  # "cannot follow"
    _, group = conv1_group(model)
    assert not group.prunable and "unsupported op relu (relu)" in (group.reason or "")


def test_registration_checks_its_arguments(table: None) -> None:
    with pytest.raises(TypeError):
        register_op_rule(3, roll)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_op_rule(torch.roll, "roll")  # type: ignore[arg-type]
