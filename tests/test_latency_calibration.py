"""Latency tables that disagree with the whole model, and corrections past a coarse staircase
(engine/latency.py `calibrated`, latency/table.py, latency/correction.py).

Isolated layers can time far slower than they run inside the model (on a loaded 2-core machine the
CIFAR ResNet-56's full-width layers at batch 32 timed 10-60x their share): the remainder, whole
model minus the tables' sum, came out negative, every prediction with it, and the correction loop
stopped after one attempt. Timing here is made up (deterministic fakes), so every assertion is exact."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

from chanprune_cli.deploy.runtimes import LatencyTarget
from chanprune_cli.engine.allocate import AllocationOptions, allocate
from chanprune_cli.engine.graph import ChannelGraph, build_graph
from chanprune_cli.engine.latency import LatencyModel, LayerAxis, Remainder, calibrated
from chanprune_cli.latency import correction
from chanprune_cli.latency import table as tables_module
from chanprune_cli.latency.correction import Attempt, Known, prune_to_latency
from chanprune_cli.latency.table import LayerSpec, build_latency_model, measure_table
from chanprune_cli.measure import count_macs
from chanprune_cli.prune.scoring import recorded_criterion


class Net(nn.Module):
    """A stem, a residual block (the stream coupled through an add), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.inner = nn.Conv2d(32, 64, 3, padding=1)
        self.back = nn.Conv2d(64, 32, 3, padding=1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.back(torch.relu(self.inner(x)))
        return self.fc(x.mean((2, 3)))


SHAPE = (3, 12, 12)


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, ChannelGraph]:
    model = Net().eval()
    return model, build_graph(model, SHAPE)


def _work(spec: LayerSpec, units: Mapping[str, int]) -> float:
    cin, cout, groups = spec.shape_at(units)
    return 0.01 + cin * cout / groups * 1e-3


def _full_width(spec: LayerSpec, units: Mapping[str, int]) -> bool:
    cin, cout, _ = spec.shape_at(units)
    return cin == spec.in_channels and cout == spec.out_channels


def _inflated(spec: LayerSpec, points: list[Mapping[str, int]], target: LatencyTarget) -> list[float]:
    """Layers timed alone: in proportion to their work, but 30x slower at full width, every time."""
    return [_work(spec, u) * (30.0 if _full_width(spec, u) else 1.0) for u in points]


def _slow_alone(seen: dict[tuple[LayerSpec, tuple[tuple[str, int], ...]], int]):  # type: ignore[no-untyped-def]
    """Layers timed alone 3x slower than their share of the whole model, and 30x at full width the
    first time (a busy moment: timed again)."""
    def time_points(spec: LayerSpec, points: list[Mapping[str, int]], target: LatencyTarget) -> list[float]:
        out = []
        for u in points:
            key = (spec, tuple(sorted(u.items())))
            seen[key] = seen.get(key, 0) + 1
            out.append(3.0 * _work(spec, u) * (30.0 if _full_width(spec, u) and seen[key] == 1 else 1.0))
        return out

    return time_points


def _scores(graph: ChannelGraph) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {grp.id: torch.rand(grp.channels, generator=g, dtype=torch.float64) for grp in graph.prunable_groups()}


def test_tables_that_sum_to_more_than_the_model_are_scaled_to_it() -> None:
    # tables: 600 ms at full width, 100 thinned; the whole model: 150 and 80 ms
    scale, remainder = calibrated(150.0, 80.0, 600.0, 100.0, 0.25)
    assert 0 < scale < 1
    assert scale * 600.0 + float(remainder.at(1.0)) == pytest.approx(150.0)  # both measurements are predicted
    assert scale * 100.0 + float(remainder.at(0.25)) == pytest.approx(80.0)
    assert all(float(remainder.at(r)) >= 0 for r in (0.0, 0.1, 0.25, 0.5, 1.0))


def test_tables_that_agree_with_the_model_are_kept_as_measured() -> None:
    scale, remainder = calibrated(10.0, 6.0, 8.0, 5.0, 0.5)
    assert scale == 1.0 and remainder == Remainder(2.0, 1.0, 0.5)
    scale, remainder = calibrated(10.0, 11.0, 12.0, 5.0, 0.5)  # thinned measured slower: noise, one point left
    assert scale == pytest.approx(10 / 12) and remainder == Remainder(pytest.approx(0.0))


