"""Allocation: scores -> plan (uniform ratio, global MACs target, floors, round-to, group weights)."""

from __future__ import annotations

import re

import pytest
import torch

from chanprune_cli.criteria.base import WeightedScores
from chanprune_cli.engine.allocate import (
    AllocationOptions,
    MacsEstimator,
    allocate,
    match_layer_ratios,
    parse_layer_ratios,
    producers,
    unmatched_layer_ratios,
)
from chanprune_cli.engine.graph import build_graph
from chanprune_cli.errors import UserError
from chanprune_cli.models import build_model, parse_arch


@pytest.fixture(scope="module")
def graph():  # type: ignore[no-untyped-def]
    return build_graph(build_model(parse_arch("digits_cnn")).eval(), (1, 8, 8))


def _scores(graph, seed: int = 0) -> dict[int, torch.Tensor]:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    return {grp.id: torch.rand(grp.channels, generator=g, dtype=torch.float64) for grp in graph.prunable_groups()}


def test_ratio_removes_the_lowest_scores_of_every_group(graph) -> None:  # type: ignore[no-untyped-def]
    scores = _scores(graph)
    plan = allocate(graph, scores, AllocationOptions(ratio=0.5)).plan
    for grp in graph.prunable_groups():
        removed = plan[grp.id]
        assert len(removed) == round(0.5 * grp.channels)
        kept = [i for i in range(grp.channels) if i not in removed]
        assert max(float(scores[grp.id][i]) for i in removed) <= min(float(scores[grp.id][i]) for i in kept)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_target_flops_is_reached_with_little_overshoot(graph, target: float) -> None:  # type: ignore[no-untyped-def]
    alloc = allocate(graph, _scores(graph), AllocationOptions(target_flops=target))
    achieved = 1 - alloc.estimated_macs_after / alloc.estimated_macs_before
    assert target <= achieved < target + 0.1
    assert alloc.estimated_macs_after == MacsEstimator(graph).macs(alloc.plan)


def test_min_keep_and_round_to_shape_every_group(graph) -> None:  # type: ignore[no-untyped-def]
    plan = allocate(graph, _scores(graph), AllocationOptions(target_flops=0.6, min_keep=0.25, round_to=4)).plan
    for grp in graph.prunable_groups():
        kept = grp.channels - len(plan.get(grp.id, []))
        assert kept >= 0.25 * grp.channels
        assert kept % 4 == 0 or kept == grp.channels


def test_unreachable_target_is_a_user_error(graph) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UserError, match="unreachable"):
        allocate(graph, _scores(graph), AllocationOptions(target_flops=0.95, min_keep=0.9))


def test_group_weights_make_a_group_keep_more(graph) -> None:  # type: ignore[no-untyped-def]
    base = _scores(graph)
    heavy = graph.prunable_groups()[1].id
    weighted = WeightedScores(base)
    weighted.group_weights = {heavy: 100.0}
    plain = allocate(graph, base, AllocationOptions(target_flops=0.5)).plan
    favoured = allocate(graph, weighted, AllocationOptions(target_flops=0.5)).plan
    assert len(favoured.get(heavy, [])) < len(plain.get(heavy, []))


def test_cost_exponent_spares_cheap_channels(graph) -> None:  # type: ignore[no-untyped-def]
    """Equal scores everywhere: ranking per MAC removes the channels that cost most MACs first."""
    flat = {grp.id: torch.ones(grp.channels, dtype=torch.float64) for grp in graph.prunable_groups()}
    estimator = MacsEstimator(graph)
    before = estimator.macs({})
    cost = {grp.id: before - estimator.macs({grp.id: [0]}) for grp in graph.prunable_groups()}
    dearest, cheapest = max(cost, key=cost.get), min(cost, key=cost.get)
    alloc = allocate(graph, flat, AllocationOptions(target_flops=0.3, cost_exponent=1.0))
    assert 1 - alloc.estimated_macs_after / before >= 0.3
    by_id = {grp.id: grp for grp in graph.prunable_groups()}
    removed_share = {gid: len(alloc.plan.get(gid, [])) / by_id[gid].channels for gid in cost}
    assert removed_share[dearest] > removed_share[cheapest]
    uniform = allocate(graph, flat, AllocationOptions(ratio=0.5)).plan
    assert allocate(graph, flat, AllocationOptions(ratio=0.5, cost_exponent=1.0)).plan == uniform  # no effect on --ratio


