"""Surgery per coupling pattern: build the graph, remove channels, verify, check shapes, train.

Every case is a tiny hand-written module. The harness (`prune_and_check`) randomises norm
statistics and affine parameters (an identity BatchNorm would hide a wrong slice), removes a
deterministic subset of every prunable group, runs `prune_model` on a copy, asserts `verify`
passes against the masked original, and runs one training step on the pruned model. Each test then
checks the exact resulting shapes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chanprune_cli.engine.allocate import MacsEstimator
from chanprune_cli.engine.graph import ChannelGraph, ChannelGroup, build_graph
from chanprune_cli.engine.shapes import apply_shape_attrs, shape_attrs
from chanprune_cli.engine.surgery import mask_model, prune_model, removals, verify
from chanprune_cli.measure import count_macs
from engine_helpers import randomize

Pick = Callable[[ChannelGroup], list[int]]


# Tiny tensors: intra-op threads only add synchronisation (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def odd_classes(g: ChannelGroup) -> list[int]:
    """Deterministic choice: every second prunable class (positions 1, 3, ...)."""
    return g.prunable_classes[1::2]




def flat(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in flat(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flat(v)]
    return []


def train_step(model: nn.Module, input_shape: Sequence[int]) -> None:
    """One forward/backward/SGD step in train mode; every parameter gets a matching gradient."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    outs = flat(model(torch.randn(2, *input_shape)))
    loss = sum(o.float().pow(2).mean() for o in outs)
    opt.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is None or p.grad.shape == p.shape, name
    opt.step()
    model.eval()
    assert torch.isfinite(loss)


def prune_and_check(model: nn.Module, input_shape: Sequence[int], pick: Pick = odd_classes,
                    ignore: Sequence[str] = (), expect_removal: bool = True,
                    ) -> tuple[ChannelGraph, dict[int, list[int]], nn.Module]:
    randomize(model)
    graph = build_graph(model, input_shape, ignore=ignore)
    plan = {g.id: pick(g) for g in graph.prunable_groups()}
    plan = {k: v for k, v in plan.items() if v}
    if expect_removal:
        assert plan, "nothing to remove"
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    result = verify(model, graph, plan, pruned, input_shape)
    assert result.passed, result
    if plan:
        assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    train_step(pruned, input_shape)
    return graph, plan, pruned


def group_of(graph: ChannelGraph, module: str) -> ChannelGroup:
    """The group whose classes hold `module`'s output (or depthwise) channels."""
    for g in graph.groups:
        if any(m == module and k in ("out", "dw") for cls in g.classes for m, k, _ in cls):
            return g
    raise AssertionError(f"no group produces {module}")


def conv_shape(m: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    return m.in_channels, m.out_channels, m.groups, tuple(m.weight.shape)


def check_bn(bn: nn.modules.batchnorm._NormBase, n: int) -> None:
    assert bn.num_features == n
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.shape == (n,)


# ------------------------------------------------------------------------------------------------
# chains and joins
# ------------------------------------------------------------------------------------------------


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_conv_bn_relu_chain() -> None:
    graph, _, p = prune_and_check(Chain(), (3, 6, 6))
    assert [g.name for g in graph.prunable_groups()] == ["conv1", "conv2"]
    assert conv_shape(p.conv1) == (3, 4, 1, (4, 3, 3, 3))
    check_bn(p.bn1, 4)
    assert conv_shape(p.conv2) == (4, 3, 1, (3, 4, 3, 3)) and p.conv2.bias.shape == (3,)
    check_bn(p.bn2, 3)
    assert p.fc.weight.shape == (4, 3) and p.fc.in_features == 3


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv_a = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(5)
        self.conv_b = nn.Conv2d(5, 8, 3, padding=1, bias=False)
        self.bn_b = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = self.bn_b(self.conv_b(F.relu(self.bn_a(self.conv_a(x)))))
        return self.head(F.relu(x + y))


def test_residual_add_two_producers_one_group() -> None:
    graph, _, p = prune_and_check(Residual(), (3, 5, 5))
    g = group_of(graph, "stem")
    assert g is group_of(graph, "conv_b")
    assert {"stem", "bn0", "conv_a", "conv_b", "bn_b", "head"} <= set(g.members)
    assert g.channels == 8
    assert conv_shape(p.stem) == (3, 4, 1, (4, 3, 3, 3))
    assert conv_shape(p.conv_a) == (4, 3, 1, (3, 4, 3, 3))
    assert conv_shape(p.conv_b) == (3, 4, 1, (4, 3, 3, 3))
    check_bn(p.bn0, 4), check_bn(p.bn_a, 3), check_bn(p.bn_b, 4)
    assert conv_shape(p.head) == (4, 2, 1, (2, 4, 1, 1))


class SubMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, padding=1)
        self.c = nn.Conv2d(4, 6, 1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.stem(x))
        y = torch.sub(self.a(x), self.b(x)) * self.c(x).sigmoid()
        return self.head(y.mul(2.0))


