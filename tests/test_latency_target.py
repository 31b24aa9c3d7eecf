"""Latency targets, their tables and the correction loop (deploy/runtimes.py, latency/): the target's
checks, interleaved timing, layers timed at their real input size (one ONNX node per layer computes
what the PyTorch layer does), the grid, the on-disk cache, re-timed non-monotonic points, and the
loop that corrects the budget until the measured ratio meets the target. Timing is replaced by
deterministic fakes wherever a test asserts on what was timed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from torch import nn

from chanprune_cli.deploy import runtimes
from chanprune_cli.deploy.runtimes import LatencyTarget, Timing, time_interleaved
from chanprune_cli.engine.allocate import AllocationOptions
from chanprune_cli.engine.graph import ChannelGraph, build_graph
from chanprune_cli.engine.latency import LayerAxis
from chanprune_cli.errors import UserError
from chanprune_cli.latency import table as tables_module
from chanprune_cli.latency.correction import goal_ratio, prune_to_latency, slower_warning
from chanprune_cli.latency.table import LayerSpec, axis_grid, build_latency_model, cache_file, layer_specs, measure_table
from chanprune_cli.measure import count_macs
from chanprune_cli.prune.scoring import recorded_criterion


class Net(nn.Module):
    """A stem, a residual block (the stream coupled through an add), a depthwise conv, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.inner = nn.Conv2d(16, 24, 3, padding=1)
        self.back = nn.Conv2d(24, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.back(torch.relu(self.inner(x)))
        return self.fc(torch.relu(self.dw(x)).mean((2, 3)))


SHAPE = (3, 12, 12)


@pytest.fixture(scope="module")
def net() -> tuple[nn.Module, ChannelGraph]:
    model = Net().eval()
    return model, build_graph(model, SHAPE)


def _macs_time(spec: LayerSpec, units: Mapping[str, int], target: LatencyTarget) -> float:
    """A deterministic 'measurement': the layer's MACs (in millions) at those widths, plus a constant."""
    cin, cout, groups = spec.shape_at(units)
    positions = 1
    for d in spec.size:
        positions *= d
    kernel = 1
    for k in spec.kernel:
        kernel *= k
    return 0.01 + target.batch * positions * kernel * cin * cout / groups * 1e-6


def _each(time_point):  # type: ignore[no-untyped-def]
    return lambda spec, points, target: [time_point(spec, units, target) for units in points]


def _fake_models(ms: list[float]):  # type: ignore[no-untyped-def]
    return lambda models: list(ms[:len(models)])


# --------------------------------------------------------------------------------------------
# the target


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"runtime": "tflite"}, "--latency-runtime must be one of torch, onnxruntime, tensorrt"),
    ({"batch": 0}, "--latency-batch must be at least 1"),
    ({"threads": 0}, "--threads must be at least 1"),
])
def test_target_checks_its_values_when_made(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        LatencyTarget(**kwargs)


def test_tensorrt_needs_a_gpu_and_onnxruntime_the_cpu() -> None:
    with pytest.raises(UserError, match="--latency-runtime tensorrt needs a CUDA GPU"):
        LatencyTarget(runtime="tensorrt").check()
    with pytest.raises(UserError, match="ONNX Runtime's CPU provider; use --device cpu"):
        LatencyTarget(runtime="onnxruntime", device="cuda").check()


def test_a_runtime_that_is_not_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtimes, "_missing", lambda name: name == "onnxruntime")
    with pytest.raises(UserError, match=r"needs onnx and onnxruntime, which are not installed; install them with"):
        LatencyTarget(runtime="onnxruntime").check()
    LatencyTarget(runtime="torch").check()


def test_target_key_names_what_a_measurement_depends_on() -> None:
    key = LatencyTarget(runtime="onnxruntime", batch=4, threads=2).key()
    assert key["runtime"] == "onnxruntime" and key["batch"] == 4 and key["threads"] == 2
    assert set(key["versions"]) == {"torch", "onnxruntime", "onnx"}
    assert LatencyTarget().favoured_multiple() in (8, 16)


def test_timed_runs_are_interleaved() -> None:
    calls: list[str] = []
    runners = [lambda: calls.append("a"), lambda: calls.append("b")]
    times = time_interleaved(runners, Timing(warmup=1, repeats=3, max_time=None))
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]  # one warm-up each, then rounds of A, B
    assert [len(t) for t in times] == [3, 3]


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8, bias=False),
    nn.Conv2d(4, 6, 5, padding="same", groups=2), nn.Conv1d(4, 6, 3), nn.Linear(6, 3), nn.Linear(6, 3, bias=False),
])
def test_an_onnx_layer_computes_what_the_pytorch_layer_does(layer: nn.Module) -> None:
    import onnxruntime as ort

    shape = {nn.Conv2d: (layer.in_channels, 9, 9), nn.Conv1d: (layer.in_channels, 11)}.get(type(layer), (5, 6)) \
        if not isinstance(layer, nn.Linear) else (5, 6)
    session = ort.InferenceSession(runtimes._onnx_layer(layer, shape, 2), providers=["CPUExecutionProvider"])
    x = torch.randn(2, *shape)
    expected = layer.eval()(x).detach()
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    flat = (6,) if isinstance(layer, nn.Linear) else None
    if flat is not None:  # one row per image: a Gemm
        session = ort.InferenceSession(runtimes._onnx_layer(layer, flat, 2), providers=["CPUExecutionProvider"])
        x = torch.randn(2, 6)
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), layer(x).detach(),
                                   rtol=1e-4, atol=1e-5)