def test_unnormalised_ranking_compares_raw_scores_across_groups(graph) -> None:  # type: ignore[no-untyped-def]
    """A group whose scores are all 100x larger is invisible to the mean-normalised ranking, but
    with normalize="none" (scores in loss units) it keeps every channel while the others pay."""
    scores = _scores(graph)
    loud = graph.prunable_groups()[0].id
    scores[loud] = scores[loud] * 100 + 1  # above every other score; the same shape after normalising
    normalised = allocate(graph, scores, AllocationOptions(target_flops=0.3)).plan
    raw = allocate(graph, scores, AllocationOptions(target_flops=0.3, normalize="none"))
    assert normalised.get(loud)  # the mean-normalised ranking prunes it like the rest
    assert not raw.plan.get(loud)
    assert 1 - raw.estimated_macs_after / raw.estimated_macs_before >= 0.3
    uniform = allocate(graph, scores, AllocationOptions(ratio=0.5)).plan
    assert allocate(graph, scores, AllocationOptions(ratio=0.5, normalize="none")).plan == uniform


@pytest.mark.parametrize(("choice", "criterion", "options", "expected"), [
    ("auto", "taylor", {}, "none"),
    ("auto", "sensitivity", {}, "none"),
    ("auto", "sensitivity", {"hessian": "activation"}, "mean"),
    ("auto", "l1", {}, "mean"),
    ("auto", "a-criterion-from-elsewhere", {}, "mean"),
    ("mean", "taylor", {}, "mean"),
    ("none", "l1", {}, "none"),
])
def test_normalize_auto_follows_the_criterion_units(choice: str, criterion: str, options: dict, expected: str) -> None:
    from chanprune_cli.prune.pruning import normalize_mode

    assert normalize_mode(choice, criterion, options) == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"normalize": "max"}, "--normalize must be auto, mean or none, got 'max'"),
    ({"ratio": 0.5, "target_flops": 0.5}, "give exactly one of --ratio"),
    ({"ratio": None}, "give exactly one of --ratio"),
    ({"ratio": 1.0}, "--ratio must be between 0 and 1"),
    ({"target_flops": 0.0, "ratio": None}, "--target-flops must be between 0 and 1"),
    ({"rounds": 0}, "--rounds must be at least 1"),
    ({"rounds": 2}, "--rounds needs --target-flops"),
    ({"min_keep": 1.5}, "--min-keep 1.5: use a fraction below 1 or a whole channel count"),
    ({"round_to": 0}, "--round-to must be at least 1"),
    ({"layer_ratio": "conv2=1"}, "the ratio must be a number from 0"),
])
def test_options_are_checked_when_made(options: dict, message: str) -> None:
    with pytest.raises(UserError, match=re.escape(message)):
        AllocationOptions(**{"ratio": 0.5, **options})


def test_options_travel_parsed() -> None:
    options = AllocationOptions(target_flops=0.5, layer_ratio=["a.*=0.5", {"b": 0}], ignore=["fc*"], rounds=2)
    assert options.layer_ratio == {"a.*": 0.5, "b": 0.0} and options.ignore == ("fc*",)
    assert AllocationOptions(ratio=0.5).layer_ratio == {}


def test_removed_channels_stay_removed_and_leave_the_mean(graph) -> None:  # type: ignore[no-untyped-def]
    """A later round keeps what earlier rounds chose, and normalises each group over what is left:
    a group whose weakest channels went ranks its survivors lower than before."""
    scores = _scores(graph)
    first = allocate(graph, scores, AllocationOptions(target_flops=0.2)).plan
    second = allocate(graph, scores, AllocationOptions(target_flops=0.4), removed=first).plan
    assert all(set(first[g]) <= set(second.get(g, [])) for g in first)
    one_shot = allocate(graph, scores, AllocationOptions(target_flops=0.4)).plan
    assert second != one_shot  # renormalised over the survivors: a different allocation, same target
    nan = {g: s.clone() for g, s in scores.items()}
    gid = next(iter(first))
    nan[gid][first[gid]] = float("nan")  # a removed channel may score NaN (a constant feature map)
    assert allocate(graph, nan, AllocationOptions(target_flops=0.4), removed=first).plan == second
    with pytest.raises(UserError, match="--target-flops"):
        allocate(graph, scores, AllocationOptions(ratio=0.5), removed=first)


# --------------------------------------------------------------------------------------------
# --layer-ratio: per-layer ratios by module glob


