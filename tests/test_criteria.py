"""Channel-importance criteria: contract (one finite score per class, deterministic, model left
unchanged) for every registered criterion, the gate mechanism against `mask_model`, and each
data-driven criterion's defining property on a constructed toy."""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.criteria import available, check_requirements, get_criterion
from chanprune_cli.criteria import gates as gates_module
from chanprune_cli.criteria.base import channel_scales, criteria_table, parse_criterion_opts
from chanprune_cli.criteria.cac import CACEstimator
from chanprune_cli.criteria.gates import ChannelGates, capture_features, class_means, parse_options
from chanprune_cli.criteria.info import info_components
from chanprune_cli.criteria.sensitivity import _input_energy, activation_diagonals, layer_sensitivity
from chanprune_cli.criteria.whitebox import whitebox_masks
from chanprune_cli.engine.allocate import AllocationOptions
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.engine.surgery import mask_model
from chanprune_cli.errors import UserError
from chanprune_cli.models import ArchSpec, build_model, parse_arch
from chanprune_cli.prune import pruning

CPU = torch.device("cpu")
DATA_CRITERIA = ("taylor", "hrank", "sensitivity", "info", "cac", "whitebox")
LABEL_CRITERIA = ("taylor", "sensitivity", "cac", "whitebox")


class MixedNet(nn.Module):
    """Residual add, grouped conv, depthwise conv, a BN-less conv with bias and a hidden Linear."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 12, 1)
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, classes)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):  # non-trivial affine + statistics
                    m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                    m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(a)))
        a = F.relu(a + self.bn3(self.dw(h)))
        a = F.relu(self.conv3(a))
        a = F.adaptive_avg_pool2d(a, 1).flatten(1)
        return self.fc2(F.relu(self.fc1(a)))


class PlainNet(nn.Module):
    """conv-relu-conv-relu-pool-fc without BatchNorm: a zero filter gives an exactly zero channel."""

    def __init__(self, c1: int = 6, c2: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.fc = nn.Linear(c2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class NormNet(nn.Module):
    """GroupNorm, affine InstanceNorm and a DenseNet-style pre-activation BatchNorm after a cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(6, affine=True)
        self.pre_bn = nn.BatchNorm2d(14)
        self.conv3 = nn.Conv2d(14, 5, 1)
        self.fc = nn.Linear(5, 4)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in (self.gn, self.inorm, self.pre_bn):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
            self.pre_bn.running_mean.copy_(torch.randn(14, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.relu(self.gn(self.conv1(x)))
        b = F.relu(self.inorm(self.conv2(a)))
        h = F.relu(self.pre_bn(torch.cat([a, b], 1)))
        return self.fc(F.adaptive_avg_pool2d(self.conv3(h), 1).flatten(1))


def make_data(batches: int = 3, batch: int = 16, shape: tuple[int, ...] = (3, 8, 8), classes: int = 4,
              seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn((batch, *shape), generator=gen), torch.randint(0, classes, (batch,), generator=gen))
            for _ in range(batches)]


@pytest.fixture(scope="module")
def mixed() -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = MixedNet()
    return model, build_graph(model, (3, 8, 8))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# Contract: every criterion
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(available()))
def test_contract(name: str, mixed: tuple) -> None:
    model, graph = mixed
    criterion = get_criterion(name)
    assert criterion.summary and criterion.needs in ("weights", "data", "labels")
    data = make_data()
    model.train()  # the caller's flags must come back exactly
    model.fc1.weight.requires_grad_(False)
    before = _state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        first = criterion.score(model, graph, data, CPU, seed=3)
        second = criterion.score(model, graph, data, CPU, seed=3)
        assert all(m.training for m in model.modules())
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert not flags["fc1.weight"]
    finally:
        model.fc1.weight.requires_grad_(True)
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    groups = graph.prunable_groups()
    assert groups and {g.id for g in groups} <= set(first)
    for g in groups:
        s = first[g.id]
        assert s.shape == (g.channels,), (name, g.name)
        assert torch.isfinite(s).all(), (name, g.name, s)
        assert torch.equal(s, second[g.id]), (name, g.name)