def test_layer_runners_run_on_torch_and_onnxruntime() -> None:
    spec = LayerSpec("conv2d", "conv", 8, 8, 1, (3, 3), (1, 1), (1, 1), (1, 1), True, "zeros", (6, 6))
    for runtime in ("torch", "onnxruntime"):
        target = LatencyTarget(runtime=runtime, batch=2, threads=1)
        run = target.layer_runner(spec.module({"out": 4}), spec.input_shape({"out": 4}))
        with target.timing():
            assert len(time_interleaved([run], Timing(warmup=0, repeats=2, max_time=None))[0]) == 2


# --------------------------------------------------------------------------------------------
# tables


def test_layers_are_recorded_at_their_real_input_size(net) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    specs = layer_specs(model, graph, SHAPE)
    assert set(specs) == {"stem", "inner", "back", "dw", "fc"}
    assert specs["inner"].size == (12, 12) and specs["dw"].size == (12, 12) and specs["fc"].size == ()
    assert specs["dw"].cost_kind == "depthwise"
    assert specs["dw"].shape_at({"dw": 8}) == (8, 8, 8)
    assert specs["inner"].shape_at({"in": 8, "out": 12}) == (8, 12, 1)
    assert specs["fc"].input_shape({"in": 10}) == (10,)


def test_a_layer_with_its_own_forward_or_called_twice_stays_in_the_remainder() -> None:
    class Scaled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), Scaled(8, 8, 1), nn.Conv2d(8, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.c(self.b(self.a(x))))

    model = Twice().eval()
    assert set(layer_specs(model, build_graph(model, (3, 4, 4)), (3, 4, 4))) == {"a"}


def test_grid_holds_favoured_multiples_and_the_full_width() -> None:
    assert axis_grid(64, 8) == (8, 16, 24, 32, 40, 48, 56, 64)
    assert axis_grid(2048, 8)[-1] == 2048 and len(axis_grid(2048, 8)) == 8
    assert all(w % 8 == 0 for w in axis_grid(2048, 8))
    assert axis_grid(10, 8) == (8, 10)
    assert axis_grid(3, 1) == (1, 2, 3)


def test_a_point_slower_than_a_wider_one_is_timed_again() -> None:
    spec = LayerSpec("conv2d", "conv", 8, 8, 1, (1, 1), (1, 1), (0, 0), (1, 1), False, "zeros", (4, 4))
    seen: dict[int, int] = {}

    def flaky(spec_: LayerSpec, units: Mapping[str, int], target: LatencyTarget) -> float:
        width = units["out"]
        seen[width] = seen.get(width, 0) + 1
        if width == 4:  # busy the first time, then as slow as a real staircase would keep it
            return 10.0 if seen[width] == 1 else 3.0
        return float(width)

    table = measure_table(spec, [LayerAxis("out", 8)], [(2, 4, 6, 8)], (2,), LatencyTarget(), _each(flaky))
    assert seen[4] == 2 and seen[6] == 2  # the slow point and its wider neighbour, again
    assert table.ms == (2.0, 3.0, 6.0, 8.0)


