"""Channel-group discovery: pins and their reasons, ignore globs, train-only heads, CIFAR stages.

Each model still prunes and verifies where something is prunable: a pin may make the engine
conservative, never wrong. (Per-pattern surgery shapes live in test_surgery.py.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from chanprune_cli.engine.graph import ChannelGraph, ChannelGroup, build_graph, match_ignored
from chanprune_cli.engine.surgery import prune_model, removals, verify
from chanprune_cli.errors import UserError
from chanprune_cli.models import build_model, parse_arch
from engine_helpers import randomize

# Tiny tensors: intra-op threads only add synchronisation (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")




def prune_verify(model: nn.Module, shape: Sequence[int], graph: ChannelGraph | None = None,
                 plan: dict[int, list[int]] | None = None) -> tuple[ChannelGraph, dict[int, list[int]], nn.Module]:
    """Remove every second prunable class of each group; verify; one train step."""
    graph = graph or build_graph(model, shape)
    if plan is None:
        plan = {g.id: g.prunable_classes[1::2] for g in graph.prunable_groups() if len(g.prunable_classes) > 1}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    res = verify(model, graph, plan, pruned, shape)
    assert res.passed, res
    pruned.train()
    out = pruned(torch.randn(2, *shape))
    outs = [out] if isinstance(out, torch.Tensor) else [t for t in out if isinstance(t, torch.Tensor)]
    sum(o.pow(2).mean() for o in outs).backward()
    pruned.eval()
    return graph, plan, pruned


def group_of(graph: ChannelGraph, module: str) -> ChannelGroup:
    for g in graph.groups:
        if any(m == module and k in ("out", "dw") for cls in g.classes for m, k, _ in cls):
            return g
    raise AssertionError(f"no group produces {module}")


class Body(nn.Module):
    """stem conv → (op under test) → conv → head conv; `op` is a callable on the stem output."""

    def __init__(self, op, mid_in: int = 8) -> None:
        super().__init__()
        self.op = op
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.mid = nn.Conv2d(mid_in, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        return self.head(F.relu(self.mid(self.op(x))))


# ------------------------------------------------------------------------------------------------
# pins with reasons
# ------------------------------------------------------------------------------------------------


def test_model_output_is_pinned() -> None:
    model = randomize(Body(lambda x: x))
    graph = build_graph(model, (3, 4, 4))
    head = group_of(graph, "head")
    assert not head.prunable and head.reason == "model output"
    assert set(head.pinned.values()) == {"model output"} and len(head.pinned) == 2
    assert group_of(graph, "stem").reason is None and group_of(graph, "mid").prunable
    prune_verify(model, (3, 4, 4), graph)


class ConvNeXtNorm(nn.Module):
    """LayerNorm over the channel axis via permute (ConvNeXt) — and one over a spatial axis."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.ln = nn.LayerNorm(8)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.ln_w = nn.LayerNorm(4)  # normalises over W only: channels pass through
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln(self.stem(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.head(self.ln_w(F.gelu(self.mid(x))))


def test_layer_norm_over_channels_is_pinned() -> None:
    model = randomize(ConvNeXtNorm())
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert not g.prunable and "LayerNorm ln normalises over channels" in g.reason
    assert group_of(graph, "mid").prunable and group_of(graph, "mid").reason is None
    _, _, p = prune_verify(model, (3, 4, 4), graph)
    assert p.stem.out_channels == 8 and p.mid.out_channels == 3


@torch.fx.wrap
def mystery_op(x: torch.Tensor) -> torch.Tensor:
    """A function fx cannot see into: reverses the channel order."""
    return x.flip(1)


class WrappedBody(Body):
    """Calls the fx.wrap'ed function by its global name, so tracing keeps it as one opaque call."""

    def __init__(self) -> None:
        super().__init__(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        return self.head(F.relu(self.mid(mystery_op(x))))


@pytest.mark.parametrize(
    "op, name",
    [
        (lambda x: x / torch.linalg.vector_norm(x, dim=1, keepdim=True), "vector_norm"),
        (lambda x: torch.fft.fft(x, dim=1).real, "fft"),
        ("wrapped", "mystery_op"),
        (lambda x: x.flip(1), "flip"),
        (lambda x: torch.cumsum(x, dim=1), "cumsum"),
    ],
)
def test_unsupported_op_pins_its_channels_with_the_op_name(op, name: str) -> None:
    model = randomize(WrappedBody() if op == "wrapped" else Body(op))
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert not g.prunable and name in g.reason
    assert any(name in u for u in graph.unfollowed)
    assert group_of(graph, "mid").prunable
    prune_verify(model, (3, 4, 4), graph)


@pytest.mark.parametrize(
    "op, mid_in, reason",
    [
        (lambda x: x[:, 2:6], 4, "channel selection"),
        (lambda x: x.narrow(1, 0, 4), 4, "channel selection"),
        (lambda x: x[:, [0, 2, 4, 6]], 4, "channel selection"),
        (lambda x: torch.cat(x.split([3, 5], 1)[::-1], 1), 8, "split into fixed sizes"),
        (lambda x: x.mean(1, keepdim=True).expand(-1, 8, -1, -1) * x, 8, "reduction over channels"),
        (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1], 8, "non-constant pad"),
        # literal channel counts go stale once a channel is removed
        (lambda x: x.flatten(1).view(-1, 8, 4, 4), 8, "reshape to a fixed channel count"),
        (lambda x: x.flatten(1).unflatten(1, (8, 4, 4)), 8, "reshape to a fixed channel count"),
        (lambda x: x.reshape(2, 8, 4, 4), 8, "reshape to a fixed channel count"),
        (lambda x: x.amax((2, 3), keepdim=True).expand(-1, 8, 4, 4) + x, 8, "expand to a fixed channel count"),
        (lambda x: x + torch.arange(8.0).view(1, 8, 1, 1), 8, "fixed per-channel tensor"),
    ],
)
def test_ops_that_fix_channel_positions_are_pinned(op, mid_in: int, reason: str) -> None:
    model = randomize(Body(op, mid_in))
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert not g.prunable and reason in g.reason, g.reason
    prune_verify(model, (3, 4, 4), graph)


@pytest.mark.parametrize(
    "op",
    [
        lambda x: F.pad(x, (0, 1, 0, 1)).amax((2, 3), keepdim=True) * x,  # spatial pad, then pool
        lambda x: F.pad(x, (1, 1, 1, 1))[:, :, 1:-1, 1:-1],
        lambda x: F.interpolate(x, scale_factor=2.0)[:, :, ::2, ::2],
        lambda x: x.transpose(2, 3).contiguous(),
        lambda x: F.max_pool2d(x, 3, 1, 1) + F.avg_pool2d(x, 3, 1, 1),
        lambda x: x * x.mean((2, 3), keepdim=True).sigmoid(),
        lambda x: x.flatten(2).unflatten(2, (4, 4)),
        lambda x: torch.stack([x, -x], 0).sum(0),
        lambda x: x.permute(0, 2, 3, 1).reshape(2, 16, -1).transpose(1, 2).reshape(x.shape),
    ],
)
def test_channel_preserving_ops_stay_prunable(op) -> None:
    model = randomize(Body(op))
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert g.prunable and g.reason is None, (g.reason, graph.unfollowed)
    _, _, p = prune_verify(model, (3, 4, 4), graph)
    assert p.stem.out_channels == 4 and p.mid.in_channels == 4


class LiteralView(nn.Module):
    """Classic LeNet-style `x.view(-1, 16 * 5 * 5)` before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.conv2 = nn.Conv2d(6, 4, 3)
        self.fc1 = nn.Linear(4 * 2 * 2, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(F.relu(self.conv1(x)))
        return self.fc2(F.relu(self.fc1(F.relu(x).view(-1, 4 * 2 * 2))))


def test_literal_view_before_linear_is_pinned_but_rest_prunes() -> None:
    model = randomize(LiteralView())
    graph = build_graph(model, (3, 6, 6))
    assert "reshape to a fixed channel count" in group_of(graph, "conv2").reason
    assert group_of(graph, "conv1").prunable and group_of(graph, "fc1").prunable
    _, _, p = prune_verify(model, (3, 6, 6), graph)
    assert (p.conv1.out_channels, p.conv2.out_channels, p.fc1.in_features, p.fc1.out_features) == (3, 4, 16, 3)


class SEExpandView(nn.Module):
    """SE written with view_as / expand_as: the other tensor only lends its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        s = x.mean((2, 3))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s))))
        s = s.view_as(x.mean((2, 3))).unsqueeze(-1).unsqueeze(-1)
        return self.head(x * s.expand_as(x))


