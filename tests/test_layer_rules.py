"""The layer-rule table: a user-registered layer type is traced, scored, pruned, verified, saved.

`ChannelScale` stands for the many per-channel layers of model zoos (LayerScale, affine
"norms", learnable gains) written with a fused kernel the tracer does not know (`addcmul`), so
left alone it pins the channels. One registration makes every part of chanprune handle it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from chanprune_cli.criteria import get_criterion
from chanprune_cli.criteria.gates import ChannelGates
from chanprune_cli.engine import ChannelwiseRule, ConvRule, LayerRule, layer_rules, register_layer_rule, rule_for
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.engine.shapes import apply_shape_attrs, shape_attrs
from chanprune_cli.engine.surgery import mask_model, prune_model, verify
from chanprune_cli.prune.describe import layer_rows

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 12, 12)


class ChannelScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.num_channels = channels
        self.weight = nn.Parameter(torch.randn(channels))
        self.bias = nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))


class Net(nn.Module):
    def __init__(self, act: str = "sigmoid") -> None:
        super().__init__()
        # sigmoid(0) != 0: masking must cut conv2's inputs too; relu(0) == 0: a gate of 0 masks
        self.act = torch.sigmoid if act == "sigmoid" else torch.relu
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.scale = ChannelScale(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.scale(self.conv1(x)))
        return self.fc(self.pool(torch.relu(self.conv2(x))).flatten(1))


@pytest.fixture
def table(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test are undone afterwards. (The rules of layer libraries imported
    so far are registered first: registered into the test's copy, they would be lost.)"""
    layer_rules._load_library_rules()
    monkeypatch.setattr(layer_rules, "_RULES", dict(layer_rules._RULES))
    monkeypatch.setattr(layer_rules, "_LEAVES", set(layer_rules._LEAVES))
    yield


def conv1_group(model: nn.Module):  # type: ignore[no-untyped-def]
    graph = build_graph(model, SHAPE)
    return graph, next(g for g in graph.groups if g.name == "conv1")


def test_unregistered_layer_pins_its_channels(table: None) -> None:
    torch.manual_seed(0)
    _, group = conv1_group(Net().eval())
    assert not group.prunable and "unsupported op addcmul" in (group.reason or "")


def test_registered_layer_is_pruned_verified_and_saved(table: None) -> None:
    register_layer_rule(ChannelScale, ChannelwiseRule("num_channels", ("weight", "bias")))
    torch.manual_seed(0)
    model = Net().eval()
    graph, group = conv1_group(model)
    assert group.prunable and group.channels == 8
    assert {m for slots in group.classes for m, _, _ in slots} == {"conv1", "scale", "conv2"}

    plan = {group.id: [0, 3, 5]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert pruned.scale.num_channels == 5 and pruned.scale.weight.shape == (5,) and pruned.conv2.in_channels == 5
    assert verify(model, graph, plan, pruned, SHAPE).passed

    # The recorded shape attributes rebuild the pruned architecture from a fresh model.
    record = shape_attrs(pruned)
    assert record["scale"] == {"num_channels": 5}
    fresh = Net()
    apply_shape_attrs(fresh, record, {k: tuple(v.shape) for k, v in pruned.state_dict().items()})
    fresh.load_state_dict(pruned.state_dict())
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned(x))

    # It trains.
    pruned.train()
    loss = pruned(x).square().mean()
    loss.backward()
    assert pruned.scale.weight.grad is not None and pruned.scale.weight.grad.shape == (5,)


def test_registered_layer_is_a_gate_point_for_data_driven_criteria(table: None) -> None:
    register_layer_rule(ChannelScale, ChannelwiseRule("num_channels", ("weight", "bias")))
    torch.manual_seed(0)
    model = Net(act="relu").eval()
    graph, group = conv1_group(model)
    x = torch.randn(2, *SHAPE)
    # A gate of 0 on a class computes what masking it computes (the channel is gated after its
    # per-channel bias, which would otherwise re-create it).
    removed = [1, 6]
    masked = copy.deepcopy(model)
    mask_model(masked, graph, {group.id: removed})
    with ChannelGates(model, graph) as gates, torch.no_grad():
        gate = torch.ones(group.channels)
        gate[removed] = 0
        gates.gates[group.id] = gate
        gated = model(x)
    torch.testing.assert_close(gated, masked(x))
    assert any(pt.module == "scale" for pt in gates.points[group.id])

    data = [(torch.randn(4, *SHAPE), torch.randint(0, 4, (4,))) for _ in range(2)]
    scores = get_criterion("taylor").score(model, graph, data, torch.device("cpu"))
    assert scores[group.id].shape == (8,) and torch.isfinite(scores[group.id]).all()