@pytest.mark.parametrize("name", ["cac", "whitebox", "random"])
def test_seed_changes_random_criteria(name: str, mixed: tuple) -> None:
    model, graph = mixed
    data = make_data()
    a = get_criterion(name).score(model, graph, data, CPU, seed=0)
    b = get_criterion(name).score(model, graph, data, CPU, seed=1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_requirements(name: str, mixed: tuple) -> None:
    model, graph = mixed
    criterion = get_criterion(name)
    if name == "info":  # data-free variant from the filter weights
        check_requirements(criterion, has_data=False)
        scores = criterion.score(model, graph, None, CPU)
        assert all(torch.isfinite(scores[g.id]).all() for g in graph.prunable_groups())
        return
    with pytest.raises(UserError, match=name):
        check_requirements(criterion, has_data=False)
    if name in LABEL_CRITERIA:
        unlabelled = [x for x, _ in make_data(batches=1)]
        with pytest.raises(UserError, match="label"):
            criterion.score(model, graph, unlabelled, CPU)


def test_unknown_and_bad_options(mixed: tuple) -> None:
    model, graph = mixed
    with pytest.raises(UserError, match="no option"):
        get_criterion("taylor").score(model, graph, make_data(1), CPU, bogus=1)
    with pytest.raises(UserError, match="variant"):
        get_criterion("taylor").score(model, graph, make_data(1), CPU, variant="cubic")
    for name in ("bn", "fpgm", "random"):  # every criterion checks its options, those without any too
        with pytest.raises(UserError, match=f"criterion '{name}' has no option 'side'; it takes no options"):
            get_criterion(name).score(model, graph, None, CPU, side="both")
    assert parse_options("x", {"a": "false", "b": "3"}, {"a": True, "b": 1.0}) == {"a": False, "b": 3.0}


def test_labels_out_of_range(mixed: tuple) -> None:
    model, graph = mixed
    bad = [(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 9]))]
    for name in LABEL_CRITERIA:
        with pytest.raises(UserError, match="labels"):
            get_criterion(name).score(model, graph, bad, CPU)


# ------------------------------------------------------------------------------------------
# Gates: a gate of 0 is exactly the masked model
# ------------------------------------------------------------------------------------------