def test_expand_as_and_view_as_are_not_selections() -> None:
    model = randomize(SEExpandView())
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "conv")
    assert g is group_of(graph, "fc2") and g.prunable and not g.pinned
    _, _, p = prune_verify(model, (3, 4, 4), graph)
    assert p.conv.out_channels == 4 and p.fc2.out_features == 4 and p.fc1.in_features == 4


# ------------------------------------------------------------------------------------------------
# ignore globs, train-only heads, plan validation
# ------------------------------------------------------------------------------------------------


class TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
        self.neck = nn.Conv2d(6, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.neck(self.features(x))).mean((2, 3)))


def test_ignore_globs_pin_matching_producers() -> None:
    model = randomize(TwoStage())
    graph = build_graph(model, (3, 4, 4), ignore=("features.*",))
    for name in ("features.0", "features.2"):
        g = group_of(graph, name)
        assert not g.prunable and g.reason == "ignored by --ignore"
    assert group_of(graph, "neck").prunable and group_of(graph, "neck").reason is None
    _, _, p = prune_verify(model, (3, 4, 4), graph)
    assert p.features[0].out_channels == 6 and p.neck.out_channels == 2
    assert match_ignored((n for n, _ in model.named_modules()), ["features.*", "nope*"]) == ["nope*"]
    graph2 = build_graph(model, (3, 4, 4), ignore=("neck",))
    assert group_of(graph2, "neck").reason == "ignored by --ignore" and group_of(graph2, "features.0").prunable