def test_a_remainder_never_goes_below_zero() -> None:
    assert float(Remainder(-3.0).at(0.5)) == 0.0
    assert float(Remainder(1.0, 0.1, 0.5).at(0.0)) == pytest.approx(0.1)  # held below the thinned point
    assert float(Remainder(1.0, 0.1, 0.5).at(0.75)) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="scale must be positive"):
        LatencyModel(build_graph(Net().eval(), SHAPE), {}, Remainder(0.0), scale=0.0)


def test_inflated_tables_predict_the_measurements_and_nothing_negative(net, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_inflated,
                                time_models=lambda models: [5.0, 3.0][:len(models)])
    latency = built.model
    assert latency.layers_ms({}) > 5.0  # the tables alone claim more than the whole model takes
    assert 0 < latency.scale < 1
    assert latency.predict({}) == pytest.approx(5.0)
    assert latency.predict_plan(tables_module._thinned_plan(graph)) == pytest.approx(3.0)
    scores = _scores(graph)
    predictions = [latency.predict_plan(allocate(graph, scores, AllocationOptions(ratio=r, min_keep=1)).plan)
                   for r in (0.2, 0.5, 0.8)]
    assert 5.0 >= predictions[0] >= predictions[1] >= predictions[2] > 0
    assert predictions[2] < 3.0


def _runtime(model: nn.Module, fixed: float = 1.0):  # type: ignore[no-untyped-def]
    """The whole model: `fixed` ms of 5 that no removal saves, the rest in proportion to the MACs."""
    full = count_macs(model, SHAPE)
    return lambda candidate: (5.0, fixed + (5.0 - fixed) * count_macs(candidate, SHAPE) / full)


def test_corrections_meet_the_target_with_tables_slower_than_the_model(net, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The regression: layers timed alone sum to more than the whole model (3x here, and one busy
    moment at 30x). The busy points are timed again, the tables scaled to the model, the predictions
    stay positive and close, and every target is met as measured."""
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    runtime = _runtime(model)
    built = build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_slow_alone({}),
                                time_models=lambda models: [runtime(m)[1] for m in models])
    assert built.model.layers_ms({}) > 5.0 and 0 < built.model.scale < 1
    for target in (0.3, 0.4, 0.6, 0.8):  # (this small model's staircase has no plan within 0.05 of 0.5)
        result = prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                                  options=AllocationOptions(target_latency=target, min_keep=1), tables=built,
                                  time_candidate=runtime, tolerance=0.02, accept=0.05)
        assert abs(result.attempt.ratio - target) <= 0.05
        assert all(a.predicted_ms > 0 and 0 < a.predicted_ratio < 1 for a in result.attempts)
        assert abs(result.attempt.predicted_ratio - result.attempt.ratio) < 0.1
        assert result.outcome.verify is not None and result.outcome.verify.passed


def test_corrections_move_the_plan_when_the_prediction_barely_changes(net, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Tables whose full-width points stay 30x too slow: the calibrated prediction hardly moves with
    the plan (a first budget below all of it). The loop times the fastest plan predicted, then moves
    the budget by the savings measured, and meets targets the runtime reaches."""
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_inflated,
                                time_models=lambda models: [5.0, 3.0][:len(models)])
    for target in (0.3, 0.6):
        result = prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                                  options=AllocationOptions(target_latency=target, min_keep=1), tables=built,
                                  time_candidate=_runtime(model), tolerance=0.02, accept=0.05)
        assert abs(result.attempt.ratio - target) <= 0.05 and len(result.attempts) > 1
        assert all(a.predicted_ms > 0 for a in result.attempts)