def _check_gates_match_mask(model: nn.Module, graph, x: torch.Tensor, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    plan = {}
    for g in graph.prunable_groups():
        off = torch.randperm(g.channels, generator=gen)[: max(1, g.channels // 3)]
        plan[g.id] = sorted(int(i) for i in off if int(i) in g.prunable_classes)
    masked = copy.deepcopy(model)
    mask_model(masked, graph, plan)
    with torch.no_grad(), ChannelGates(model, graph) as gates:
        for g in graph.prunable_groups():
            gate = torch.ones(g.channels)
            gate[plan[g.id]] = 0
            gates.gates[g.id] = gate
        got = model(x)
        # per-sample gates: the same gate for every sample gives the same result
        gates.gates = {gid: v.expand(x.shape[0], -1) for gid, v in gates.gates.items()}
        got_per_sample = model(x)
    want = masked(x)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.allclose(got_per_sample, want, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # hooks are gone afterwards


def test_gates_equal_mask_model_mixed(mixed: tuple) -> None:
    model, graph = mixed
    _check_gates_match_mask(model, graph, torch.randn(4, 3, 8, 8), seed=0)


def test_gates_equal_mask_model_norms() -> None:
    torch.manual_seed(0)
    model = NormNet()
    graph = build_graph(model, (3, 8, 8))
    assert len(graph.prunable_groups()) >= 2
    for seed in range(3):
        _check_gates_match_mask(model, graph, torch.randn(3, 3, 8, 8), seed=seed)
    scores = get_criterion("taylor").score(model, graph, make_data(), CPU)
    assert all(torch.isfinite(scores[g.id]).all() for g in graph.prunable_groups())


def test_gates_equal_mask_model_resnet20() -> None:
    torch.manual_seed(0)
    model = build_model(ArchSpec("cifar_resnet20"))
    graph = build_graph(model, (3, 32, 32), train_mode=False)
    _check_gates_match_mask(model, graph, torch.randn(2, 3, 32, 32), seed=1)
    # The residual stream is gated at every producer's BatchNorm, the per-block convs at theirs.
    with ChannelGates(model, graph) as gates:
        stream = gates.points[0]
        assert [p.module for p in stream][:2] == ["bn1", "layer1.0.bn2"]
        assert all(p.module.endswith(("bn1", "bn2")) for pts in gates.points.values() for p in pts)


def test_taylor_is_the_gate_derivative(mixed: tuple) -> None:
    """|dL/dg| from `taylor variant=abs` equals a central finite difference of the loss when the
    whole class (every point it is produced at) is scaled by g around 1."""
    model, graph = mixed
    model = copy.deepcopy(model).double().eval()
    x, y = make_data(batches=1)[0]
    x = x.double()
    scores = get_criterion("taylor").score(model, graph, [(x, y)], CPU, variant="abs")
    eps = 1e-4
    with torch.no_grad(), ChannelGates(model, graph) as gates:
        for g in graph.prunable_groups():
            for c in (0, g.channels - 1):
                losses = []
                for sign in (1, -1):
                    gate = torch.ones(g.channels, dtype=torch.float64)
                    gate[c] += sign * eps
                    gates.gates = {g.id: gate}
                    losses.append(float(F.cross_entropy(model(x), y)))
                fd = abs(losses[0] - losses[1]) / (2 * eps)
                assert abs(fd - float(scores[g.id][c])) <= 1e-6 + 1e-4 * fd, (g.name, c, fd, scores[g.id][c])


def test_capture_first_point(mixed: tuple) -> None:
    model, graph = mixed
    seen: dict = {}
    with ChannelGates(model, graph) as gates:
        gates.capture = lambda gid, p, f: seen.setdefault((gid, p), f.shape)
        with torch.no_grad():
            model.eval()(torch.randn(2, 3, 8, 8))
        for gid, pts in gates.points.items():
            firsts = [set(pts[p].classes[gates.primary(gid, p)].tolist()) for p in range(len(pts))]
            assert set().union(*firsts) == set(range(gates.channels[gid]))  # every class has a first point
            assert sum(len(f) for f in firsts) == gates.channels[gid]  # ... and only one
    for (gid, p), shape in seen.items():
        assert shape[1] == len(gates.points[gid][p].channels)


@pytest.mark.parametrize("mode", ["first", "all"])
def test_class_means_average_each_class_over_the_points_read(mode: str, mixed: tuple) -> None:
    # capture_features hands every captured point's features to the update with the positions that
    # will be read; class_means averages each class over exactly those (point, position) pairs.
    model, graph = mixed
    sums: dict = {}
    read: dict = {}

    def update(gid: int, p: int, feats: torch.Tensor, positions: torch.Tensor | None) -> None:
        read[(gid, p)] = positions
        sums[(gid, p)] = sums.get((gid, p), 0) + feats.double().sum(dim=[0, *range(2, feats.dim())])

    gates = capture_features(model, graph, make_data(), CPU, update, mode=mode, description="test")
    means = class_means(gates, mode, sums)
    several_points = 0
    for gid, pts in gates.points.items():
        for p in range(len(pts)):
            if (gid, p) in read:
                assert read[(gid, p)] is None if mode == "all" else torch.equal(read[(gid, p)], gates.primary(gid, p))
        for c in range(gates.channels[gid]):
            pairs = [(p, i) for p, pt in enumerate(pts) for i, k in enumerate(pt.classes.tolist())
                     if k == c and (mode == "all" or i in gates.primary(gid, p).tolist())]
            several_points += len({p for p, _ in pairs}) > 1
            expected = sum(float(sums[(gid, p)][i]) for p, i in pairs) / len(pairs)
            assert float(means[gid][c]) == pytest.approx(expected, rel=1e-12)
    assert (several_points > 0) == (mode == "all")  # the residual add's classes: at bn1 and at bn3


# ------------------------------------------------------------------------------------------
# Defining properties on toys
# ------------------------------------------------------------------------------------------


def _plain_with_zero_filters() -> tuple[nn.Module, object, int, int]:
    torch.manual_seed(0)
    model = PlainNet()
    with torch.no_grad():
        model.conv1.weight[2] = 0
        model.conv2.weight[5] = 0
    return model, build_graph(model, (3, 8, 8)), 2, 5


@pytest.mark.parametrize("name,options", [("l1", {}), ("l2", {}), ("taylor", {}), ("taylor", {"variant": "abs", "per_sample": True}),
                                          ("sensitivity", {}), ("sensitivity", {"hessian": "activation"}),
                                          ("hrank", {}), ("info", {})])
def test_zero_filter_scores_lowest(name: str, options: dict) -> None:
    model, graph, z1, z2 = _plain_with_zero_filters()
    scores = get_criterion(name).score(model, graph, make_data(classes=3), CPU, **options)
    by_name = {g.name: g.id for g in graph.prunable_groups()}
    for gname, z in (("conv1", z1), ("conv2", z2)):
        s = scores[by_name[gname]]
        others = torch.cat([s[:z], s[z + 1:]])
        assert float(s[z]) < float(others.min()), (name, gname, s)


def test_hrank_rank_zero_for_dead_maps() -> None:
    model, graph, z1, _ = _plain_with_zero_filters()
    scores = get_criterion("hrank").score(model, graph, make_data(classes=3), CPU)
    s = scores[graph.prunable_groups()[0].id]
    assert float(s[z1]) == 0.0 and float(s.max()) > 7.0  # 8x8 random maps: (nearly) full rank


def test_info_duplicate_channel_has_low_independence() -> None:
    torch.manual_seed(0)
    model = PlainNet(c1=8)
    with torch.no_grad():
        model.conv1.weight[4] = model.conv1.weight[1]
    graph = build_graph(model, (3, 8, 8))
    gid = next(g.id for g in graph.prunable_groups() if g.name == "conv1")
    for data in (make_data(classes=3), None):
        for samples in ("position", "pooled"):
            _, independence = info_components(model, graph, data, CPU, samples=samples)
            ind = independence[gid]
            assert set(ind.argsort()[:2].tolist()) == {1, 4}, (data is None, samples, ind)
            if data is None:
                break
    capacity, _ = info_components(model, graph, make_data(classes=3), CPU)
    assert torch.isclose(capacity[gid][1], capacity[gid][4])


class SignalNet(nn.Module):
    """Hidden channel `signal` copies the label-carrying input channel; the others mix noise inputs."""

    def __init__(self, signal: int = 2, hidden: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, hidden, 1, bias=False)
        self.conv2 = nn.Conv2d(hidden, 2, 1)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            w = torch.zeros(hidden, 3, 1, 1)
            w[:, 1:, 0, 0] = torch.randn(hidden, 2, generator=gen)
            w[signal] = 0
            w[signal, 0] = 1.0
            self.conv1.weight.copy_(w)
            w2 = torch.randn(2, hidden, 1, 1, generator=gen) * 0.3
            w2[:, signal, 0, 0] = torch.tensor([-3.0, 3.0])
            self.conv2.weight.copy_(w2)
            self.conv2.bias.copy_(torch.tensor([1.5, -1.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.relu(self.conv1(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def signal_data(batches: int = 8, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        y = torch.randint(0, 2, (batch,), generator=gen)
        x = torch.randn(batch, 3, 4, 4, generator=gen)
        x[:, 0] = x[:, 0] * 0.3 + y[:, None, None].float()  # channel 0 carries the label
        out.append((x, y))
    return out


@pytest.mark.parametrize("name", ["taylor", "cac", "whitebox", "sensitivity"])
def test_signal_channel_scores_top(name: str) -> None:
    model = SignalNet(signal=2)
    graph = build_graph(model, (3, 4, 4))
    (group,) = graph.prunable_groups()
    scores = get_criterion(name).score(model, graph, signal_data(), CPU, seed=0)
    assert int(scores[group.id].argmax()) == 2, (name, scores[group.id])


def test_cac_estimator_monte_carlo() -> None:
    est = CACEstimator({0: 2}, CPU, drop_prob=0.5, seed=0)
    gates = {0: torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])}
    losses = torch.tensor([1.0, 3.0, 4.0, 0.0])
    est.update(losses, torch.tensor([True, False, False, True]), gates, {0: torch.tensor([[0.5, 0.0]] * 4)})
    mc = est.monte_carlo("loss")[0]
    # channel 0: off in samples 1, 2 (mean 3.5), on in 0, 3 (mean 0.5)
    # channel 1: off in samples 0, 2 (mean 2.5), on in 1, 3 (mean 1.5)
    assert torch.allclose(mc, torch.tensor([3.0, 1.0], dtype=torch.float64))
    assert torch.allclose(est.first_order_estimate("signed")[0], torch.tensor([-0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(est.first_order_estimate("abs")[0], torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert torch.allclose(est.monte_carlo("accuracy")[0], torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert all(torch.isfinite(v).all() for v in est.scores().values())


def test_whitebox_masks_start_at_one_and_model_untouched() -> None:
    model = SignalNet()
    graph = build_graph(model, (3, 4, 4))
    before = _state(model)
    masks = whitebox_masks(model, graph, signal_data(batches=2), CPU, train_weights=True, lr=0.0)
    (m,) = masks.values()
    assert m.shape == (2, 5) and torch.allclose(m, torch.full_like(m, 2 / 3))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_layer_sensitivity_and_weights(mixed: tuple) -> None:
    model, graph = mixed
    for hessian in ("fisher", "activation"):
        sens = layer_sensitivity(model, graph, make_data(), CPU, hessian=hessian)
        assert set(sens) == {g.id for g in graph.prunable_groups()}
        assert abs(sum(sens.values()) / len(sens) - 1) < 1e-9 and all(v > 0 for v in sens.values())
    scores = get_criterion("sensitivity").score(model, graph, make_data(), CPU, layer_allocation=True)
    plain = get_criterion("sensitivity").score(model, graph, make_data(), CPU)  # layer_allocation=false by default
    for gid, w in scores.group_weights.items():
        assert torch.allclose(scores[gid], plain[gid] * w)


def test_activation_hessian_matches_unfold() -> None:
    x = torch.randn(2, 3, 9, 9)
    for stride, padding, dilation in ((2, 1, 1), (1, 2, 2), (3, 0, 1)):
        conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation)
        got = _input_energy(conv, x)
        cols = F.unfold(x.square(), 3, padding=padding, stride=stride, dilation=dilation)  # [B, C*9, L]
        assert torch.allclose(got, cols.mean(dim=(0, 2)).reshape(3, 3, 3), atol=1e-6)
    same = nn.Conv2d(3, 4, 4, padding="same", padding_mode="reflect")
    cols = F.unfold(F.pad(x, (1, 2, 1, 2), mode="reflect").square(), 4)
    assert torch.allclose(_input_energy(same, x), cols.mean(dim=(0, 2)).reshape(3, 4, 4), atol=1e-6)
    lin = nn.Linear(5, 2)
    z = torch.randn(4, 3, 5)
    assert torch.allclose(_input_energy(lin, z), z.square().mean(dim=(0, 1)))


def test_activation_hessian_averages_batches_like_unfold() -> None:
    model = PlainNet().eval()
    graph = build_graph(model, (3, 8, 8))
    data = make_data(batches=2, batch=5) + make_data(batches=1, batch=3, seed=1)  # batches of unequal size
    got = activation_diagonals(model, graph, graph.prunable_groups(), data, CPU, amp=False)["conv2"]
    want = torch.stack([F.unfold(F.relu(model.conv1(x)).square(), 3, padding=1).mean(dim=(0, 2)) for x, _ in data])
    assert torch.allclose(got, want.mean(0).reshape(6, 3, 3), rtol=1e-5, atol=1e-7)  # the mean of batch means


def test_shared_gate_multipliers_change_nothing(mixed: tuple) -> None:
    # Points that place a group's channels alike share one multiplier per forward: the outputs
    # and the gates' gradients are those of one multiplier per point.
    model, graph = mixed
    x, y = make_data(batches=1)[0]

    def run(share: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with ChannelGates(model, graph) as gates:
            if not share:
                gates._multiplier = lambda gate, gid, p, out: gates._compute_multiplier(gate, gid, p, out)
            g = {gid: torch.rand((x.shape[0], c), generator=torch.Generator().manual_seed(gid)).requires_grad_(True)
                 for gid, c in gates.channels.items()}
            gates.gates = dict(g)
            out = model.eval()(x)
            return out.detach(), list(torch.autograd.grad(F.cross_entropy(out, y), list(g.values())))

    (shared, grads), (alone, want) = run(True), run(False)
    assert torch.equal(shared, alone)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-8) for a, b in zip(grads, want))


def test_cac_block_update_equals_the_per_group_sums() -> None:
    est = CACEstimator({3: 2, 7: 3}, CPU, drop_prob=0.5, seed=1)
    gen = torch.Generator().manual_seed(0)
    gates = est.draw(6)
    assert [tuple(g.shape) for g in gates.values()] == [(6, 2), (6, 3)] and all(g.is_leaf for g in gates.values())
    losses, correct = torch.rand(6, generator=gen), torch.rand(6, generator=gen) > 0.5
    clean = torch.rand(6, generator=gen)
    grads = {3: torch.randn(6, 2, generator=gen), 7: None}  # group 7 did not reach the output
    est.update(losses, correct, gates, grads, clean_losses=clean)
    for gid, g in gates.items():
        on = g.detach().double()
        off = 1 - on
        loss, err = (losses - clean).double(), 1 - correct.double()
        assert torch.allclose(est.loss_off[gid], loss @ off) and torch.allclose(est.loss_on[gid], loss @ on)
        assert torch.allclose(est.err_off[gid], err @ off) and torch.equal(est.n_off[gid], off.sum(0))
        minus = -grads[gid].double() if grads[gid] is not None else torch.zeros_like(on)
        assert torch.allclose(est.fo_off[gid], (minus * off).sum(0)) and torch.allclose(est.fo_abs[gid], minus.abs().sum(0))


@pytest.mark.parametrize("name,options", [("sensitivity", {}), ("sensitivity", {"hessian": "activation"}),
                                          ("cac", {}), ("whitebox", {})])
def test_scoring_reads_nothing_back_per_batch(name: str, options: dict, mixed: tuple,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU, every value read back (.item(), float(), a Python bool of a tensor) makes the host
    # wait for the device; scoring reads none per batch (labels are checked before they move).
    model, graph = mixed

    class Reads(TorchDispatchMode):
        count = 0
        host = False  # inside the label check on the host

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.overloadpacket is torch.ops.aten._local_scalar_dense and not self.host:
                self.count += 1
            return func(*args, **(kwargs or {}))

    reads = Reads()
    real_check = gates_module.check_labels

    def host_check(y: torch.Tensor, classes: int) -> None:
        reads.host = True
        try:
            real_check(y, classes)
        finally:
            reads.host = False

    monkeypatch.setattr(gates_module, "check_labels", host_check)
    counts = []
    for batches in (1, 4):
        reads.count = 0
        with reads:
            get_criterion(name).score(model, graph, make_data(batches=batches), CPU, seed=0, **options)
        counts.append(reads.count)
    assert counts[0] == counts[1], counts


# ------------------------------------------------------------------------------------------
# CUDA
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_cuda_matches_cpu(name: str, mixed: tuple) -> None:
    model, graph = mixed
    data = make_data()
    cpu = get_criterion(name).score(model, graph, data, CPU, seed=0)
    before = _state(model)
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # TF32 convs differ ~1e-3 relative
        gpu = get_criterion(name).score(model, graph, data, torch.device("cuda"), seed=0)
    assert all(p.device.type == "cpu" for p in model.parameters())  # the caller's model stays put
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for g in graph.prunable_groups():
        s = gpu[g.id]
        assert s.device.type == "cpu" and s.shape == (g.channels,) and torch.isfinite(s).all()
        if name == "hrank":  # mean integer ranks of 48 maps: cuSOLVER and LAPACK may split a near-tie differently
            assert (s - cpu[g.id]).abs().max() <= 3 / 48 + 1e-9, (name, g.name)
        elif name not in ("cac", "whitebox"):  # random draws differ between CPU and CUDA generators
            assert torch.allclose(s, cpu[g.id], rtol=1e-3, atol=1e-4 * float(cpu[g.id].abs().max())), (name, g.name)


# ------------------------------------------------------------------------------------------
# Criterion options from the command line, unlabelled data, White-Box BN rescale
# ------------------------------------------------------------------------------------------


def test_parse_criterion_opts_types_and_errors() -> None:
    info = get_criterion("info")
    assert parse_criterion_opts(info, ["bins=64", "sigma=0.5", "relu=false", "samples=pooled"]) == {
        "bins": 64, "sigma": 0.5, "relu": False, "samples": "pooled"}
    assert parse_criterion_opts(info, None) == {}
    with pytest.raises(UserError, match="valid keys for 'info': bins") as err:
        parse_criterion_opts(info, ["binz=3"])
    assert "sigma (default" in str(err.value)
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_criterion_opts(info, ["bins"])
    with pytest.raises(UserError, match="not a valid int"):
        parse_criterion_opts(info, ["bins=many"])
    with pytest.raises(UserError, match="takes no options"):
        parse_criterion_opts(get_criterion("random"), ["p=2"])
    rows = {name: opts for name, _, opts, _, _ in criteria_table()}
    assert set(rows) == set(available()) and "lam=0.05" in rows["whitebox"] and rows["random"] == "-"
    assert rows["l1"] == "side=out"


def test_norm_side_both_counts_the_consumers_weights() -> None:
    """side=both: a channel nobody reads (zero consumer column) loses to one that is read."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)  # every producing filter equal
        model[2].weight.fill_(1.0)
        model[2].weight[:, 1] = 0.0  # channel 1 is never read
    graph = build_graph(model, (3, 6, 6))
    (group,) = [g for g in graph.prunable_groups() if g.channels == 4]
    out = get_criterion("l1").score(model, graph, None, CPU)[group.id]
    both = get_criterion("l1").score(model, graph, None, CPU, side="both")[group.id]
    assert torch.allclose(out, out[0].expand(4))  # producers alone cannot tell them apart
    assert int(both.argmin()) == 1 and float(both[1]) < float(both[0])


@pytest.mark.parametrize("source", ["synthetic:3x8x8:1", "folder"])
def test_unlabelled_data_fails_early_for_label_criteria(source: str, tmp_path) -> None:
    if source == "folder":  # an ImageFolder with a single folder: unlabelled calibration images
        (tmp_path / "all").mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "all" / f"{i}.png")
        source = str(tmp_path)
    for name in LABEL_CRITERIA:
        with pytest.raises(UserError, match=f"criterion '{name}' needs labelled data.*single class"):
            check_requirements(get_criterion(name), True, data_source=source)
    for name in ("hrank", "info"):  # label-free criteria accept it
        check_requirements(get_criterion(name), True, data_source=source)
    check_requirements(get_criterion("sensitivity"), True, options={"hessian": "activation"}, data_source=source)
    check_requirements(get_criterion("taylor"), True, data_source="synthetic:3x8x8:4")


def test_cli_criterion_opt_and_unlabelled(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn", None)).state_dict(), "d.pt")
    runner = CliRunner()
    base = ["score", "d.pt", "--arch", "digits_cnn", "--data", "digits:test", "--calib-batches", "1"]
    res = runner.invoke(app, [*base, "--criterion", "info", "--criterion-opt", "binz=4", "--out", "x.safetensors"])
    assert res.exit_code == 2 and "valid keys for 'info'" in res.output
    res = runner.invoke(app, [*base, "--criterion", "info", "--criterion-opt", "bins=16", "--criterion-opt", "sigma=0.5",
                              "--out", "s.safetensors"])
    assert res.exit_code == 0, res.output
    with safe_open("s.safetensors", "pt") as f:
        meta = json.loads(f.metadata()["chanprune_scores"])
    assert meta["options"]["bins"] == 16 and meta["options"]["sigma"] == 0.5 and meta["options"]["relu"] is True
    res = runner.invoke(app, ["score", "d.pt", "--arch", "digits_cnn", "--criterion", "taylor", "--data", "synthetic:1x8x8:1",
                              "--out", "t.safetensors"])
    assert res.exit_code == 2 and "needs labelled data" in res.output
    res = runner.invoke(app, ["prune", "d.pt", "--arch", "digits_cnn", "--criterion", "info", "--criterion-opt", "sigma=0",
                              "--data", "digits:test", "--calib-batches", "1", "--recalibrate-bn", "0", "--ratio", "0.25",
                              "--out", "p.safetensors", "--json", "p.json"])
    assert res.exit_code == 0, res.output
    assert json.loads(open("p.json").read())["criterion_options"]["sigma"] == 0.0
    res = runner.invoke(app, ["score", "--list-criteria"])
    assert res.exit_code == 0 and "hist_range" in res.output


def test_whitebox_rescale_folds_the_masks_into_the_weights(mixed: tuple) -> None:
    model, graph = mixed
    model.eval()
    gen = torch.Generator().manual_seed(3)
    scales = {g.id: torch.rand(g.channels, generator=gen, dtype=torch.float64) + 0.5 for g in graph.prunable_groups()}
    x = torch.randn(4, 3, 8, 8)
    rescaled = copy.deepcopy(model)
    pruning.rescale_channels(rescaled, graph, scales)
    with torch.no_grad(), ChannelGates(model, graph) as gates:
        gates.gates = {gid: s.float() for gid, s in scales.items()}
        want = model(x)
    with torch.no_grad():
        assert torch.allclose(rescaled(x), want, atol=1e-5, rtol=1e-4)
    # the criterion carries the factors sum_k M[k, c] / 2; prune applies them and still verifies
    scores = get_criterion("whitebox").score(model, graph, make_data(2), CPU, rescale=True)
    factors = channel_scales(scores)
    assert set(factors) == set(scores) and all(torch.allclose(factors[g].abs() * 2, scores[g]) for g in scores)
    before = _state(model)
    out = pruning.prune(model, graph, scores, (3, 8, 8), criterion="whitebox", options=AllocationOptions(ratio=0.25))
    assert out.verify.passed and out.plan_record.get("channel_rescale") is True
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    plain = pruning.prune(model, graph, scores, (3, 8, 8), criterion="whitebox", options=AllocationOptions(ratio=0.25),
                          rescale=False)
    assert "channel_rescale" not in plain.plan_record
    assert not get_criterion("whitebox").score(model, graph, make_data(2), CPU).__dict__.get("channel_scale")


def test_prune_ranks_loss_unit_scores_unnormalised(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """`--normalize auto` on a taylor score file ranks the raw scores (recorded as 'none' in the JSON
    and the history); `--normalize mean` divides by each group's mean, which changes the plan."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(build_model(parse_arch("digits_cnn", None)).state_dict(), "d.pt")
    runner = CliRunner()
    res = runner.invoke(app, ["score", "d.pt", "--arch", "digits_cnn", "--criterion", "taylor", "--data", "digits:test",
                              "--calib-batches", "2", "--out", "t.safetensors"])
    assert res.exit_code == 0, res.output
    docs = {}
    for mode in ("auto", "mean"):
        res = runner.invoke(app, ["prune", "d.pt", "--arch", "digits_cnn", "--scores", "t.safetensors", "--target-flops", "0.2",
                                  "--normalize", mode, "--out", f"{mode}.safetensors", "--json", f"{mode}.json"])
        assert res.exit_code == 0, res.output
        docs[mode] = json.loads(Path(f"{mode}.json").read_text())
        with safe_open(f"{mode}.safetensors", "pt") as f:
            history = json.loads(f.metadata()["chanprune"])["history"]
        assert history[-1]["normalize"] == docs[mode]["normalize"]
    assert docs["auto"]["normalize"] == "none" and docs["mean"]["normalize"] == "mean"
    widths = {mode: [(layer["name"], layer["out_after"]) for layer in doc["layers"]] for mode, doc in docs.items()}
    assert widths["auto"] != widths["mean"]


def test_sensitivity_block_fisher_is_half_the_squared_gate_gradient(mixed: tuple) -> None:
    """The Fisher over a channel's removal parameters: 1/2 E[(sum_q g_q w_q)^2] = 1/2 E[(dL/dgate)^2]."""
    model, graph = mixed
    data = make_data(3)
    sens = get_criterion("sensitivity").score(model, graph, data, CPU)
    taylor = get_criterion("taylor").score(model, graph, data, CPU)
    assert set(sens) == set(taylor) and all(torch.allclose(sens[g], 0.5 * taylor[g]) for g in sens)
    diagonal = get_criterion("sensitivity").score(model, graph, data, CPU, fisher="diagonal")
    assert any(not torch.allclose(diagonal[g], sens[g]) for g in sens)


def test_whitebox_cycles_its_batches_for_its_steps_and_warns_below_its_budget(mixed: tuple) -> None:
    from chanprune_cli.data.base import DataWarning

    model, graph = mixed
    data = make_data(2)
    seen: list[int] = []

    def once() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # a one-shot iterator: replayed from memory
        for i, batch in enumerate(data):
            seen.append(i)
            yield batch

    with pytest.warns(DataWarning, match="need at least 100"):
        from_iterator = whitebox_masks(model, graph, once(), CPU, steps=5)
    with pytest.warns(DataWarning, match="need at least 100"):
        from_list = whitebox_masks(model, graph, data, CPU, steps=5)
    assert seen == [0, 1]  # drawn once, then replayed
    assert all(torch.equal(from_iterator[g], from_list[g]) for g in from_list)
    with pytest.warns(DataWarning, match="need at least 100"):
        fewer = whitebox_masks(model, graph, data, CPU, steps=4, lr=0.0)  # lr 0: the masks stay where they start
    assert all(torch.allclose(m, torch.full_like(m, 2 / (m.shape[0] + 1))) for m in fewer.values())


def test_cac_ranks_loss_changes_across_groups_unless_told_per_group(mixed: tuple) -> None:
    model, graph = mixed
    cac = get_criterion("cac")
    assert cac.in_loss_units({}) and not cac.in_loss_units({"units": "group"})
    assert not cac.in_loss_units({"metric": "accuracy"})
    data = make_data(3)
    loss = cac.score(model, graph, data, CPU, mc_weight=0)  # the first-order part alone
    group = cac.score(model, graph, data, CPU, mc_weight=0, units="group")
    for g in loss:  # the loss change as estimated, or divided by its group's mean
        assert torch.allclose(group[g], loss[g] / loss[g].abs().mean())
    with pytest.raises(UserError, match="units must be one of loss, group"):
        cac.score(model, graph, data, CPU, units="nats")


def test_list_criteria_shows_each_budget() -> None:
    costs = {name: cost for name, _, _, _, cost in criteria_table()}
    assert costs["l1"] == "no pass over data" and "1 forward + backward per batch" in costs["taylor"]
    assert "`steps`" in costs["whitebox"] and "`max_images`" in costs["hrank"]


def test_hrank_says_when_residual_streams_are_ranked() -> None:
    from chanprune_cli.data.base import DataWarning

    model = build_model(parse_arch("cifar_resnet20")).eval()
    data = make_data(1, batch=2, shape=(3, 32, 32), classes=10)
    with pytest.warns(DataWarning, match=r"hrank ranks the channels of 1 residual stream\(s\) \(conv1\)"):
        get_criterion("hrank").score(model, build_graph(model, (3, 32, 32)), data, CPU)
    inner = build_graph(model, (3, 32, 32), ignore=("conv1", "layer*.*.conv2"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        get_criterion("hrank").score(model, inner, data, CPU)