def test_tables_are_cached_per_target_and_reused(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    target = LatencyTarget(batch=2, threads=1)
    first = build_latency_model(model, graph, SHAPE, target, time_points=_each(_macs_time), time_models=_fake_models([5.0, 3.0]))
    assert (first.measured, first.cached, first.layers) == (5, 0, 5)
    path = cache_file(target)
    assert Path(first.cache or "") == path and path.is_file() and str(path).startswith(str(tmp_path))
    assert json.loads(path.read_text())["target"]["batch"] == 2

    def no_timing(*args: object) -> float:
        raise AssertionError("a cached table was timed again")

    again = build_latency_model(model, graph, SHAPE, target, time_points=no_timing, time_models=_fake_models([5.0, 3.0]))
    assert (again.measured, again.cached) == (0, 5)
    assert again.model.tables == first.model.tables
    other = LatencyTarget(batch=2, threads=2)
    assert cache_file(other) != path  # another thread count is another target
    fresh = build_latency_model(model, graph, SHAPE, other, time_points=_each(_macs_time), time_models=_fake_models([5.0, 3.0]))
    assert fresh.measured == 5


def test_prediction_is_the_measurement_at_full_and_thinned_width(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_each(_macs_time),
                                time_models=_fake_models([5.0, 3.0]))
    assert built.model.predict({}) == pytest.approx(5.0)
    assert built.model.predict_plan(tables_module._thinned_plan(graph)) == pytest.approx(3.0)
    assert built.original_ms == 5.0 and built.thinned_ms == 3.0


# --------------------------------------------------------------------------------------------
# the correction loop


def _built(net, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    model, graph = net
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return build_latency_model(model, graph, SHAPE, LatencyTarget(threads=1), time_points=_each(_macs_time),
                               time_models=_fake_models([5.0, 3.0]))


def _scores(graph: ChannelGraph) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {grp.id: torch.rand(grp.channels, generator=g, dtype=torch.float64) for grp in graph.prunable_groups()}


def test_corrections_meet_the_measured_target(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """The runtime's time follows MACs with an overhead the prediction does not model: the first plan,
    made to the prediction, misses; the loop corrects the budget until the measured ratio is within
    the tolerance, and saves the plan it timed, verified."""
    model, graph = net
    built = _built(net, tmp_path, monkeypatch)
    full = count_macs(model, SHAPE)
    timed: list[nn.Module] = []

    def runtime(candidate: nn.Module) -> tuple[float, float]:
        timed.append(candidate)
        return 5.0, 1.0 + 4.0 * count_macs(candidate, SHAPE) / full

    result = prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                              options=AllocationOptions(target_latency=0.6, min_keep=1), tables=built,
                              time_candidate=runtime, tolerance=0.02)
    assert len(result.attempts) == len(timed) >= 2
    assert abs(result.attempts[0].ratio - 0.6) > 0.02  # the prediction alone misses
    assert abs(result.attempt.ratio - 0.6) <= 0.05
    assert result.attempt.ratio == min((a.ratio for a in result.attempts), key=lambda r: abs(r - 0.6))
    assert result.outcome.verify is not None and result.outcome.verify.passed
    kept = timed[result.attempts.index(result.attempt)]
    assert count_macs(result.outcome.model, SHAPE) == count_macs(kept, SHAPE)  # the plan timed is the plan saved
    assert result.predicted_ms == pytest.approx(built.model.predict_plan(result.outcome.allocation.plan))


def test_a_target_the_runtime_never_reaches_is_an_error(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    built = _built(net, tmp_path, monkeypatch)
    with pytest.raises(UserError, match=r"--target-latency 0.5 was not met: the closest pruned model measured 0.900 .*"
                                        r"nothing was written"):
        prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                         options=AllocationOptions(target_latency=0.5, min_keep=1), tables=built,
                         time_candidate=lambda candidate: (5.0, 4.5))


def test_an_unreachable_budget_says_how_close_it_got(net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    model, graph = net
    built = _built(net, tmp_path, monkeypatch)
    with pytest.raises(UserError, match=r"0.2 was not met: the closest pruned model measured 0.900 .*the plan cannot get "
                                        r"below 4.8 ms as predicted"):  # the fastest plan predicted was timed
        prune_to_latency(model, graph, _scores(graph), SHAPE, criterion=recorded_criterion("l1"),
                         options=AllocationOptions(target_latency=0.2, min_keep=0.9), tables=built,
                         time_candidate=lambda candidate: (5.0, 4.5))


def test_an_absolute_target_is_a_fraction_of_the_measured_original() -> None:
    from chanprune_cli.engine.latency import LatencyGoal

    assert goal_ratio(LatencyGoal(ms=2.5), 5.0) == 0.5
    assert goal_ratio(LatencyGoal(fraction=0.3), 5.0) == 0.3
    with pytest.raises(UserError, match="is not below the original's 5 ms"):
        goal_ratio(LatencyGoal(ms=6.0), 5.0)


def test_slower_models_are_named() -> None:
    target = LatencyTarget(batch=32)
    assert slower_warning(5.0, 4.0, target) is None
    assert slower_warning(5.0, 5.1, target) is None and slower_warning(5.0, 5.0, target, 1.2) is None  # noise
    line = slower_warning(5.0, 5.5, target)
    assert line is not None and "slower than the original on torch (cpu, batch 32): 5.5 ms vs 5 ms" in line
    # slower by the median, but faster in more than one round of ten: a busy machine, not a slower model
    assert slower_warning(5.0, 5.5, target, 1.1, low=0.97) is None
    assert slower_warning(5.0, 5.5, target, 1.1, low=1.02) is not None


def test_grid_points_are_slices_of_one_full_layer_timed_round_by_round() -> None:
    spec = LayerSpec("conv2d", "conv", 8, 6, 2, (3, 3), (1, 1), (1, 1), (1, 1), True, "zeros", (5, 5))
    full = spec.module({})
    torch.nn.init.normal_(full.weight)
    torch.nn.init.normal_(full.bias)
    part = spec.module({"in": 2, "out": 1}, full)
    assert part.weight.shape == (2, 2, 3, 3) and part.groups == 2
    assert torch.equal(part.weight, full.weight[:2, :2]) and torch.equal(part.bias, full.bias[:2])
    times = tables_module._time_points(spec, [{"in": 2, "out": 1}, {}], LatencyTarget(threads=1))
    assert len(times) == 2 and all(t > 0 for t in times)