def test_removals_reject_pinned_and_out_of_range() -> None:
    graph = build_graph(randomize(TwoStage()), (3, 4, 4), ignore=("neck",))
    with pytest.raises(UserError, match="cannot be removed"):
        removals(graph, {group_of(graph, "neck").id: [0]})
    g = group_of(graph, "features.0")
    with pytest.raises(UserError, match="cannot remove index"):
        removals(graph, {g.id: [g.channels]})
    with pytest.raises(UserError, match="does not have"):
        removals(graph, {999: [0]})


class AuxNet(nn.Module):
    """Inception-style auxiliary classifier, run only in train mode."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.aux = nn.Sequential(nn.Conv2d(8, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor):
        x = F.relu(self.bn(self.stem(x)))
        out = self.head(x).mean((2, 3))
        if self.training:
            return out, self.aux(x)
        return out


def test_train_only_aux_head_is_in_the_groups() -> None:
    model = randomize(AuxNet())
    graph = build_graph(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert "aux.0" in g.members and g.prunable
    assert group_of(graph, "aux.0").prunable  # its output feeds a Linear, not the output directly
    assert group_of(graph, "aux.4").reason == "model output"
    _, _, p = prune_verify(model, (3, 4, 4), graph)
    assert p.aux[0].in_channels == 4 and p.aux[0].out_channels == 2 and p.aux[4].in_features == 2
    assert p.head.in_channels == 4
    # eval-only tracing does not see the aux head: its input conv would be left stale
    eval_only = build_graph(model, (3, 4, 4), train_mode=False)
    assert "aux.0" not in group_of(eval_only, "stem").members


def test_control_flow_on_tensors_is_recorded_from_a_real_forward() -> None:
    # torch.fx cannot trace `if` on a tensor; one recorded forward follows the branch it took.
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.conv2 = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.bn(self.conv1(x)))
            if y.shape[-1] % 2 == 0 and x.sum() != 0:
                y = y + 1.0
            return self.conv2(y).mean((2, 3))

    model = randomize(DataDependent())
    graph = build_graph(model, (3, 6, 6))
    assert graph.tracing == "recorded"
    group = next(g for g in graph.groups if g.name == "conv1")
    assert group.prunable and group.members == ["conv1", "bn", "conv2"]
    plan = {group.id: [1, 4]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert pruned.conv2.in_channels == 6 and verify(model, graph, plan, pruned, (3, 6, 6)).passed


def test_untraceable_model_is_a_user_error() -> None:
    class WrongInput(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).view(-1, 4 * 5 * 5)  # only fits 5x5 inputs

    with pytest.raises(UserError, match="cannot trace"):
        build_graph(WrongInput(), (3, 4, 4))


# ------------------------------------------------------------------------------------------------
# the built-in CIFAR ResNet (option-A shortcuts)
# ------------------------------------------------------------------------------------------------


def test_cifar_resnet20_random_40_percent_plan() -> None:
    model = randomize(build_model(parse_arch("cifar_resnet20")))
    shape = (3, 32, 32)
    graph = build_graph(model, shape)
    chain = group_of(graph, "layer1.2.conv2")
    assert chain is group_of(graph, "conv1") is group_of(graph, "layer2.0.conv2") is group_of(graph, "layer3.2.conv2")
    assert chain.channels == 64 and not chain.pinned  # pad positions are prunable too
    assert any(m.startswith("layer1.") for m in chain.members) and any(m.startswith("layer3.") for m in chain.members)
    # Option A: channel i of stage 1 is channel i + 8 of stage 2 and i + 8 + 16 of stage 3.
    for i in (0, 5, 15):
        cls = next(c for c in chain.classes if ("layer1.2.conv2", "out", i) in c)
        assert ("conv1", "out", i) in cls and ("layer2.0.conv2", "out", i + 8) in cls
        assert ("layer2.2.bn2", "norm", i + 8) in cls and ("layer3.0.conv2", "out", i + 24) in cls
        assert ("layer3.0.bn2", "norm", i + 24) in cls and ("linear", "in", i + 24) in cls
    # A stage-2 pad position is a stage-3 channel too.
    cls = next(c for c in chain.classes if ("layer2.0.shortcut", "pad_front", 3) in c)
    assert ("layer2.0.conv2", "out", 3) in cls and ("layer3.0.conv2", "out", 19) in cls
    assert group_of(graph, "linear").reason == "model output"
    assert len(graph.prunable_groups()) == 10  # the chain + 9 block-internal conv1 groups

    gen = torch.Generator().manual_seed(0)
    plan = {}
    for g in graph.prunable_groups():
        n = int(0.4 * g.channels)
        plan[g.id] = sorted(g.prunable_classes[int(i)] for i in torch.randperm(len(g.prunable_classes), generator=gen)[:n])
    _, _, p = prune_verify(model, shape, graph, plan)
    assert sum(q.numel() for q in p.parameters()) < 0.5 * sum(q.numel() for q in model.parameters())
    kept = 64 - len(plan[chain.id])
    assert p.linear.in_features == kept == p.layer3[2].bn2.num_features
    drop = removals(graph, plan)
    sc = p.layer2[0].shortcut
    assert sc.pad_front == 8 - len(drop["layer2.0.shortcut"]["pad_front"])
    assert sc.pad_back == 8 - len(drop["layer2.0.shortcut"]["pad_back"])
    assert p.layer1[0].conv1.in_channels == p.layer1[2].bn2.num_features == p.conv1.out_channels
    assert p.layer2[0].bn2.num_features == sc.pad_front + p.layer1[2].bn2.num_features + sc.pad_back

    # Re-prune the pruned model from a fresh graph: still consistent and verified.
    graph2 = build_graph(p, shape)
    assert group_of(graph2, "layer1.2.conv2").channels == kept
    plan2 = {g.id: g.prunable_classes[:1] for g in graph2.prunable_groups()}
    _, _, p2 = prune_verify(p, shape, graph2, plan2)
    assert p2.linear.in_features == kept - 1


# ------------------------------------------------------------------------------------------------
# union-find internals (the fast paths must make exactly the same unions)
# ------------------------------------------------------------------------------------------------


def test_union_pairs_with_several_partners_per_id() -> None:
    from chanprune_cli.engine.labels import UnionFind, unique_ids

    uf = UnionFind()
    for i in range(10):
        uf.new(("m", "out", i))
    a = torch.tensor([[0, 0, 0, 1], [1, 5, -1, 8]])
    b = torch.tensor([[2, 3, 4, 2], [6, 5, 7, -1]])
    uf.union_pairs(a, b)
    roots = [uf.find(i) for i in range(10)]
    assert len({roots[i] for i in (0, 1, 2, 3, 4, 6)}) == 1
    assert len(set(roots)) == 5  # {0,1,2,3,4,6}, {5}, {7}, {8}, {9}
    # broadcast (stride-0) operands: pairs along the broadcast axis are the same pair
    uf2 = UnionFind()
    for i in range(6):
        uf2.new(("m", "out", i))
    uf2.union_pairs(torch.tensor([0, 1, 2]).view(1, 3).expand(4, 3), torch.tensor([3, 4, 5]).view(1, 3).expand(4, 3))
    assert [uf2.find(i) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    assert unique_ids(torch.tensor([[5, -1, 3], [3, 5, 0]])).tolist() == [0, 3, 5]
    assert unique_ids(torch.full((3, 2), -1)).numel() == 0


def test_through_layernorm_makes_normalised_channels_removable_and_approximate() -> None:
    # A channels-last block (ConvNeXt style): LayerNorm over the channels pins them by default;
    # opted in, they are removable, and a plan that removes them is marked approximate.
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.norm(self.stem(x).permute(0, 2, 3, 1))
            return self.fc(y).mean((1, 2))

    model = randomize(Block())
    assert not next(g for g in build_graph(model, (3, 4, 4)).groups if g.name == "stem").prunable
    graph = build_graph(model, (3, 4, 4), through_layernorm=True)
    group = next(g for g in graph.groups if g.name == "stem")
    assert group.prunable and set(group.approximate) == set(range(8))
    plan = {group.id: [0, 5]}
    assert graph.approximations(plan) == ["LayerNorm norm normalises over these channels"]
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert pruned.norm.normalized_shape == (6,) and pruned.norm.weight.shape == (6,) and pruned.fc.in_features == 6
    assert pruned(torch.randn(2, 3, 4, 4)).shape == (2, 4)
    assert not verify(model, graph, plan, pruned, (3, 4, 4)).passed  # the statistics changed: not exact


class _TwoLevelRoIHead(nn.Module):
    """A detector's second stage in miniature: two feature levels, torchvision's MultiScaleRoIAlign
    (which fills a zeros tensor level by level) and a linear head. Box size picks the level: small
    boxes go to level 0 only, so level 1's pooling is empty in the example input."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import MultiScaleRoIAlign

        self.c0 = nn.Conv2d(3, 8, 3, stride=4, padding=1)  # 1/4 of the input
        self.c1 = nn.Conv2d(8, 8, 3, stride=2, padding=1)  # 1/8
        self.p0, self.p1 = nn.Conv2d(8, 6, 1), nn.Conv2d(8, 6, 1)
        self.pool = MultiScaleRoIAlign(["0", "1"], 2, 2)
        self.head = nn.Linear(6 * 2 * 2, 5)
        self.mask_head = nn.Conv2d(6, 5, 2)  # a second stage on detections: none in the example
        self.kp_head = nn.Conv2d(6, 3, 1)  # its outputs are read in a loop over detections
        self.box_side, self.detections = 4.0, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from collections import OrderedDict

        f0 = self.c0(x)
        feats = OrderedDict([("0", self.p0(f0)), ("1", self.p1(self.c1(f0)))])
        n, s, shapes = x.shape[0], self.box_side, [tuple(x.shape[-2:])] * x.shape[0]
        boxes = [torch.tensor([[1.0, 2.0, 1.0 + s, 2.0 + s], [3.0, 1.0, 3.0 + s, 1.0 + s]], dtype=x.dtype)
                 for _ in range(n)]
        found = [b[: self.detections] for b in boxes]
        masks = self.mask_head(self.pool(feats, found, shapes)).flatten(1).sum(0)
        keypoints = self.kp_head(self.pool(feats, found, shapes))
        scores = torch.zeros(1, 3, dtype=x.dtype)
        for i in range(keypoints.shape[0]):  # runs zero times in the example
            scores = scores + keypoints[i].amax((1, 2))
        return self.head(self.pool(feats, boxes, shapes).flatten(1)) + masks + scores.sum(1, keepdim=True)


