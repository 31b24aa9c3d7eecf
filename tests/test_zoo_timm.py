"""timm's layers through the layer-rule table, and `--arch timm:NAME` (skipped without timm).

Each layer type sits on the channels of a conv in a tiny host network: its coupling is checked on
the channel graph, then channels are removed, the pruned model is verified against the masked
original (float64) and trained one step. Layers whose channels cannot be removed exactly are
checked to be pinned with their reason. Random norm parameters and statistics make slicing
mistakes show.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

from timm import layers as tl  # noqa: E402
from timm.layers.grn import GlobalResponseNorm  # noqa: E402
from timm.layers.pool2d_same import MaxPool2dSame  # noqa: E402
from timm.models import byobnet, ghostnet  # noqa: E402

from chanprune_cli.checkpoint import load_checkpoint  # noqa: E402
from chanprune_cli.cli import main  # noqa: E402
from chanprune_cli.engine.graph import ChannelGraph, ChannelGroup, build_graph  # noqa: E402
from chanprune_cli.engine.shapes import apply_shape_attrs, shape_attrs  # noqa: E402
from chanprune_cli.engine.surgery import prune_model, verify  # noqa: E402
from chanprune_cli.errors import UserError  # noqa: E402
from chanprune_cli.models import build_model, default_input_shape, parse_arch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 16, 16)
C = 8


class Host(nn.Module):
    """conv1 (3 → 8) → layer → conv2 (→ 6) → mean over space → fc: the layer sits on conv1's
    channels (and, when it is a conv, produces conv2's)."""

    def __init__(self, layer: nn.Module, out: int = C) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.layer = layer
        self.conv2 = nn.Conv2d(out, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.layer(self.conv1(x))).mean((2, 3)))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random per-channel parameters and statistics everywhere (timm's norms start as identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or name.endswith("filt"):
                continue
            if "var" in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() == 1 or name.endswith("gain"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name.endswith(("weight", "gain")) else 0.0))
    return model.eval()


def group_of(graph: ChannelGraph, module: str) -> ChannelGroup:
    return next(g for g in graph.groups if any(m == module and k in ("out", "dw") for c in g.classes for m, k, _ in c))


def members(group: ChannelGroup) -> set[str]:
    return {m for slots in group.classes for m, _, _ in slots}


def train_step(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> None:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3)
    loss = model(torch.randn(4, *shape, generator=torch.Generator().manual_seed(1))).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(p.grad is not None for p in params)


def prune_verify_train(model: nn.Module, module: str = "conv1", remove: int = 3,
                       shape: tuple[int, ...] = SHAPE) -> tuple[ChannelGroup, nn.Module]:
    """Remove `remove` classes of `module`'s group, verify, train; returns (group, pruned)."""
    graph = build_graph(model, shape)
    group = group_of(graph, module)
    assert group.prunable, group.reason
    plan = {group.id: group.prunable_classes[1:1 + remove]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    result = verify(model, graph, plan, pruned, shape)
    assert result.passed, result
    train_step(copy.deepcopy(pruned), shape)
    return group, pruned


# (id, layer factory, check of the pruned layer after 3 of conv1's 8 channels went)
PER_CHANNEL: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], bool]]] = [
    ("BatchNormAct2d", lambda: tl.BatchNormAct2d(C, act_layer=nn.SiLU),
     lambda m: m.num_features == 5 and m.running_var.shape == (5,)),
    ("FrozenBatchNormAct2d", lambda: tl.FrozenBatchNormAct2d(C),
     lambda m: m.weight.shape == m.running_mean.shape == (5,)),
    ("EvoNorm2dB0", lambda: tl.EvoNorm2dB0(C), lambda m: m.v.shape == m.running_var.shape == (5,)),
    ("FilterResponseNormTlu2d", lambda: tl.FilterResponseNormTlu2d(C), lambda m: m.tau.shape == m.bias.shape == (5,)),
    ("FilterResponseNormAct2d", lambda: tl.FilterResponseNormAct2d(C, act_layer=nn.SiLU), lambda m: m.weight.shape == (5,)),
    ("BlurPool2d", lambda: tl.BlurPool2d(C, stride=2), lambda m: m.channels == 5 and m.filt.shape == (5, 1, 3, 3)),
    ("MaxPool2dSame", lambda: MaxPool2dSame(3, stride=2), lambda m: True),
    ("PReLU", lambda: tl.activations.PReLU(C), lambda m: m.weight.shape == (5,)),
    ("HardSwish", lambda: tl.activations.HardSwish(), lambda m: True),
    ("DropPath", lambda: tl.DropPath(0.5), lambda m: True),  # random in train mode: traced there too
    ("SEModule", lambda: tl.SEModule(C, rd_channels=4), lambda m: m.fc1.in_channels == 5 and m.fc2.out_channels == 5),
    ("ScaledStdConv2d depthwise", lambda: tl.ScaledStdConv2d(C, C, 3, groups=C),
     lambda m: m.weight.shape == (5, 1, 3, 3) and m.gain.shape == (5, 1, 1, 1)),
    ("Conv2dSame", lambda: tl.Conv2dSame(C, C, 3, stride=2), lambda m: m.in_channels == 5),
    ("MixedConv2d depthwise", lambda: tl.MixedConv2d(C, C, [3, 5], depthwise=True),
     lambda m: sum(m.splits) == m.in_channels == m.out_channels == 5 and all(c.groups == c.in_channels for c in m.values())),
    ("MixedConv2d", lambda: tl.MixedConv2d(C, 10, [1, 3]), lambda m: sum(m.splits) == m.in_channels == 5),
    # its conv has one group per radix: input j of each group falls with it (3 classes = 6 channels)
    ("SplitAttn", lambda: tl.SplitAttn(C, C, radix=2), lambda m: m.conv.in_channels == 2),
    ("RepVggBlock", lambda: byobnet.RepVggBlock(C, C), lambda m: m.conv_kxk.conv.in_channels == 5),
    ("MobileOneBlock", lambda: byobnet.MobileOneBlock(C, C, num_conv_branches=2),
     lambda m: m.conv_kxk[1].conv.in_channels == 5),
    ("GhostModule", lambda: ghostnet.GhostModule(C, C), lambda m: m.primary_conv[0].in_channels == 5),
    # the mean over channels now counts 5: weight and eps scale by 8/5
    ("GlobalResponseNorm", lambda: GlobalResponseNorm(C, channels_last=False),
     lambda m: m.weight.shape == (5,) and m.eps == pytest.approx(1e-6 * C / 5)),
]