@pytest.fixture(scope="module")
def resnet_graph():  # type: ignore[no-untyped-def]
    """Option-A ResNet-20: one residual-stream group spans every stage, the blocks' inner convs are
    groups of their own."""
    return build_graph(build_model(parse_arch("cifar_resnet20")).eval(), (3, 32, 32))


def test_layer_ratios_parse_strings_and_tables_in_order() -> None:
    assert parse_layer_ratios(None) == {} and parse_layer_ratios([]) == {}
    assert parse_layer_ratios("layer3.*=0.7") == {"layer3.*": 0.7}
    assert parse_layer_ratios({"a.*": 0.5, "b": 0}) == {"a.*": 0.5, "b": 0.0}
    mixed = parse_layer_ratios(["*=0.3", {"layer3.*": 0.7}, " conv1 = 0 ", "*=0.4"])
    assert list(mixed.items()) == [("layer3.*", 0.7), ("conv1", 0.0), ("*", 0.4)]  # a repeated glob moves last
    assert parse_layer_ratios(['{"layer3.*": 0.7, "conv1": 0}']) == {"layer3.*": 0.7, "conv1": 0.0}  # as `run` shows a table


@pytest.mark.parametrize(("value", "fragment"), [
    ("layer3.*", "expected GLOB=R"), ("=0.5", "expected GLOB=R"), ("layer3.*=1", "from 0"),
    ("layer3.*=-0.1", "from 0"), ("layer3.*=half", "from 0"), ("layer3.*=nan", "from 0"),
    ({"layer3.*": True}, "from 0"), ({"layer3.*": "0.5x"}, "from 0"), ('{"layer3.*": 0.7', "a JSON object"),
    ("[1, 2]", "expected GLOB=R"), ('{"layer3.*": 2}', "from 0"),
])
def test_layer_ratios_refuse_bad_values(value: object, fragment: str) -> None:
    with pytest.raises(UserError, match=fragment):
        parse_layer_ratios(value)  # type: ignore[arg-type]


def test_a_glob_selects_groups_whose_producers_it_all_matches(resnet_graph) -> None:  # type: ignore[no-untyped-def]
    groups = resnet_graph.prunable_groups()
    names = {g.id: g.name for g in groups}
    matched = match_layer_ratios(groups, {"layer3.*": 0.7, "layer3.1.*": 0.2})
    assert sorted((names[g], r) for g, r in matched.items()) == [
        ("layer3.0.conv1", 0.7), ("layer3.1.conv1", 0.2), ("layer3.2.conv1", 0.7)]  # the last matching glob wins
    stream = next(g for g in groups if len(producers(g)) > 1)
    assert stream.id in match_layer_ratios(groups, {"*": 0.5}) and stream.id not in matched
    assert unmatched_layer_ratios(groups, {"layer3.*": 0.7, "conv1": 0.5, "decoder.*": 0.5}) == {
        "conv1": stream.name, "decoder.*": None}


def test_layer_ratio_replaces_ratio_for_matched_groups(resnet_graph) -> None:  # type: ignore[no-untyped-def]
    scores = _scores(resnet_graph)
    alloc = allocate(resnet_graph, scores, AllocationOptions(ratio=0.5, layer_ratio=["layer3.*=0.75", "layer1.0.conv1=0"]))
    plain = allocate(resnet_graph, scores, AllocationOptions(ratio=0.5)).plan
    for g in resnet_graph.prunable_groups():
        if g.name.startswith("layer3."):
            assert len(alloc.plan[g.id]) == 48 and alloc.layer_ratios[g.id] == 0.75
            kept = [i for i in range(g.channels) if i not in alloc.plan[g.id]]
            assert max(float(scores[g.id][i]) for i in alloc.plan[g.id]) <= min(float(scores[g.id][i]) for i in kept)
        elif g.name == "layer1.0.conv1":
            assert g.id not in alloc.plan and alloc.layer_ratios[g.id] == 0
        else:
            assert alloc.plan.get(g.id) == plain.get(g.id) and g.id not in alloc.layer_ratios
    assert alloc.requested == {"ratio": 0.5}