def test_roi_pooling_passes_channels_and_couples_its_levels_even_an_empty_one() -> None:
    torch.manual_seed(0)
    model = randomize(_TwoLevelRoIHead()).eval()
    graph = build_graph(model, (3, 32, 32))
    assert graph.tracing == "recorded"
    group = next(g for g in graph.groups if g.name == "p0")  # the pooled channels' producers
    # one channel c for both levels, and for the stages that ran on no box in the example
    assert group.prunable and {"p0", "p1", "head", "mask_head", "kp_head"} <= set(group.members)
    # what reads kp_head's outputs never ran: they are kept, not guessed
    keypoints = next(g for g in graph.groups if g.name == "kp_head")
    assert not keypoints.prunable and "reach no layer and no model output" in (keypoints.reason or "")
    plan = {group.id: group.prunable_classes[:2]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert verify(model, graph, plan, pruned, (3, 32, 32)).passed
    assert pruned.p0.out_channels == pruned.p1.out_channels == pruned.mask_head.in_channels == 4
    assert pruned.head.in_features == 16

    # big boxes go to level 1, which the example never pooled from: still the masked original
    from chanprune_cli.engine.surgery import mask_model

    reference = copy.deepcopy(model).double()
    mask_model(reference, graph, plan)
    candidate = copy.deepcopy(pruned).double()
    reference.box_side = candidate.box_side = 150.0
    reference.detections = candidate.detections = 2
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(candidate(x), reference(x), rtol=1e-9, atol=1e-12)