def test_a_budget_whose_plan_was_timed_moves_on_untimed(net, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A budget within one step of the staircase gives a plan timed already: it is not timed again,
    the budget moves on until the plan changes."""
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_inflated,
                                time_models=lambda models: [5.0, 3.0][:len(models)])
    allocations: list[float] = []
    timed: list[float] = []

    def allocate_(*args, **kwargs):  # type: ignore[no-untyped-def]
        allocations.append(kwargs["latency"].ms)
        return allocate(*args, **kwargs)

    monkeypatch.setattr(correction, "allocate", allocate_)
    runtime = _runtime(model, fixed=0.5)

    def timing(candidate: nn.Module) -> tuple[float, float]:
        timed.append(runtime(candidate)[1])
        return 5.0, timed[-1]

    result = prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                              options=AllocationOptions(target_latency=0.5, min_keep=1), tables=built,
                              time_candidate=timing, tolerance=0.02, accept=0.05)
    assert len(allocations) > len(timed) + 1  # the first budget (below every prediction) and moves past timed plans
    assert len(set(timed)) == len(timed)  # no plan timed twice
    assert abs(result.attempt.ratio - 0.5) <= 0.05


def test_next_budget_scales_the_savings_brackets_the_target_and_pushes_past_timed_plans() -> None:
    # 0.6 predicted, 0.7 measured, 0.5 wanted: the predicted saving (0.4) times the saving asked over
    # the saving measured (0.5 / 0.3)
    assert correction._next_budget([Known(12.0, 0.6, 0.7)], 0.5, 20.0) == pytest.approx(20.0 * (1 - 0.4 * 0.5 / 0.3))
    assert correction._next_budget([Known(8.0, 0.4, 0.3)], 0.5, 20.0) == pytest.approx(20.0 * (1 - 0.6 * 0.5 / 0.7))
    assert correction._next_budget([Known(8.0, 0.4, 0.1)], 0.9, 20.0) == pytest.approx(20.0 * 0.7)  # half given back
    assert correction._next_budget([Known(10.0, 0.5, 0.8)], 0.5, 20.0, push=0.2) == pytest.approx(8.0)
    assert correction._next_budget([Known(10.0, 0.5, 0.3)], 0.5, 20.0, push=0.4) == pytest.approx(14.0)
    bracket = [Known(10.0, 0.5, 0.8), Known(4.0, 0.3, 0.4)]
    assert correction._next_budget(bracket, 0.5, 20.0) == pytest.approx(4.0 + 0.25 * 6.0)  # the secant
    assert correction._next_budget([Known(10.0, 0.5, 0.8), Known(10.0 - 1e-9, 0.5, 0.4)], 0.5, 20.0) is None
    assert correction._next_budget([Known(10.0, 0.5, 0.8), Known(0.5, 0.3, 0.49)], 0.5, 20.0) == \
        pytest.approx(0.5 + 0.1 * 9.5)  # kept inside the bracket


def test_a_full_width_point_far_slower_than_its_work_is_timed_again() -> None:
    spec = LayerSpec("conv2d", "conv", 8, 8, 1, (1, 1), (1, 1), (0, 0), (1, 1), False, "zeros", (4, 4))
    seen: dict[int, int] = {}

    def busy_once(spec_: LayerSpec, points: list[Mapping[str, int]], target: LatencyTarget) -> list[float]:
        out = []
        for units in points:
            width = units["out"]
            seen[width] = seen.get(width, 0) + 1
            out.append(40.0 if width == 8 and seen[width] == 1 else float(width))
        return out

    table = measure_table(spec, [LayerAxis("out", 8)], [(2, 4, 6, 8)], (2,), LatencyTarget(), busy_once)
    assert seen[8] == 2 and table.ms == (2.0, 4.0, 6.0, 8.0)
    assert seen[2] == 1  # points in proportion to their work are timed once


def test_table_points_are_the_median_run_as_the_whole_models_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables_module, "time_interleaved", lambda runners, timing: [[5.0, 1.0, 9.0] for _ in runners])
    spec = LayerSpec("conv2d", "conv", 4, 4, 1, (1, 1), (1, 1), (0, 0), (1, 1), False, "zeros", (3, 3))
    assert tables_module._time_points(spec, [{"out": 2}, {}], LatencyTarget(threads=1)) == [5.0, 5.0]


def test_attempts_record_the_predicted_ratio() -> None:
    attempt = Attempt(4.0, 2.0, 10.0, 5.5, 0.55, 0.5)
    assert attempt.to_json()["predicted_ratio"] == 0.5