def test_layer_ratio_with_a_target_is_fixed_and_outside_the_ranking(resnet_graph) -> None:  # type: ignore[no-untyped-def]
    scores = _scores(resnet_graph)
    layer3 = [g for g in resnet_graph.prunable_groups() if g.name.startswith("layer3.")]
    for target in (0.3, 0.5):
        alloc = allocate(resnet_graph, scores, AllocationOptions(target_flops=target, layer_ratio={"layer3.*": 0.25}))
        assert all(len(alloc.plan[g.id]) == 16 for g in layer3)  # whatever the target
        achieved = 1 - alloc.estimated_macs_after / alloc.estimated_macs_before
        assert target <= achieved < target + 0.1
    # stronger scores in layer3 change nothing there: it is not ranked
    boosted = {gid: (s * 1000 if gid in {g.id for g in layer3} else s) for gid, s in scores.items()}
    assert allocate(resnet_graph, boosted, AllocationOptions(target_flops=0.3, layer_ratio={"layer3.*": 0.25})).plan == \
        allocate(resnet_graph, scores, AllocationOptions(target_flops=0.3, layer_ratio={"layer3.*": 0.25})).plan
    # the fixed ratios alone reach the target: the ranking removes nothing more
    alone = allocate(resnet_graph, scores, AllocationOptions(target_flops=0.05, layer_ratio={"layer3.*": 0.5}))
    assert set(alone.plan) == {g.id for g in layer3}
    with pytest.raises(UserError, match="unreachable.*--layer-ratio"):
        allocate(resnet_graph, scores, AllocationOptions(target_flops=0.6, layer_ratio={"*": 0}))


def test_layer_ratio_in_rounds_keeps_earlier_choices(resnet_graph) -> None:  # type: ignore[no-untyped-def]
    scores = _scores(resnet_graph)
    ratios = {"layer3.*": 0.25}
    first = allocate(resnet_graph, scores, AllocationOptions(target_flops=0.2, layer_ratio=ratios)).plan
    nan = {g: s.clone() for g, s in scores.items()}
    for gid, removed in first.items():
        nan[gid][removed] = float("nan")  # masked channels may score NaN in the next round
    second = allocate(resnet_graph, nan, AllocationOptions(target_flops=0.4, layer_ratio=ratios), removed=first).plan
    assert all(set(first[g]) <= set(second.get(g, [])) for g in first)


class EveryNorm(torch.nn.Module):
    """Each norm fvcore counts, in its variants (affine or not, running or batch statistics)."""

    def __init__(self) -> None:
        from torch import nn
        from torchvision.models.convnext import LayerNorm2d

        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
            nn.Conv2d(8, 6, 1), nn.InstanceNorm2d(6, affine=True), nn.ReLU(),
            nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6, affine=False, track_running_stats=False),
            nn.Conv2d(6, 8, 1), LayerNorm2d(8), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_estimated_macs_are_fvcores_before_and_after_pruning() -> None:
    # The allocator's MACs include the norms, as `count_macs` (fvcore) does, so a --target-flops
    # is met in the figure the reports show; the LayerNorm's channels are pinned and cost a fixed amount.
    import copy

    from chanprune_cli.engine.surgery import prune_model
    from chanprune_cli.measure import count_macs

    model, shape = EveryNorm().eval(), (3, 6, 6)
    graph = build_graph(model, shape)
    estimator = MacsEstimator(graph)
    assert estimator.macs({}) == count_macs(model, shape)
    alloc = allocate(graph, _scores(graph), AllocationOptions(target_flops=0.3))
    assert alloc.plan
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, alloc.plan)
    assert alloc.estimated_macs_after == count_macs(pruned, shape) < count_macs(model, shape)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_flops_gives_back_what_the_last_threshold_step_overshoots(seed: int) -> None:
    # ResNet-20's residual streams are one group each, several percent of the MACs per channel: the
    # threshold's last step overshoots, and channels the target does not need come back. What is
    # left removed is minimal: giving back any group's most important removed channel misses the target.
    graph = build_graph(build_model(parse_arch("cifar_resnet20")).eval(), (3, 32, 32))
    estimator = MacsEstimator(graph)
    before = estimator.macs({})
    alloc = allocate(graph, _scores(graph, seed), AllocationOptions(target_flops=0.5))
    assert 0.5 <= 1 - alloc.estimated_macs_after / before < 0.503
    scores = _scores(graph, seed)
    for gid, removed in alloc.plan.items():
        most_important = max(removed, key=lambda i: float(scores[gid][i]))
        fewer = {**alloc.plan, gid: [i for i in removed if i != most_important]}
        assert 1 - estimator.macs(fewer) / before < 0.5