def test_sub_and_mul_join_producers() -> None:
    graph, _, p = prune_and_check(SubMul(), (3, 4, 4))
    g = group_of(graph, "a")
    assert g is group_of(graph, "b") is group_of(graph, "c") and g.channels == 6
    for name in "abc":
        assert conv_shape(getattr(p, name))[:3] == (2, 3, 1)
        assert getattr(p, name).bias.shape == (3,)
    assert conv_shape(p.head) == (3, 2, 1, (2, 3, 1, 1))


class DenseLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.conv1 = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(7)
        self.conv2 = nn.Conv2d(7, 5, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.conv0(x)
        c = torch.cat([x0, self.conv1(F.relu(x0))], 1)
        c = torch.cat((c, self.conv2(F.relu(self.norm1(c)))), dim=1)
        return self.head(F.relu(self.norm2(c)))


def test_concat_index_offsets() -> None:
    graph, _, p = prune_and_check(DenseLike(), (3, 4, 4))
    g0, g1, g2 = (group_of(graph, n) for n in ("conv0", "conv1", "conv2"))
    assert (g0.channels, g1.channels, g2.channels) == (4, 3, 5)
    # Channel 1 of conv1 sits at position 4 + 1 of the first concat and of norm2's input.
    cls = g1.classes[1]
    assert ("norm1", "norm", 5) in cls and ("norm2", "norm", 5) in cls and ("conv2", "in", 5) in cls
    # conv2's channel 0 sits at 7 + 0 in norm2 / head.
    assert ("head", "in", 7) in g2.classes[0]
    assert conv_shape(p.conv0)[:2] == (3, 2)
    assert conv_shape(p.conv1) == (2, 2, 1, (2, 2, 3, 3))
    check_bn(p.norm1, 4)
    assert conv_shape(p.conv2) == (4, 3, 1, (3, 4, 1, 1))
    check_bn(p.norm2, 7)
    assert p.head.in_channels == 7


class ChunkSplit(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 8, 1)
        self.a = nn.Conv2d(4, 3, 3, padding=1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.how == "chunk":
            p, q = x.chunk(2, dim=1)
        elif self.how == "split_computed":
            p, q = torch.split(x, x.size(1) // 2, dim=1)
        else:  # literal sizes: cannot follow a shrinking channel count
            p, q = x.split(4, 1)
        return self.a(p) + self.b(q)


@pytest.mark.parametrize("how", ["chunk", "split_computed"])
def test_chunk_and_split_along_channels(how: str) -> None:
    graph, _, p = prune_and_check(ChunkSplit(how), (3, 4, 4))
    g = group_of(graph, "stem")
    # Position i of both halves falls together: 4 classes of 2 stem channels each.
    assert g.channels == 4 and all(len([s for s in c if s[0] == "stem"]) == 2 for c in g.classes)
    assert ("stem", "out", 1) in g.classes[1] and ("stem", "out", 5) in g.classes[1]
    assert conv_shape(p.stem)[:2] == (3, 4)
    assert conv_shape(p.a)[:2] == (2, 3) and conv_shape(p.b)[:2] == (2, 3)


def test_split_with_literal_size_is_pinned() -> None:
    graph, _, p = prune_and_check(ChunkSplit("split_literal"), (3, 4, 4), expect_removal=False)
    g = group_of(graph, "stem")
    assert not g.prunable and "split into fixed sizes" in g.reason
    assert p.stem.out_channels == 8


class SplitBySizeAttributes(nn.Module):
    """Literal split sizes that are attributes of the module running the split: a tuple (timm's
    MambaOut block), one int for equal pieces (Res2Net), one int per piece (FasterNet), or an int
    that two attributes hold (ambiguous)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, 12, 1)
        if how == "tuple":
            self.split_indices, sizes = (4, 3, 5), [4, 3, 5]
        elif how == "int":
            self.width, sizes = 4, [4, 4, 4]
        elif how == "ints":
            self.dim_conv, self.dim_untouched, sizes = 5, 7, [5, 7]
        elif how == "pair":
            self.c, sizes = 6, [6, 6]
        else:
            self.width, self.height, sizes = 4, 4, [4, 4, 4]
        self.convs = nn.ModuleList(nn.Conv2d(n, 2, 3, padding=1) for n in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.how == "tuple":
            pieces = torch.split(x, self.split_indices, dim=1)
        elif self.how == "ints":
            pieces = torch.split(x, [self.dim_conv, self.dim_untouched], dim=1)
        elif self.how == "pair":  # ultralytics' C2PSA
            pieces = x.split((self.c, self.c), dim=1)
        else:
            pieces = x.split(self.width, 1)
        return torch.cat([conv(pieces[k]) for k, conv in enumerate(self.convs)], 1)


@pytest.mark.parametrize("how,classes,after,pieces", [
    ("tuple", 12, {"split_indices": (2, 2, 2)}, [2, 2, 2]),  # the odd channels go: 1, 3 | 5 | 7, 9, 11
    ("int", 4, {"width": 2}, [2, 2, 2]),  # position j of every piece falls together
    ("ints", 12, {"dim_conv": 3, "dim_untouched": 3}, [3, 3]),
    ("pair", 6, {"c": 3}, [3, 3]),  # one attribute for both pieces: they lose the same positions
])
def test_split_sizes_held_by_module_attributes_shrink_with_the_pieces(how: str, classes: int, after: dict[str, object],
                                                                        pieces: list[int]) -> None:
    model = SplitBySizeAttributes(how)
    graph, _, p = prune_and_check(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert g.prunable and g.channels == classes
    assert {attr: getattr(p, attr) for attr in after} == after
    assert [c.in_channels for c in p.convs] == [c.weight.shape[1] for c in p.convs] == pieces
    record = shape_attrs(p)
    fresh = SplitBySizeAttributes(how)
    tensors = p.state_dict()
    apply_shape_attrs(fresh, record, {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fresh.eval()(x), p.eval()(x))
    assert shape_attrs(fresh) == record  # a rebuilt model records its split sizes again


class SlicedByAttributes(nn.Module):
    """Channel slices bounded by an int attribute: DPN's two paths (`x[:, :n]`, `x[:, n:]`) and
    RexNet's partial residual (`cat([y[:, 0:n] + shortcut, y[:, n:]])`)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        if how == "dpn":
            self.num_1x1_c = 4
            self.stem = nn.Conv2d(3, 10, 1)
            self.conv_a, self.conv_b = nn.Conv2d(4, 2, 3, padding=1), nn.Conv2d(6, 2, 3, padding=1)
        else:
            self.in_channels = 4
            self.stem = nn.Conv2d(3, 4, 1)
            self.conv = nn.Conv2d(4, 10, 3, padding=1)
            self.head = nn.Conv2d(10, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if self.how == "dpn":
            return torch.cat([self.conv_a(x[:, :self.num_1x1_c]), self.conv_b(x[:, self.num_1x1_c:])], 1)
        y = self.conv(x)
        return self.head(torch.cat([y[:, 0:self.in_channels] + x, y[:, self.in_channels:]], 1))


@pytest.mark.parametrize("how,attr,kept", [("dpn", "num_1x1_c", 2), ("rexnet", "in_channels", 2)])
def test_channel_slices_bounded_by_module_attributes_shrink_with_the_channels(how: str, attr: str, kept: int) -> None:
    graph, _, p = prune_and_check(SlicedByAttributes(how), (3, 4, 4))
    g = group_of(graph, "stem")
    assert g.prunable and not g.pinned
    assert getattr(p, attr) == kept  # the odd channels of the first 4 went
    if how == "dpn":
        assert (p.stem.out_channels, p.conv_a.in_channels, p.conv_b.in_channels) == (5, 2, 3)
    else:  # the residual couples conv's first 4 outputs to the stem; the other 6 are free
        assert group_of(graph, "conv") is g and p.conv.out_channels == 5 and p.head.in_channels == 5
    fresh = SlicedByAttributes(how)
    tensors = p.state_dict()
    apply_shape_attrs(fresh, shape_attrs(p), {k: tuple(v.shape) for k, v in tensors.items()})
    fresh.load_state_dict(tensors)
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(fresh.eval()(x), p.eval()(x))


class SplitBySizeAttributesRecorded(SplitBySizeAttributes):
    """The same, written so torch.fx cannot trace it (a loop over the pieces): recorded instead."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        pieces = torch.split(x, self.split_indices, dim=1)
        return torch.cat([conv(p) for conv, p in zip(self.convs, pieces)], 1)


def test_split_sizes_held_by_module_attributes_shrink_in_a_recorded_trace_too() -> None:
    # A recording notes the module running each op, and sizes read from tensors are `size` nodes
    # there (as in fx), so a literal size that matches the running module's attribute is that attribute.
    graph, _, p = prune_and_check(SplitBySizeAttributesRecorded("tuple"), (3, 4, 4))
    assert graph.tracing == "recorded"
    assert group_of(graph, "stem").prunable and p.split_indices == (2, 2, 2)


def test_split_size_two_attributes_hold_is_pinned() -> None:
    graph, _, p = prune_and_check(SplitBySizeAttributes("ambiguous"), (3, 4, 4), expect_removal=False)
    g = group_of(graph, "stem")
    assert not g.prunable and "split into fixed sizes" in g.reason
    assert p.width == 4 and p.stem.out_channels == 12


class BorrowedSize(nn.Module):
    """A tensor reshaped to a channel count read from another tensor's shape (attention blocks
    view their output to the block input's C)."""

    def __init__(self, pinned: bool) -> None:
        super().__init__()
        self.pinned = pinned
        self.stem = nn.Conv2d(3, 8, 1)
        self.v = nn.Conv2d(8, 16 if pinned else 8, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        b, c, h, w = x.shape
        v = self.v(x)
        if self.pinned:  # two heads of 8 channels, the second kept: a fixed count
            v = v.view(b, 2, 8, h * w)[:, 1]
        return self.head(torch.cat([x, v.flatten(2).reshape(b, c, h, w)], 1))


class BorrowedSizeRecorded(BorrowedSize):
    """The same, with control flow on a size: torch.fx cannot trace it, so it is recorded and the
    sizes are values, remembered as read from `x`'s shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        if x.shape[-1] % 2:
            x = x.flip(-1)
        b, c, h, w = x.shape
        v = self.v(x)
        if self.pinned:
            v = v.view(b, 2, 8, h * w)[:, 1]
        return self.head(torch.cat([x, v.flatten(2).reshape(b, c, h, w)], 1))


@pytest.mark.parametrize("cls", [BorrowedSize, BorrowedSizeRecorded])
def test_reshape_to_a_size_read_from_another_tensor_couples_their_channels(cls: type[BorrowedSize]) -> None:
    model = cls(pinned=False)
    randomize(model)
    graph = build_graph(model, (3, 4, 4))
    assert graph.tracing == ("recorded" if cls is BorrowedSizeRecorded else "fx")
    g = group_of(graph, "stem")
    assert g is group_of(graph, "v") and g.channels == 8  # stem channel j and v channel j fall together
    plan = {g.id: [1, 2, 5]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    assert verify(model, graph, plan, pruned, (3, 4, 4)).passed
    assert pruned.stem.out_channels == pruned.v.out_channels == 5 and pruned.head.in_channels == 10


@pytest.mark.parametrize("cls", [BorrowedSize, BorrowedSizeRecorded])
def test_reshape_to_a_size_read_from_another_tensor_with_a_fixed_count_pins_it(cls: type[BorrowedSize]) -> None:
    graph, _, p = prune_and_check(cls(pinned=True), (3, 4, 4), expect_removal=False)
    assert not group_of(graph, "stem").prunable and p.stem.out_channels == 8


class ReadsItsInputSize(nn.Module):
    """Attention as YOLO26's blocks write it: `C` read from the block input's shape views the
    attention's values, whose count is fixed by the literal head layout (the input must keep it)."""

    def __init__(self, dim: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.key_dim = self.head_dim // 2
        self.qkv = nn.Conv2d(dim, dim + 2 * self.key_dim * heads, 1)
        self.pe = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).view(B, self.num_heads, self.key_dim * 2 + self.head_dim, H * W).split(
            [self.key_dim, self.key_dim, self.head_dim], dim=2)
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        return self.proj((v @ attn.transpose(-2, -1)).view(B, C, H, W) + self.pe(v.reshape(B, C, H, W)))


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.attn = ReadsItsInputSize()
        self.conv = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % 2:  # control flow on a size: recorded, as ultralytics' models are
            x = x.flip(-1)
        x = F.relu(self.bn(self.stem(x)))
        x = x + self.attn(x)
        return self.head(F.relu(self.conv(x)))


def test_attention_reading_its_input_size_keeps_that_input_whole_in_a_recording() -> None:
    graph, plan, pruned = prune_and_check(AttentionNet(), (3, 4, 4))
    assert graph.tracing == "recorded"
    stem = group_of(graph, "stem")
    # coupled to the values, whose literal head layout pins them (and so the block input)
    assert not stem.prunable and "reshape to a fixed channel count" in stem.reason
    assert group_of(graph, "conv").prunable and pruned.stem.out_channels == 8 and pruned.conv.out_channels == 3


def test_a_pruned_model_that_cannot_run_fails_verification_naming_the_module() -> None:
    model = randomize(AttentionNet())
    graph = build_graph(model, (3, 4, 4))
    plan = {group_of(graph, "conv").id: [1]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    pruned.attn.num_heads = 3  # as if surgery had left the head layout stale: the view cannot run
    result = verify(model, graph, plan, pruned, (3, 4, 4))
    assert not result.passed and result.worst_layer == "attn" and result.failure.startswith("RuntimeError: shape")

    from chanprune_cli.errors import ChanpruneError
    from chanprune_cli.prune import pruning

    def stale(m: nn.Module, g: ChannelGraph, p: dict[int, list[int]]) -> None:
        prune_model(m, g, p)
        m.attn.num_heads = 3

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pruning, "prune_model", stale)
        with pytest.raises(ChanpruneError, match=r"^verification failed: the pruned model cannot run: RuntimeError: "
                                                 r"shape .* in attn; nothing was written"):
            pruning.pruned_copy(model, graph, plan, (3, 4, 4))


class Anchors(nn.Module):
    """Anchors made `like` the features (ultralytics' make_anchors): dtype and device only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = F.relu(self.stem(x))
        grid = torch.arange(feats.shape[-1]).type_as(feats) + feats.new_full((1,), 0.5)
        return self.head(feats), grid.to(feats)


def test_a_tensor_lending_only_its_dtype_keeps_its_channels_prunable() -> None:
    graph, _, pruned = prune_and_check(Anchors(), (3, 4, 4))
    assert group_of(graph, "stem").prunable and pruned.stem.out_channels == 4


class Slicing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)[:, :4]
        return self.head(F.relu(self.conv(x)))


def test_channel_slicing_is_pinned_with_reason() -> None:
    graph, _, p = prune_and_check(Slicing(), (3, 4, 4))
    g = group_of(graph, "stem")
    assert not g.prunable and "channel selection" in g.reason
    assert p.stem.out_channels == 8 and p.conv.in_channels == 4
    assert p.conv.out_channels == 3 and p.head.in_channels == 3


# ------------------------------------------------------------------------------------------------
# grouped / depthwise / transposed convolutions
# ------------------------------------------------------------------------------------------------


class Depthwise(nn.Module):
    def __init__(self, mult: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8 * mult, 3, padding=1, groups=8)
        self.bn1 = nn.BatchNorm2d(8 * mult)
        self.pw = nn.Conv2d(8 * mult, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.bn0(self.stem(x)))
        return self.pw(F.hardswish(self.bn1(self.dw(x))))


@pytest.mark.parametrize("mult", [1, 2])
def test_depthwise_in_out_groups_shrink_together(mult: int) -> None:
    graph, _, p = prune_and_check(Depthwise(mult), (3, 5, 5))
    g = group_of(graph, "stem")
    assert g is group_of(graph, "dw") and g.channels == 8
    if mult == 2:  # input channel j feeds outputs 2j, 2j+1: they fall with it
        assert {("bn1", "norm", 6), ("bn1", "norm", 7), ("pw", "in", 6), ("pw", "in", 7)} <= set(g.classes[3])
    assert p.stem.out_channels == 4
    check_bn(p.bn0, 4)
    assert conv_shape(p.dw) == (4, 4 * mult, 4, (4 * mult, 1, 3, 3)) and p.dw.bias.shape == (4 * mult,)
    check_bn(p.bn1, 4 * mult)
    assert p.pw.in_channels == 4 * mult and p.pw.weight.shape[1] == 4 * mult


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.gconv(F.relu(self.stem(x))))))


def test_grouped_conv_stays_divisible() -> None:
    graph, _, p = prune_and_check(Grouped(), (3, 4, 4))
    # Input: local position j of every group falls together (stem channels j, j+2, j+4, j+6).
    g_in = group_of(graph, "stem")
    assert g_in.channels == 2
    assert {("stem", "out", k) for k in (1, 3, 5, 7)} <= set(g_in.classes[1])
    g_out = group_of(graph, "gconv")
    assert g_out.channels == 3  # local output index, shared by the 4 groups
    assert {("bn", "norm", k) for k in (1, 4, 7, 10)} <= set(g_out.classes[1])
    assert p.stem.out_channels == 4
    assert conv_shape(p.gconv) == (4, 8, 4, (8, 1, 3, 3))
    assert p.gconv.in_channels % p.gconv.groups == 0 and p.gconv.out_channels % p.gconv.groups == 0
    check_bn(p.bn, 8)
    assert p.head.in_channels == 8


class GroupedBetweenGroupNorms(nn.Module):
    """A grouped conv between GroupNorms whose groups are its conv groups (timm's *_gn nets)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.gn0 = nn.GroupNorm(4, 8)
        self.gconv = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.gn1 = nn.GroupNorm(4, 12)
        self.head = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.gn1(self.gconv(F.relu(self.gn0(self.stem(x)))))))


def test_grouped_conv_between_group_norms_loses_whole_conv_groups() -> None:
    # Local input j of every conv group plus the GroupNorms' groups would leave one class: the
    # conv is traced again as whole groups (conv group k with its inputs, outputs, norm groups).
    model = GroupedBetweenGroupNorms()
    graph, plan, p = prune_and_check(model, (3, 4, 4))
    g = group_of(graph, "stem")
    assert g.channels == 4 and g.prunable
    assert {("stem", "out", 2), ("stem", "out", 3), ("gn0", "gnorm", 1), ("gconv", "grp", 1), ("gn1", "gnorm", 1)} <= set(g.classes[1])
    assert conv_shape(p.gconv) == (4, 6, 2, (6, 2, 3, 3)) and p.gconv.bias.shape == (6,)
    assert (p.stem.out_channels, p.gn0.num_groups, p.gn1.num_groups, p.head.in_channels) == (4, 2, 2, 6)
    assert MacsEstimator(graph).macs(plan) == count_macs(p, (3, 4, 4)) < count_macs(model, (3, 4, 4))  # as fvcore counts


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.up(F.relu(self.stem(x))))))


def test_conv_transpose() -> None:
    graph, _, p = prune_and_check(Transposed(), (3, 3, 3))
    assert group_of(graph, "up").channels == 6
    assert p.stem.out_channels == 4
    assert (p.up.in_channels, p.up.out_channels, tuple(p.up.weight.shape)) == (4, 3, (4, 3, 2, 2))
    assert p.up.bias.shape == (3,)
    check_bn(p.bn, 3)
    assert p.head.in_channels == 3


# ------------------------------------------------------------------------------------------------
# flatten → Linear, views, squeeze-and-excitation, channel shuffle, pad
# ------------------------------------------------------------------------------------------------


class FlattenLinear(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 3 * 4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        if self.how == "flatten":
            x = torch.flatten(x, 1)
        elif self.how == "view":
            x = x.view(x.size(0), -1)
        elif self.how == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = self.flatten(x)
        return self.fc2(F.relu(self.fc1(x)))


@pytest.mark.parametrize("how", ["flatten", "view", "reshape", "module"])
def test_flatten_to_linear_maps_channel_to_hw_features(how: str) -> None:
    graph, _, p = prune_and_check(FlattenLinear(how), (3, 3, 4))
    g = group_of(graph, "conv")
    # One channel = H·W = 12 consecutive input features of fc1.
    assert {("fc1", "in", k) for k in range(12, 24)} <= set(g.classes[1])
    assert p.conv.out_channels == 3
    assert p.fc1.in_features == 3 * 12 and p.fc1.weight.shape == (3, 36)  # fc1 lost 2 of 5 outputs too
    assert p.fc2.in_features == 3 and p.fc2.out_features == 3


class SEConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))
        return self.head(x * s)


class SELinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv(x))
        b, c, _, _ = x.size()
        s = self.pool(x).view(b, c)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(s)))).view(b, c, 1, 1)
        return self.head(x * s.expand_as(x))


@pytest.mark.parametrize("cls", [SEConv, SELinear])
def test_squeeze_excitation(cls: type[nn.Module]) -> None:
    graph, _, p = prune_and_check(cls(), (3, 4, 4))
    g = group_of(graph, "conv")
    assert g is group_of(graph, "fc2") and g.channels == 8
    assert group_of(graph, "fc1").channels == 4
    if cls is SEConv:
        assert conv_shape(p.fc1)[:2] == (4, 2) and conv_shape(p.fc2)[:2] == (2, 4)
    else:
        assert p.fc1.weight.shape == (2, 4) and p.fc2.weight.shape == (4, 2)
    assert p.conv.out_channels == 4 and p.head.in_channels == 4


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    # As torchvision.models.shufflenetv2.channel_shuffle.
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, -1, height, width)


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(channel_shuffle(F.relu(self.bn(self.stem(x))), 2))


def test_channel_shuffle() -> None:
    graph, _, p = prune_and_check(Shuffle(), (3, 3, 3))
    g = group_of(graph, "stem")
    # Channel k and k + 4 (same position in both shuffle groups) fall together; after the shuffle
    # they sit at 2k and 2k + 1.
    assert g.channels == 4
    assert {("stem", "out", 1), ("stem", "out", 5), ("head", "in", 2), ("head", "in", 3)} <= set(g.classes[1])
    assert p.stem.out_channels == 4 and p.head.in_channels == 4
    check_bn(p.bn, 4)