def test_per_channel_parameters_of_any_module_are_sliced_without_a_rule() -> None:
    # A layer scale / bias written with plain elementwise ops: the parameter's entries follow
    # the channels they meet (slot kind "tensor:ATTR:DIM"), no registration needed.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.gamma = nn.Parameter(torch.randn(8, 1, 1))
            self.shift = nn.Parameter(torch.randn(8))
            self.head = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.gamma * self.conv(x) + self.shift.view(1, -1, 1, 1)
            return self.head(torch.sigmoid(y))

    torch.manual_seed(0)
    model = Block().eval()
    graph = build_graph(model, SHAPE)
    group = next(g for g in graph.groups if g.name == "conv")
    assert group.prunable
    plan = {group.id: [2, 5]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert pruned.gamma.shape == (6, 1, 1) and pruned.shift.shape == (6,) and pruned.head.in_channels == 6
    assert verify(model, graph, plan, pruned, SHAPE).passed


def test_rules_follow_the_class_hierarchy_and_registration_replaces(table: None) -> None:
    class MyConv(nn.Conv2d):
        pass

    assert rule_for(MyConv(3, 4, 1)) is rule_for(nn.Conv2d(3, 4, 1))  # subclass: nearest registered base
    assert rule_for(nn.LazyConv2d(4, 1)) is rule_for(nn.Conv2d(3, 4, 1))

    class Custom(LayerRule):
        pass

    custom = Custom()
    register_layer_rule(MyConv, custom)
    assert rule_for(MyConv(3, 4, 1)) is custom and isinstance(rule_for(nn.Conv2d(3, 4, 1)), ConvRule)
    with pytest.raises(TypeError):
        register_layer_rule(int, custom)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_layer_rule(MyConv, object())  # type: ignore[arg-type]


def test_checkpoints_record_the_built_in_shape_attributes_of_every_module() -> None:
    # The chanprune format lists these attributes for every module that has one (torchvision's
    # ResNet root has `groups`), whatever was imported first.
    assert layer_rules.shape_attr_names() == (
        "in_channels", "out_channels", "groups", "num_features", "in_features", "out_features", "num_groups",
        "num_channels", "normalized_shape", "num_parameters", "pad_front", "pad_back")

    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.groups = 1
            self.conv = nn.Conv2d(3, 4, 1)

    assert shape_attrs(Root())[""] == {"groups": 1}


def test_reports_describe_layers_through_the_table(table: None) -> None:
    register_layer_rule(ChannelScale, ChannelwiseRule("num_channels", ("weight", "bias")))
    rows = {r.name: r for r in layer_rows(Net(), {})}
    assert (rows["conv1"].in_channels, rows["conv1"].out_channels, rows["conv1"].kernel) == (3, 8, (3, 3))
    assert (rows["fc"].in_channels, rows["fc"].out_channels) == (6, 4)
    assert (rows["scale"].in_channels, rows["scale"].out_channels) == (8, 8)  # a per-channel layer, like a norm
    assert "act" not in rows and "pool" not in rows  # pass-through layers own no channels


def _layers_to_rescale() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """(id, layer, input shape): layers whose `scale_outputs` scales weight rows, columns or gains."""
    layers = [("Conv2d", nn.Conv2d(4, 6, 3), (4, 7, 7)), ("Conv2d grouped", nn.Conv2d(4, 6, 3, groups=2), (4, 7, 7)),
              ("ConvTranspose2d", nn.ConvTranspose2d(4, 6, 3), (4, 5, 5)), ("Linear", nn.Linear(4, 6), (4,)),
              ("BatchNorm2d", nn.BatchNorm2d(6), (6, 5, 5))]
    try:
        from timm.layers import CondConv2d, ScaledStdConv2d
    except ImportError:
        return layers
    return [*layers, ("ScaledStdConv2d", ScaledStdConv2d(4, 6, 3), (4, 7, 7)),
            ("CondConv2d", CondConv2d(4, 6, 3, num_experts=3), (4, 7, 7))]


@pytest.mark.parametrize(("layer", "shape"), [(m, s) for _, m, s in _layers_to_rescale()],
                         ids=[i for i, _, _ in _layers_to_rescale()])
def test_scale_outputs_scales_exactly_the_given_output_channels(layer: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    layer = layer.double().eval()
    with torch.no_grad():
        for t in (*layer.parameters(), *layer.buffers()):
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, dtype=t.dtype) + 0.5)  # every bias, gain and statistic non-trivial
    inputs = (torch.randn(2, *shape, dtype=torch.float64),)
    if type(layer).__name__ == "CondConv2d":
        inputs += (torch.rand(2, 3, dtype=torch.float64),)  # routing weights, one per expert
    before = layer(*inputs)
    channels, factors = torch.tensor([1, 4]), torch.tensor([2.5, 0.25])
    rule = rule_for(layer)
    assert rule is not None
    rule.scale_outputs(layer, channels, factors)
    want = before.clone()
    want[:, channels] *= factors.view([-1] + [1] * (before.dim() - 2)).to(want)
    torch.testing.assert_close(layer(*inputs), want)
