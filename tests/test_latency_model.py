"""The latency model and the latency allocation (engine/latency.py, allocate's `target_latency`):
table lookups and their staircase, the allocation preferring channels that cost much time for
little importance, snapping to the fastest width, floors and fixed ratios, unreachable budgets.
Tables here are made up (no timing), so every assertion is exact."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Mapping

import pytest
import torch
from torch import nn

from chanprune_cli.engine.allocate import AllocationOptions, allocate
from chanprune_cli.engine.graph import ChannelGraph, build_graph
from chanprune_cli.engine.latency import (
    LatencyBudget,
    LatencyGoal,
    LatencyModel,
    LatencyUnreachable,
    LayerAxis,
    LayerTable,
    Remainder,
    layer_axes,
    parse_latency_goal,
)
from chanprune_cli.errors import UserError
from chanprune_cli.models import build_model, parse_arch


def test_table_interpolates_between_grid_points_and_keeps_measured_ones() -> None:
    table = LayerTable(((8, 16, 32), (4, 8)), (1.0, 2.0, 3.0, 5.0, 9.0, 4.0), (1, 1))
    assert float(table.at(8, 4)) == 1.0
    assert float(table.at(32, 8)) == 4.0  # slower at fewer outputs (9 at 4): kept as measured
    assert float(table.at(12, 4)) == pytest.approx(2.0)  # halfway from 8 to 16 at 4 outputs: (1 + 3) / 2
    assert float(table.at(16, 6)) == pytest.approx(4.0)  # halfway from 4 to 8 outputs at 16: (3 + 5) / 2
    assert float(table.at(2, 1)) == 1.0  # below the grid: as its narrowest point
    widths = torch.tensor([8, 12, 32])
    assert table.at(widths, 8).tolist() == pytest.approx([2.0, 3.5, 4.0])
    for i, o in itertools.product(range(33), range(9)):
        assert float(table.dense[i, o]) == float(table.at(i, o))


def test_table_staircase_charges_a_width_as_the_next_multiple() -> None:
    table = LayerTable(((8, 16, 24),), (1.0, 2.0, 3.0), (8,))
    assert [float(table.at(w)) for w in (8, 9, 15, 16, 17, 24)] == [1.0, 2.0, 2.0, 2.0, 3.0, 3.0]
    odd = LayerTable(((8, 10),), (1.0, 2.0), (8,))  # a full width off the multiples stays reachable
    assert float(odd.at(9)) == 2.0 and float(odd.at(10)) == 2.0
    assert table.aligned(0, 17) == 24 and odd.aligned(0, 9) == 10


def test_table_round_trips_through_json_and_refuses_a_bad_grid() -> None:
    table = LayerTable(((8, 16), (3,)), (1.0, 2.0), (8, 1))
    assert LayerTable.from_json(table.to_json()) == table
    with pytest.raises(ValueError):
        LayerTable(((16, 8),), (1.0, 2.0), (1,))
    with pytest.raises(ValueError):
        LayerTable(((8, 16),), (1.0,), (1,))


@pytest.mark.parametrize(("text", "goal"), [
    ("0.5", LatencyGoal(fraction=0.5)), (0.25, LatencyGoal(fraction=0.25)), ("12ms", LatencyGoal(ms=12.0)),
    ("0.8s", LatencyGoal(ms=800.0)), ("250us", LatencyGoal(ms=0.25)), (" 3.5 ms ", LatencyGoal(ms=3.5)),
])
def test_latency_goal_parses_fractions_and_times(text: object, goal: LatencyGoal) -> None:
    assert parse_latency_goal(text) == goal  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "message"), [
    ("0", "between 0 and 1"), ("1", "between 0 and 1"), ("1.5", "between 0 and 1"), ("-0.2", "between 0 and 1"),
    ("nan", "between 0 and 1"), ("fast", "or a time such as 12ms"), ("0ms", "a time must be positive"),
    ("12 minutes", "or a time such as 12ms"),
])
def test_bad_latency_goals_are_one_line_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        parse_latency_goal(text)


@pytest.mark.parametrize(("options", "message"), [
    ({"ratio": 0.5, "target_latency": 0.5}, "give exactly one of --ratio"),
    ({"target_flops": 0.5, "target_latency": "12ms"}, "give exactly one of --ratio"),
    ({"target_latency": 0.5, "cost_exponent": 1.0}, "drop --cost-exponent"),
    ({"target_latency": 2}, "--target-latency must be a fraction"),
])
def test_latency_options_are_checked_when_made(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        AllocationOptions(**options)


def test_latency_options_travel_parsed() -> None:
    options = AllocationOptions(target_latency="12ms", rounds=3)
    assert options.target_latency == LatencyGoal(ms=12.0) and options.rounds == 3


# --------------------------------------------------------------------------------------------
# made-up tables


class Chain(nn.Module):
    """conv a (3->16) -> conv b (16->16) -> conv c (16->16) -> pool -> fc: three prunable groups
    (a's, b's and c's outputs)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.bn(self.c(x)))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def chain() -> ChannelGraph:
    return build_graph(Chain().eval(), (3, 8, 8))


def _group_of(graph: ChannelGraph, producer: str) -> int:
    return next(g.id for g in graph.prunable_groups() if any(m == producer and k == "out" for c in g.classes for m, k, _ in c))


def _tables(graph: ChannelGraph, cost: Callable[[str, Mapping[str, int]], float], align: int = 1) -> dict[str, LayerTable]:
    """A table on every unit of every axis, `cost(layer, {kind: units})` at each point."""
    tables = {}
    for name, axes in layer_axes(graph).items():
        grid = tuple(tuple(range(1, a.full + 1)) for a in axes)
        ms = tuple(cost(name, {a.kind: u for a, u in zip(axes, point)}) for point in itertools.product(*grid))
        tables[name] = LayerTable(grid, ms, tuple(align for _ in axes))
    return tables


def _macs_like(weights: Mapping[str, float]) -> Callable[[str, Mapping[str, int]], float]:
    def cost(name: str, units: Mapping[str, int]) -> float:
        return weights.get(name, 1.0) * units.get("in", 16) * units.get("out", 16) / 256

    return cost


def _flat(graph: ChannelGraph) -> dict[int, torch.Tensor]:
    return {g.id: torch.ones(g.channels, dtype=torch.float64) for g in graph.prunable_groups()}


def _kept(graph: ChannelGraph, plan: Mapping[int, list[int]], producer: str) -> int:
    gid = _group_of(graph, producer)
    return next(g.channels for g in graph.groups if g.id == gid) - len(plan.get(gid, []))


def test_layer_axes_name_the_widths_plans_change(chain: ChannelGraph) -> None:
    axes = layer_axes(chain)
    assert axes["a"] == (LayerAxis("out", 16),)  # its 3 inputs are the image's
    assert axes["b"] == (LayerAxis("in", 16), LayerAxis("out", 16))
    assert axes["fc"] == (LayerAxis("in", 16),)  # its 4 outputs are the classes


def test_prediction_sums_the_tables_and_scales_the_remainder(chain: ChannelGraph) -> None:
    model = LatencyModel(chain, _tables(chain, _macs_like({})), Remainder(2.0, 1.0, 0.5))
    assert model.predict({}) == pytest.approx(1 + 1 + 1 + 1 + 2.0)  # a, b, c, fc; the rest at full width
    half = {_group_of(chain, "c"): list(range(8))}  # c's outputs, fc's inputs; bn's channels (the rest) halve too
    assert model.predict_plan(half) == pytest.approx(1 + 1 + 0.5 + 0.5 + 1.0)


def test_allocation_removes_where_time_is_dear_and_importance_cheap(chain: ChannelGraph) -> None:
    """Equal scores: the group whose layers cost most time per channel goes first."""
    model = LatencyModel(chain, _tables(chain, _macs_like({"c": 8.0})), Remainder(0.0))
    budget = LatencyBudget(model, 0.7 * model.predict({}))
    plan = allocate(chain, _flat(chain), AllocationOptions(target_latency=0.7), latency=budget).plan
    assert model.predict_plan(plan) <= budget.ms
    assert _kept(chain, plan, "b") < _kept(chain, plan, "a")  # b's outputs feed the dear c
    assert _kept(chain, plan, "b") < 16
    dear = LatencyModel(chain, _tables(chain, _macs_like({"a": 8.0})), Remainder(0.0))
    plan = allocate(chain, _flat(chain), AllocationOptions(target_latency=0.7),
                    latency=LatencyBudget(dear, 0.7 * dear.predict({}))).plan
    assert _kept(chain, plan, "a") < _kept(chain, plan, "b")


def test_allocation_keeps_the_important_channels(chain: ChannelGraph) -> None:
    """Same times everywhere: a group whose scores are all high keeps more than one scored low."""
    model = LatencyModel(chain, _tables(chain, _macs_like({})), Remainder(0.0))
    scores = _flat(chain)
    scores[_group_of(chain, "a")] = torch.full((16,), 10.0, dtype=torch.float64) + torch.arange(16)
    options = AllocationOptions(target_latency=0.6, normalize="none")
    plan = allocate(chain, scores, options, latency=LatencyBudget(model, 0.6 * model.predict({}))).plan
    assert _kept(chain, plan, "a") > _kept(chain, plan, "b")
    removed = plan.get(_group_of(chain, "a"), [])
    assert removed == sorted(range(16))[:len(removed)]  # the lowest scores first


def test_allocation_snaps_to_the_fastest_width_at_or_below(chain: ChannelGraph) -> None:
    """c's time only drops at 8 outputs (12 to 15 are as slow as 16, 9 to 11 slower): its group stops
    at 16 or at a width of 8 or less, never in between."""
    def stairs(name: str, units: Mapping[str, int]) -> float:
        if name != "c":
            return 0.01 * units.get("in", 16) * units.get("out", 16) / 256
        out = units.get("out", 16)
        return 4.0 if out >= 12 else (5.0 if out > 8 else 1.0 + out / 8)

    model = LatencyModel(chain, _tables(chain, stairs), Remainder(0.0))
    for fraction in (0.9, 0.7, 0.5):
        budget = LatencyBudget(model, fraction * model.predict({}))
        plan = allocate(chain, _flat(chain), AllocationOptions(target_latency=fraction, min_keep=1), latency=budget).plan
        kept = _kept(chain, plan, "c")
        assert kept == 16 or kept <= 8, (fraction, kept)
        assert model.predict_plan(plan) <= budget.ms


def test_overshoot_is_given_back(chain: ChannelGraph) -> None:
    """After the search, no group can keep one more channel within the budget."""
    model = LatencyModel(chain, _tables(chain, _macs_like({"b": 2.0})), Remainder(0.5, 0.25, 0.5))
    budget = LatencyBudget(model, 0.55 * model.predict({}))
    plan = allocate(chain, _flat(chain), AllocationOptions(target_latency=0.55), latency=budget).plan
    assert model.predict_plan(plan) <= budget.ms
    for gid, removed in plan.items():
        if removed:
            wider = {**plan, gid: removed[:-1]}
            assert model.predict_plan(wider) > budget.ms


def test_floors_round_to_and_fixed_ratios_hold(chain: ChannelGraph) -> None:
    model = LatencyModel(chain, _tables(chain, _macs_like({}), align=4), Remainder(0.0))
    budget = LatencyBudget(model, 0.6 * model.predict({}))
    options = AllocationOptions(target_latency=0.6, min_keep=0.5, round_to=4, layer_ratio=["a=0.25"])
    plan = allocate(chain, _flat(chain), options, latency=budget).plan
    assert _kept(chain, plan, "a") == 12  # its fixed ratio, whatever the budget
    for producer in ("b", "c"):
        kept = _kept(chain, plan, producer)
        assert kept >= 8 and kept % 4 == 0
    assert model.predict_plan(plan) <= budget.ms


def test_unreachable_budget_says_how_close_it_got(chain: ChannelGraph) -> None:
    model = LatencyModel(chain, _tables(chain, _macs_like({})), Remainder(1.0))
    budget = LatencyBudget(model, 0.3 * model.predict({}))
    with pytest.raises(LatencyUnreachable, match=r"cannot get below .* ms as predicted .*--min-keep 0.5") as caught:
        allocate(chain, _flat(chain), AllocationOptions(target_latency=0.3, min_keep=0.5), latency=budget)
    assert budget.ms < caught.value.closest_ms < caught.value.original_ms


def test_latency_target_needs_a_latency_model(chain: ChannelGraph) -> None:
    with pytest.raises(UserError, match="needs a latency model"):
        allocate(chain, _flat(chain), AllocationOptions(target_latency=0.5))


def test_resnet_latency_allocation_meets_the_prediction() -> None:
    """A residual network (option-A shortcuts: one stream group spans every stage): the plan fits the
    budget, near it (a stream channel is several layers' worth of time, so the last step is coarse)."""
    graph = build_graph(build_model(parse_arch("cifar_resnet20")).eval(), (3, 32, 32))

    def macs(name: str, units: Mapping[str, int]) -> float:
        cost = graph.costs[name]
        return cost.per_unit * units.get("in", cost.ins) * units.get("out", cost.outs) * 1e-6

    model = LatencyModel(graph, _tables(graph, macs, align=4), Remainder(0.2, 0.1, 0.5))
    g = torch.Generator().manual_seed(0)
    scores = {grp.id: torch.rand(grp.channels, generator=g, dtype=torch.float64) for grp in graph.prunable_groups()}
    for fraction in (0.3, 0.5, 0.7):
        budget = LatencyBudget(model, fraction * model.predict({}))
        allocation = allocate(graph, scores, AllocationOptions(target_latency=fraction), latency=budget)
        assert model.predict_plan(allocation.plan) <= budget.ms
        assert model.predict_plan(allocation.plan) > 0.85 * budget.ms
        assert allocation.requested == {"target_latency": fraction}