class ChannelPad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(11)
        self.head = nn.Conv2d(11, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(self.stem(x), (0, 0, 0, 0, 1, 2))  # one zero channel in front, two at the back
        return self.head(F.relu(self.bn(x)))


def test_pad_on_channel_axis() -> None:
    graph, _, p = prune_and_check(ChannelPad(), (3, 3, 3))
    g = group_of(graph, "stem")
    assert g.channels == 8 and g.prunable_classes == list(range(8))
    # Pad positions (0, 9, 10) have no producer: they are in no group, so are never removed.
    in_groups = {s for gr in graph.groups for c in gr.classes for s in c}
    assert not {("head", "in", 0), ("head", "in", 9), ("head", "in", 10)} & in_groups
    assert ("head", "in", 1 + 1) in g.classes[1]
    assert p.stem.out_channels == 4 and p.head.in_channels == 7
    check_bn(p.bn, 7)


# ------------------------------------------------------------------------------------------------
# norms and activations
# ------------------------------------------------------------------------------------------------


class GroupNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.silu(self.gn(self.stem(x))))


def test_group_norm_removes_whole_groups() -> None:
    graph, _, p = prune_and_check(GroupNormNet(), (3, 4, 4))
    g = group_of(graph, "stem")
    assert g.channels == 4  # one class per GroupNorm group of 2 channels
    assert {("stem", "out", 2), ("stem", "out", 3), ("gn", "gnorm", 1)} <= set(g.classes[1])
    assert (p.gn.num_groups, p.gn.num_channels, tuple(p.gn.weight.shape)) == (2, 4, (4,))
    assert p.stem.out_channels == 4 and p.head.in_channels == 4


class PReLUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.PReLU(8)
        self.act_shared = nn.PReLU()  # one parameter: no channel coupling
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act_shared(self.act(self.stem(x))))


def test_prelu_per_channel() -> None:
    graph, _, p = prune_and_check(PReLUNet(), (3, 4, 4))
    assert "act" in group_of(graph, "stem").members
    assert p.act.num_parameters == 4 and p.act.weight.shape == (4,)
    assert p.act_shared.weight.shape == (1,)
    assert p.stem.out_channels == 4 and p.head.in_channels == 4


class NonZeroAtZero(nn.Module):
    """Removed channels that are not zero after masking the producer: sigmoid(0) = 0.5 and an
    affine-free BatchNorm gives -mean/std. The oracle must still match the pruned model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, affine=False)
        self.mid = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.bn(self.stem(x)))
        return self.fc(torch.sigmoid(x).flatten(1))


def test_channels_nonzero_after_masking_still_verify() -> None:
    _, _, p = prune_and_check(NonZeroAtZero(), (3, 3, 3))
    assert p.bn.num_features == 4 and p.mid.in_channels == 4
    assert p.fc.in_features == 3 * 9


# ------------------------------------------------------------------------------------------------
# option-A shortcut, re-pruning
# ------------------------------------------------------------------------------------------------


def test_option_a_shortcut_pads_are_prunable() -> None:
    from chanprune_cli.models import CifarResNet

    model = CifarResNet([1, 1, 1])
    graph, plan, p = prune_and_check(model, (3, 8, 8))
    g = group_of(graph, "layer1.0.conv2")
    assert g is group_of(graph, "layer3.0.conv2") and g.channels == 64 and not g.pinned
    drop = removals(graph, plan)
    for name, width in (("layer2.0.shortcut", 8), ("layer3.0.shortcut", 16)):
        sc = p.get_submodule(name)
        assert sc.pad_front == width - len(drop[name]["pad_front"])
        assert sc.pad_back == width - len(drop[name]["pad_back"])
        assert drop[name]["pad_front"] and drop[name]["pad_back"]
    assert p.linear.in_features == 32
    assert p.layer3[0].conv2.out_channels == p.layer3[0].bn2.num_features == 32


def test_reprune_an_already_pruned_model() -> None:
    _, _, once = prune_and_check(DenseLike(), (3, 4, 4))
    _, _, twice = prune_and_check(once, (3, 4, 4), pick=lambda g: g.prunable_classes[:1])
    assert (twice.conv0.out_channels, twice.conv1.out_channels, twice.conv2.out_channels) == (1, 1, 2)
    assert twice.head.in_channels == 4 and twice.norm2.num_features == 4
    # And once more from a fresh graph of the twice-pruned model: still consistent.
    graph3 = build_graph(twice, (3, 4, 4))
    assert sorted(g.channels for g in graph3.groups) == [1, 1, 2, 2]


def test_random_plan_many_seeds_verify() -> None:
    """Random subsets (not just the odd positions) of several coupled patterns all verify."""
    for seed, factory in enumerate([DenseLike, Residual, lambda: Depthwise(2), Grouped, Shuffle, SELinear]):
        gen = torch.Generator().manual_seed(seed)

        def pick(g: ChannelGroup, gen: torch.Generator = gen) -> list[int]:
            idx = g.prunable_classes
            n = max(1, len(idx) // 2) if len(idx) > 1 else 0
            return sorted(idx[int(i)] for i in torch.randperm(len(idx), generator=gen)[:n])

        model = factory()
        shape = (3, 4, 4)
        prune_and_check(model, shape, pick=pick)


def test_mask_model_zeroes_planned_channels() -> None:
    model = randomize(Chain())
    graph = build_graph(model, (3, 6, 6))
    g = group_of(graph, "conv1")
    plan = {g.id: [0, 3]}
    masked = copy.deepcopy(model)
    mask_model(masked, graph, plan)
    with torch.no_grad():
        feats = masked.bn1(masked.conv1(torch.randn(2, 3, 6, 6)))
    assert feats[:, [0, 3]].abs().max() == 0
    assert feats[:, [1, 2]].abs().min() > 0


def test_plan_that_empties_a_layer_is_refused() -> None:
    """In the option-A stage chain a plan can keep most of the group yet remove all 16 stage-1
    classes: surgery must refuse (rather than build a 0-channel conv), leaving the model intact."""
    from chanprune_cli.errors import UserError
    from chanprune_cli.models import CifarResNet

    model = randomize(CifarResNet([1, 1, 1]))
    graph = build_graph(model, (3, 8, 8))
    g = group_of(graph, "conv1")
    stage1 = [i for i, c in enumerate(g.classes) if any(m == "conv1" for m, _, _ in c)]
    assert len(stage1) == 16
    target = copy.deepcopy(model)
    with pytest.raises(UserError, match="removes all 16 output channels of conv1"):
        prune_model(target, graph, {g.id: stage1})
    assert target.conv1.out_channels == 16 and target.layer3[0].conv2.out_channels == 64
    prune_model(target, graph, {g.id: stage1[1:]})  # one left: fine
    assert target.conv1.out_channels == 1 and verify(model, graph, {g.id: stage1[1:]}, target, (3, 8, 8)).passed


# ------------------------------------------------------------------------------------------------
# more layouts: channel-last MLP, shared modules, 1-D / 3-D, encoder-decoder, dict outputs
# ------------------------------------------------------------------------------------------------


class ChannelLastMLP(nn.Module):
    """Linear layers over the channel axis via permute (ConvNeXt's MLP without its LayerNorm)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.l2(F.gelu(self.l1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head(x + y)


def test_channel_last_linear_mlp() -> None:
    graph, _, p = prune_and_check(ChannelLastMLP(), (3, 3, 3))
    assert group_of(graph, "stem") is group_of(graph, "l2") and group_of(graph, "l1").channels == 16
    assert p.l1.weight.shape == (8, 4) and p.l2.weight.shape == (4, 8) and p.head.in_channels == 4


class SharedConv(nn.Module):
    """One conv applied twice, an in-place residual add, a cat on dim=-3."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)
        self.shared = nn.Conv2d(6, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn(self.shared(x)))
        z = self.shared(y)
        z += x
        return self.head(torch.cat([z, y], dim=-3))


def test_shared_module_and_inplace_add() -> None:
    graph, _, p = prune_and_check(SharedConv(), (3, 4, 4))
    g = group_of(graph, "stem")
    assert g is group_of(graph, "shared") and g.channels == 6
    assert conv_shape(p.shared) == (3, 3, 1, (3, 3, 3, 3)) and p.head.in_channels == 6


class OneAndThreeD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv3d(3, 6, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(6)
        self.c1 = nn.Conv1d(6, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 27, 5)
        self.bnf = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn3(self.c3(x))).flatten(2)  # N, C, D*H*W
        x = F.relu(self.bn1(self.c1(x)))
        return self.out(F.relu(self.bnf(self.fc(x.flatten(1)))))


def test_conv1d_conv3d_and_batchnorm1d_after_linear() -> None:
    _, _, p = prune_and_check(OneAndThreeD(), (3, 3, 3, 3))
    assert p.c3.weight.shape == (3, 3, 3, 3, 3) and p.bn3.num_features == 3
    assert p.c1.weight.shape == (2, 3, 3) and p.bn1.num_features == 2
    assert p.fc.weight.shape == (3, 2 * 27) and p.bnf.num_features == 3 and p.out.in_features == 3


class EncoderDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Conv2d(3, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2)
        self.resize = nn.Upsample(scale_factor=2)
        self.dec = nn.Conv2d(20, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)
        self.aux = nn.Conv2d(4, 3, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        e = F.relu(self.enc(x))
        d = F.relu(self.down(e))
        y = F.relu(self.dec(torch.cat([e, self.up(d), self.resize(d)], 1)))
        return {"out": self.head(y), "aux": self.aux(F.dropout(y, 0.2, self.training))}


def test_encoder_decoder_with_dict_output() -> None:
    graph, _, p = prune_and_check(EncoderDecoder(), (3, 4, 4))
    assert group_of(graph, "head").reason == group_of(graph, "aux").reason == "model output"
    # dec reads enc (3 kept of 6), up (3 of 6) and the upsampled down output (4 of 8)
    assert p.dec.in_channels == 3 + 3 + 4
    assert (p.up.in_channels, p.up.out_channels) == (4, 3)
    assert p.head.in_channels == p.aux.in_channels == 2


# ------------------------------------------------------------------------------------------------
# verification itself
# ------------------------------------------------------------------------------------------------


class _TwoStage(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y += 1.0  # in place, after a module: what a layer produced must be kept as it was
        return self.head(torch.relu(self.conv2(y)))


def test_verify_checks_every_kept_layer_and_names_the_first_wrong_one() -> None:
    model = randomize(_TwoStage())
    graph = build_graph(model, (3, 6, 6))
    plan = {group_of(graph, "conv1").id: [1, 4]}
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    good = verify(model, graph, plan, pruned, (3, 6, 6))
    assert good.passed and good.layers_compared >= 2 and good.worst_layer is None
    with torch.no_grad():
        pruned.conv2.weight[0, 0] += 1.0  # a wrong slice would look like this
    bad = verify(model, graph, plan, pruned, (3, 6, 6))
    assert not bad.passed and bad.worst_layer == "conv2"