@pytest.mark.parametrize("factory,check", [(f, c) for _, f, c in PER_CHANNEL], ids=[i for i, _, _ in PER_CHANNEL])
def test_layer_passes_its_channels_and_is_pruned_exactly(factory: Callable[[], nn.Module],
                                                         check: Callable[[nn.Module], bool]) -> None:
    torch.manual_seed(0)
    layer = factory()
    model = randomized(Host(layer, out=getattr(layer, "out_channels", C)))
    group, pruned = prune_verify_train(model)
    assert "layer" in {m.split(".")[0] for m in members(group)} or not list(model.layer.parameters())
    # a layer that computes new channels keeps its outputs; the others pass conv1's on to conv2
    # (RepVGG and MobileOne blocks with their identity branch too)
    new_channels = isinstance(model.layer, (ghostnet.GhostModule, tl.Conv2dSame, tl.SplitAttn)) or (
        isinstance(model.layer, tl.MixedConv2d) and model.layer.out_channels != C)
    assert pruned.conv2.in_channels == (model.conv2.in_channels if new_channels else C - 3)
    assert check(pruned.layer)


@pytest.mark.parametrize("factory,groups", [
    (lambda: tl.GroupNormAct(C, num_groups=4, act_layer=nn.SiLU), 4),
    (lambda: tl.EvoNorm2dS0(C, groups=4), 4),
    (lambda: tl.EvoNorm2dS1(C, groups=2), 2),
], ids=["GroupNormAct", "EvoNorm2dS0", "EvoNorm2dS1"])
def test_grouped_norms_remove_whole_groups(factory: Callable[[], nn.Module], groups: int) -> None:
    torch.manual_seed(0)
    model = randomized(Host(factory()))
    group, pruned = prune_verify_train(model, remove=1)
    assert group.channels == groups  # the channels of one norm group stand or fall together
    layer = pruned.layer
    assert getattr(layer, "num_groups", getattr(layer, "groups", None)) == groups - 1
    assert layer.weight.shape == (C - C // groups,)


def test_weight_standardised_conv_keeps_its_inputs_and_prunes_its_outputs() -> None:
    torch.manual_seed(0)
    for conv in (tl.StdConv2d(C, 10, 3, padding=1), tl.ScaledStdConv2d(C, 10, 3)):
        model = randomized(Host(conv, out=10))
        graph = build_graph(model, SHAPE)
        inputs = group_of(graph, "conv1")
        assert not inputs.prunable and "standardises each filter over its input channels" in (inputs.reason or "")
        group, pruned = prune_verify_train(model, module="layer")
        assert pruned.layer.out_channels == 7 and pruned.layer.in_channels == C and pruned.conv2.in_channels == 7
        if isinstance(conv, tl.ScaledStdConv2d):
            assert pruned.layer.gain.shape == (7, 1, 1, 1)


@pytest.mark.parametrize("factory,reason", [
    (lambda: tl.EcaModule(C), "1-D conv sliding along the channels"),
    (lambda: tl.GroupNorm1Act(C), "normalises over all channels"),
    (lambda: tl.LayerNorm2d(C), "normalises over channels"),
    (lambda: tl.RmsNormAct2d(C), "normalises over channels"),
], ids=["EcaModule", "GroupNorm1Act", "LayerNorm2d", "RmsNormAct2d"])
def test_layers_that_mix_channels_pin_them_with_a_reason(factory: Callable[[], nn.Module], reason: str) -> None:
    torch.manual_seed(0)
    graph = build_graph(randomized(Host(factory())), SHAPE)
    group = group_of(graph, "conv1")
    assert not group.prunable and reason in (group.reason or "")
    assert all(g.prunable for g in graph.groups if g is not group and g.name != "fc")


class ChannelsLastMlp(nn.Module):
    """ConvNeXt-V2's MLP: Linear → GELU → GlobalResponseNorm → Linear on channels-last tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.fc1 = nn.Linear(C, 12)
        self.grn = GlobalResponseNorm(12, channels_last=True)
        self.fc2 = nn.Linear(12, C)
        self.fc = nn.Linear(C, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).permute(0, 2, 3, 1)
        return self.fc(self.fc2(self.grn(nn.functional.gelu(self.fc1(x)))).mean((1, 2)))


def test_global_response_norm_channels_last_is_pruned_exactly_and_rebuilt() -> None:
    torch.manual_seed(0)
    model = randomized(ChannelsLastMlp())
    group, pruned = prune_verify_train(model, module="fc1", remove=4)
    assert {"fc1", "grn", "fc2"} <= members(group)
    assert pruned.grn.weight.shape == (8,) and pruned.fc2.in_features == 8
    record = shape_attrs(pruned)
    assert record["grn"]["eps"] == pytest.approx(1e-6 * 12 / 8)
    fresh = ChannelsLastMlp()
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, record, {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))


class CondHost(nn.Module):
    """conv1 → CondConv2d mixing 3 experts by routing weights computed from its input → conv2."""

    def __init__(self, depthwise: bool) -> None:
        super().__init__()
        out = C if depthwise else 10
        self.conv1 = nn.Conv2d(3, C, 3, padding=1)
        self.routing = nn.Linear(C, 3)
        self.layer = tl.CondConv2d(C, out, 3, padding=1, groups=C if depthwise else 1, bias=True, num_experts=3)
        self.conv2 = nn.Conv2d(out, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        routing = torch.sigmoid(self.routing(x.mean((2, 3))))
        return self.fc(self.conv2(self.layer(x, routing)).mean((2, 3)))


@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_cond_conv_slices_every_expert_and_keeps_the_routing(depthwise: bool) -> None:
    torch.manual_seed(0)
    model = randomized(CondHost(depthwise))
    routing = group_of(build_graph(model, SHAPE), "routing")
    assert not routing.prunable and "mixes its experts by these weights" in (routing.reason or "")
    group, pruned = prune_verify_train(model)  # conv1's channels: the experts' inputs and the routing's
    assert pruned.layer.in_channels == 5 and pruned.routing.in_features == 5
    kept_out = 5 if depthwise else 10
    assert pruned.layer.weight.shape == (3, kept_out * (1 if depthwise else 5) * 9)
    if not depthwise:
        group, pruned = prune_verify_train(model, module="layer")
        assert pruned.layer.out_channels == 7 and pruned.layer.bias.shape == (3, 7) and pruned.conv2.in_channels == 7
    fresh = CondHost(depthwise)
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, shape_attrs(pruned), {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))


def test_timm_linear_is_a_linear_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), tl.Linear(C, 6), nn.ReLU(),
                          tl.Linear(6, 4)).eval()
    group, pruned = prune_verify_train(model, module="3", remove=2)
    assert pruned[3].out_features == 4 and pruned[5].in_features == 4


def test_pruned_blur_pool_is_rebuilt_from_its_record() -> None:
    # BlurPool2d does not save its filter; a pruned one must, or the rebuilt model has the old width.
    torch.manual_seed(0)
    model = randomized(Host(tl.BlurPool2d(C, stride=2)))
    _, pruned = prune_verify_train(model)
    fresh = Host(tl.BlurPool2d(C, stride=2))
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, shape_attrs(pruned), {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))


def test_selective_kernel_couples_its_input_pieces_and_prunes_its_outputs() -> None:
    torch.manual_seed(0)
    model = randomized(Host(tl.SelectiveKernel(C, 10, rd_channels=4), out=10))
    group, pruned = prune_verify_train(model, remove=1)
    assert group.channels == C // 2  # channel j of each half goes to its own path: they fall together
    assert pruned.layer.in_channels == C - 2 and all(p.conv.in_channels == C // 2 - 1 for p in pruned.layer.paths)
    group, pruned = prune_verify_train(model, module="layer")
    assert pruned.layer.out_channels == 7 and pruned.layer.attn.fc_reduce.in_channels == 7
    assert pruned.layer.attn.fc_select.out_channels == 14 and pruned.conv2.in_channels == 7


def test_properties_are_not_recorded_and_older_records_of_them_still_load() -> None:
    # ConvNormAct.in_channels is a read-only property over its conv: recording and setting it made
    # every pruned timm model with ConvNormAct (dpn, cs3darknet, ...) fail to reload.
    torch.manual_seed(0)
    model = randomized(Host(tl.ConvNormAct(C, C, 3)))
    _, pruned = prune_verify_train(model)
    record = shape_attrs(pruned)
    assert "in_channels" not in record.get("layer", {}) and record["layer.conv"]["in_channels"] == 5
    record["layer"] = {"in_channels": 5, "out_channels": C}  # as files written before held it
    fresh = Host(tl.ConvNormAct(C, C, 3))
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, record, {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))


def test_pruned_mixed_conv_is_rebuilt_from_its_record() -> None:
    torch.manual_seed(0)
    model = randomized(Host(tl.MixedConv2d(C, 10, [1, 3, 5]), out=10))
    _, pruned = prune_verify_train(model, module="layer", remove=4)
    record = shape_attrs(pruned)
    assert record["layer"]["splits"] == list(pruned.layer.splits) and sum(pruned.layer.splits) == C
    fresh = Host(tl.MixedConv2d(C, 10, [1, 3, 5]), out=10)
    tensors = pruned.state_dict()
    apply_shape_attrs(fresh, record, {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, *SHAPE)
    torch.testing.assert_close(fresh.eval()(x), pruned.eval()(x))


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_byobnet"])
def test_small_timm_models_prune_verify_and_train(name: str) -> None:
    torch.manual_seed(0)
    model = randomized(timm.create_model(name, num_classes=10))
    shape = (3, 32, 32)
    graph = build_graph(model, shape)
    plan = {g.id: g.prunable_classes[: int(0.3 * g.channels)] for g in graph.prunable_groups()}
    plan = {k: v for k, v in plan.items() if v}
    assert len(plan) >= 0.8 * len(graph.groups) - 1  # all but the output group and a few
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert verify(model, graph, plan, pruned, shape).passed
    assert sum(p.numel() for p in pruned.parameters()) < 0.8 * sum(p.numel() for p in model.parameters())
    train_step(pruned, shape)


# ------------------------------------------------------------------------------------------------
# --arch timm:NAME


def test_timm_source_builds_untrained_models_with_their_input_size() -> None:
    model = build_model(parse_arch("timm:test_resnet", '{"num_classes": 7}'))
    assert model.get_classifier().out_features == 7
    assert default_input_shape(parse_arch("timm:efficientnet_b3")) == (3, 288, 288)  # timm's configuration
    assert default_input_shape(parse_arch("timm:efficientnet_b3", {"img_size": 160, "in_chans": 1})) == (1, 160, 160)


@pytest.mark.parametrize("arch,kwargs,message", [
    ("timm:resnet18", {"pretrained": True}, "would download weights"),
    ("timm:resnet18", {"checkpoint_path": "w.pth"}, "timm's own loader"),
    ("timm:resnt18", {}, "did you mean timm:resnet18"),
    ("timm:hf-hub:timm/resnet18.a1_in1k", {}, "hf-hub: models are not supported"),
    ("timm:resnet18", {"no_such_kwarg": 1}, "cannot build timm:resnet18"),
    ("efficientnet_lite0", {}, "did you mean timm:efficientnet_lite0"),
])
def test_timm_source_refuses_what_it_cannot_build(arch: str, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match="(?i)" + message):
        build_model(parse_arch(arch, kwargs))


def test_timm_source_without_timm_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` now raises ImportError
    with pytest.raises(UserError, match=r"pip install 'chanprune\[timm\]'"):
        build_model(parse_arch("timm:resnet18"))


def test_cli_prunes_a_timm_model_and_refuses_pretrained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    ckpt = tmp_path / "effnet.pt"
    torch.save(randomized(timm.create_model("test_efficientnet")).state_dict(), ckpt)
    out = tmp_path / "pruned.safetensors"
    arch = ["--arch", "timm:test_efficientnet"]
    assert main(["prune", str(ckpt), *arch, "--input-shape", "3,32,32", "--ratio", "0.3", "--out", str(out)]) == 0
    loaded = load_checkpoint(str(out))  # timm:NAME builds a known model: no --arch needed to reload
    assert loaded.arch.name == "timm:test_efficientnet"
    assert sum(p.numel() for p in loaded.model.parameters()) < 0.8 * sum(
        p.numel() for p in timm.create_model("test_efficientnet").parameters())
    capsys.readouterr()
    assert main(["analyze", str(ckpt), *arch, "--arch-kwargs", '{"pretrained": true}']) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "would download weights" in err[0]
