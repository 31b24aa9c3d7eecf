"""Turn scores into a plan: which channels of each group to remove.

`--ratio r` removes the fraction r of every prunable group's channels (lowest scores first).
`--target-flops f` removes the fraction f of the model's MACs with one global threshold on
the scores (each group's divided by their mean unless they are in loss units), found by bisection; floors
(`--min-keep`) and `--round-to` are applied per group at every threshold, so the search sees the
widths that will really be built.
`--target-latency` spends a latency budget, as a `LatencyModel` of the target predicts it, where
the least importance is lost per millisecond saved (`_Planner.latency_ranking`).
`--layer-ratio GLOB=R` gives the groups all of whose producer layers match GLOB their own ratio R:
with `--ratio` instead of it, with `--target-flops` or `--target-latency` at that fixed ratio and
outside the global ranking (the ranking removes what the target still needs from the other groups).

`AllocationOptions` holds all of these, validated once when made; it travels unchanged from the
recipe through `prune.rounds` and `prune.pruning` to `allocate`.
"""

from __future__ import annotations

import fnmatch
import json
import math
from collections import ChainMap, Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import UserError
from .graph import ChannelGraph, ChannelGroup
from .latency import (
    LatencyBudget,
    LatencyGoal,
    LatencyUnreachable,
    module_macs,
    parse_latency_goal,
    removed_slots,
)
from .layer_rules import PRODUCER_KINDS, WIDTH_KINDS
from .scores import group_weights

DEFAULT_MIN_KEEP = 0.1
NORMALIZE_MODES = ("auto", "mean", "none")


@dataclass
class Allocation:
    plan: dict[int, list[int]]  # group id -> class indices to remove (sorted)
    requested: dict[str, float]
    estimated_macs_before: int
    estimated_macs_after: int
    floors: dict[int, int] = field(default_factory=dict)  # group id -> minimum channels kept
    layer_ratios: dict[int, float] = field(default_factory=dict)  # group id -> its --layer-ratio (matched groups)


@dataclass(frozen=True)
class AllocationOptions:
    """What a plan removes and under which rules; the names are `chanprune prune`'s flags.

    Exactly one target: `ratio`, the fraction of every prunable group's channels, or
    `target_flops`, the fraction of the model's MACs (one global ranking), each in (0, 1), or
    `target_latency`, a fraction in (0, 1) of the original's latency or a time ("12ms"; parsed to a
    `LatencyGoal`), which `allocate` meets as the `LatencyBudget` it is given predicts latency;
    `rounds` > 1 reaches `target_flops` or `target_latency` in that many rescoring rounds (`prune.rounds`).
    `layer_ratio` ("GLOB=R" strings or {GLOB: R}; parsed to {GLOB: R}, see `parse_layer_ratios`):
    a group all of whose producer modules match GLOB loses the fraction R of its channels instead
    of `ratio`; with `target_flops` it loses that fraction whatever the target, takes no part in the
    global ranking, and its removal counts towards the target.
    `min_keep`: every layer keeps at least this fraction (< 1) or count of its channels; `round_to`:
    kept widths are multiples of it (both hold for `layer_ratio` groups too); "auto" stands for the
    multiple the latency target's kernels favour, which the prune recipe puts in its place
    (`deploy.runtimes.LatencyTarget.favoured_multiple`) before anything is allocated.
    `cost_exponent` E (`target_flops` only): rank channels by normalised importance / cost^E, the
    cost being the MACs one channel of the group costs relative to the mean over groups. E = 0 is
    the plain global ranking; E = 1 ranks importance per MAC, so the target is met by removing the
    channels that cost most for what they contribute and cheap ones (late, low-resolution layers)
    survive; E = 0.5 is in between (measurements: BENCHMARKS.md). Not with `target_latency`, which
    weighs channels by the milliseconds they cost.
    `normalize` (`target_flops` only): "mean" divides each group's scores by their mean before
    ranking, so that criteria whose magnitudes differ from layer to layer (norms, BN scales, ranks)
    compare; "none" ranks them as they are (scores in loss units); "auto" is the criterion's choice
    (`prune.scoring.ResolvedCriterion.normalize_mode`), which `allocate`, not knowing the
    criterion, takes as "mean".
    `ignore`: globs of modules whose output channels are never removed (they pin their channels
    when the channel graph is built, `engine.graph.build_graph`)."""

    ratio: float | None = None
    target_flops: float | None = None
    layer_ratio: LayerRatioArg | None = None
    min_keep: float = DEFAULT_MIN_KEEP
    round_to: int | str = 1
    cost_exponent: float = 0.0
    normalize: str = "auto"
    rounds: int = 1
    ignore: Sequence[str] = ()
    target_latency: float | str | LatencyGoal | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UserError(f"--rounds must be at least 1, got {self.rounds}")
        if self.rounds > 1 and self.target_flops is None and self.target_latency is None:
            raise UserError("--rounds needs --target-flops or --target-latency (the rounds split one global target); "
                            "use one of them instead of --ratio")
        given = [v is not None for v in (self.ratio, self.target_flops, self.target_latency)]
        if sum(given) != 1:
            raise UserError("give exactly one of --ratio (fraction of channels), --target-flops (fraction of MACs) "
                            "or --target-latency (fraction of the latency)")
        for name, value in (("--ratio", self.ratio), ("--target-flops", self.target_flops)):
            if value is not None and not 0 < value < 1:
                raise UserError(f"{name} must be between 0 and 1 (exclusive), got {value:g}")
        if self.target_latency is not None:
            object.__setattr__(self, "target_latency", parse_latency_goal(self.target_latency))
            if self.cost_exponent:
                raise UserError("--cost-exponent weighs channels by their MACs for --target-flops; --target-latency "
                                "weighs them by the milliseconds they cost: drop --cost-exponent")
        object.__setattr__(self, "layer_ratio", parse_layer_ratios(self.layer_ratio))
        parse_min_keep(self.min_keep)
        if isinstance(self.round_to, str):
            text = self.round_to.strip().lower()
            try:
                object.__setattr__(self, "round_to", text if text == "auto" else int(text))
            except ValueError:
                raise UserError(f"--round-to must be a whole number of channels or auto, got {self.round_to!r}") from None
        if self.round_to != "auto" and self.round_to < 1:  # type: ignore[operator]
            raise UserError(f"--round-to must be at least 1, got {self.round_to}")
        if self.normalize not in NORMALIZE_MODES:
            raise UserError(f"--normalize must be auto, mean or none, got {self.normalize!r}")
        object.__setattr__(self, "ignore", tuple(self.ignore))

def parse_min_keep(value: float) -> float:
    if value <= 0:
        raise UserError(f"--min-keep must be positive (a fraction below 1 or a channel count), got {value}")
    if value >= 1 and not float(value).is_integer():
        raise UserError(f"--min-keep {value}: use a fraction below 1 or a whole channel count")
    return value


LayerRatioArg = str | Mapping[str, float] | Iterable[str | Mapping[str, float]]
_LAYER_RATIO_EXAMPLE = "e.g. --layer-ratio 'layer3.*=0.7'"


def parse_layer_ratios(spec: LayerRatioArg | None) -> dict[str, float]:
    """`--layer-ratio` values, validated in one place: "GLOB=R" strings (the option, repeatable) or
    {GLOB: R} tables (a config file; as a flag, a JSON object), in order; a glob given twice keeps
    its last ratio. R is in [0, 1): 0 keeps the matched groups whole."""
    if spec is None:
        return {}
    items = [spec] if isinstance(spec, (str, Mapping)) else list(spec)
    pairs: list[tuple[str, object]] = []
    for item in items:
        if isinstance(item, str) and item.lstrip().startswith("{"):  # a table written out (`chanprune run` shows them so)
            try:
                item = json.loads(item)
            except json.JSONDecodeError:
                item = None
            if not isinstance(item, dict):
                raise UserError(f"--layer-ratio: expected GLOB=R or a JSON object {{\"GLOB\": R}}, {_LAYER_RATIO_EXAMPLE}")
        if isinstance(item, Mapping):
            pairs.extend((str(k), v) for k, v in item.items())
            continue
        glob, sep, value = str(item).rpartition("=")
        if not sep or not glob.strip():
            raise UserError(f"--layer-ratio {item!r}: expected GLOB=R (a module-name pattern and a ratio), {_LAYER_RATIO_EXAMPLE}")
        pairs.append((glob, value))
    ratios: dict[str, float] = {}
    for glob, value in pairs:
        glob = glob.strip()
        try:
            ratio = float(value) if not isinstance(value, bool) else math.nan  # type: ignore[arg-type]
        except (TypeError, ValueError):
            ratio = math.nan
        if not glob:
            raise UserError(f"--layer-ratio ={value}: expected GLOB=R (a module-name pattern and a ratio), {_LAYER_RATIO_EXAMPLE}")
        if not 0 <= ratio < 1:
            raise UserError(f"--layer-ratio {glob}={value}: the ratio must be a number from 0 (keep every channel) "
                            f"to below 1, {_LAYER_RATIO_EXAMPLE}")
        ratios.pop(glob, None)  # a repeated glob moves to where it was given last
        ratios[glob] = ratio
    return ratios


def producers(group: ChannelGroup) -> set[str]:
    """The modules whose output channels the group's classes are."""
    return {m for slots in group.classes for m, k, _ in slots if k in PRODUCER_KINDS}


def _matches(names: Iterable[str], glob: str) -> list[bool]:
    return [fnmatch.fnmatchcase(n, glob) for n in names]


def match_layer_ratios(groups: Iterable[ChannelGroup], ratios: Mapping[str, float]) -> dict[int, float]:
    """Group id -> ratio for every group all of whose producer modules match a glob of `ratios`
    (the last such glob wins, as later flags override earlier ones). All, not any: a residual
    stream couples layers of every stage, and `layer3.*` must not prune the stem."""
    matched: dict[int, float] = {}
    for g in groups:
        names = sorted(producers(g))
        for glob, ratio in ratios.items():
            if names and all(_matches(names, glob)):
                matched[g.id] = ratio
    return matched


def unmatched_layer_ratios(groups: Sequence[ChannelGroup], ratios: Mapping[str, float]) -> dict[str, str | None]:
    """Globs of `ratios` that select no group: glob -> a group whose producers it matches only in
    part (None: it matches none). The recipe warns about them."""
    unmatched: dict[str, str | None] = {}
    for glob in ratios:
        hits = [(g.name, _matches(sorted(producers(g)), glob)) for g in groups]
        if not any(found and all(found) for _, found in hits):
            unmatched[glob] = next((name for name, found in hits if any(found)), None)
    return unmatched


def _width_floor(width: int, min_keep: float) -> int:
    """Channels a layer of `width` keeps at least under --min-keep (a fraction or a count)."""
    return min(width, max(1, math.ceil(min_keep * width) if min_keep < 1 else int(min_keep)))


def _floor(group: ChannelGroup, min_keep: float, round_to: int) -> int:
    return min(group.channels, max(_width_floor(group.channels, min_keep), len(group.pinned), round_to))


def _kept_count(group: ChannelGroup, remove: int, floor: int, round_to: int) -> int:
    kept = max(group.channels - remove, floor)
    if round_to > 1:
        kept = min(group.channels, math.ceil(kept / round_to) * round_to)
    return kept


def _module_sizes(group: ChannelGroup) -> dict[tuple[str, str], int]:
    sizes: dict[tuple[str, str], int] = {}
    for slots in group.classes:
        for module, kind, _ in slots:
            if kind in WIDTH_KINDS:
                sizes[(module, kind)] = sizes.get((module, kind), 0) + 1
    return sizes


def _removal(group: ChannelGroup, scores: torch.Tensor, kept: int, module_floor: Callable[[int], int]) -> list[int]:
    """The lowest-scoring prunable classes, as many as needed to keep `kept` channels.

    A class is skipped when removing it would take one of its layers below `module_floor(width)`:
    in a group spanning several stages (the option-A ResNets), the lowest scores could otherwise
    empty one stage entirely.
    """
    n_remove = min(group.channels - kept, len(group.prunable_classes))
    if n_remove <= 0:
        return []
    return sorted(_removal_order(group, scores, module_floor, n_remove))


def _removal_order(group: ChannelGroup, scores: torch.Tensor, module_floor: Callable[[int], int],
                   limit: int | None = None) -> list[int]:
    """The prunable classes in the order `_removal` takes them (at most `limit`): the removal that
    keeps k fewer channels is the first k of them, since a class skipped for a layer's floor stays
    skipped as more go."""
    sizes = _module_sizes(group)
    left = dict(sizes)
    chosen: list[int] = []
    for i in sorted(group.prunable_classes, key=lambda i: (float(scores[i]), i)):
        if len(chosen) == limit:
            break
        hits: dict[tuple[str, str], int] = {}
        for module, kind, _ in group.classes[i]:
            if kind in WIDTH_KINDS:
                hits[(module, kind)] = hits.get((module, kind), 0) + 1
        if all(left[key] - n >= module_floor(sizes[key]) for key, n in hits.items()):
            for key, n in hits.items():
                left[key] -= n
            chosen.append(i)
    return chosen


def _give_back(plan: dict[int, list[int]], ranked: Sequence[ChannelGroup], normalised: Mapping[int, torch.Tensor],
               gone: Mapping[int, set[int]], round_to: int, min_keep: float, estimator: MacsEstimator,
               meets_target: Callable[[int], bool]) -> dict[int, list[int]]:
    """`plan` with removed channels given back, the most important first, while its MACs still meet
    the target. The threshold's last step can overshoot: a channel shared by many layers (a residual
    stream's) is several percent of the MACs at once. Giving back only ever removes less, so the
    plan keeps more importance for the same target. Channels of earlier rounds stay removed."""
    plan = dict(plan)
    by_id = {g.id: g for g in ranked}
    removed = estimator.removed(plan)

    def best_removed(gid: int) -> float:
        back = [i for i in plan[gid] if i not in gone.get(gid, ())]
        return float(normalised[gid][back].max()) if back else -math.inf

    best = {g.id: best_removed(g.id) for g in ranked}
    candidates = {gid for gid, value in best.items() if value > -math.inf}
    while candidates:
        gid = max(candidates, key=lambda k: (best[k], -k))
        g = by_id[gid]
        kept = min(g.channels, ((g.channels - len(plan[gid])) // round_to + 1) * round_to)
        fewer = _removal(g, normalised[gid], kept, lambda width: _width_floor(width, min_keep))
        back = sorted(set(plan[gid]) - set(fewer))
        trial = removed - estimator.removed({gid: back})
        if back and not gone.get(gid, set()) & set(back) and meets_target(estimator.macs_without(trial)):
            plan[gid], removed = fewer, trial
            best[gid] = best_removed(gid)
            if best[gid] == -math.inf:
                candidates.discard(gid)
        else:  # later give-backs only leave less room: this group cannot give back any more
            candidates.discard(gid)
    return plan


def _check_scores(graph: ChannelGraph, scores: Mapping[int, torch.Tensor], alive: Mapping[int, list[int]]) -> None:
    for g in graph.prunable_groups():
        s = scores.get(g.id)
        if s is None:
            raise UserError(f"no scores for channel group {g.name}; were the scores made for this model?")
        if s.numel() != g.channels:
            raise UserError(f"scores for group {g.name} have {s.numel()} entries but the group has {g.channels} channels")
        if not torch.isfinite(s[alive[g.id]]).all():  # channels removed already may score NaN (e.g. a constant map)
            raise UserError(f"scores for group {g.name} contain NaN or Inf")


class MacsEstimator:
    """MACs as a function of the kept channels: conv/linear layers and norms, as fvcore counts them
    (`measure.count_macs`; its pooling and upsampling, under 1 % on torchvision's models, are not).
    A layer whose work depends on the input (a detector's heads, a layer called once per feature
    level) costs what the graph's trace saw on its last call until the costs are fitted to the
    original's counted workload (`prune.workload.fit_costs`, which `prune` does before allocating)."""

    def __init__(self, graph: ChannelGraph) -> None:
        self.graph = graph

    def removed(self, plan: Mapping[int, Sequence[int]]) -> Counter[tuple[str, str]]:
        """Slots `plan` removes, by (module, slot kind)."""
        return removed_slots(self.graph, plan)

    def macs(self, plan: Mapping[int, Sequence[int]]) -> int:
        return self.macs_without(self.removed(plan))

    def macs_without(self, removed: Mapping[tuple[str, str], int]) -> int:
        """MACs with the slots `removed` (see `removed`) gone."""
        return sum(int(module_macs(cost, name, removed)) for name, cost in self.graph.costs.items())


def allocate(graph: ChannelGraph, scores: Mapping[int, torch.Tensor], options: AllocationOptions, *,
             removed: Mapping[int, Sequence[int]] | None = None, latency: LatencyBudget | None = None) -> Allocation:
    """A plan for `graph` from `scores` as `options` ask (see `AllocationOptions`; what depends on
    the graph and the scores is checked here).

    `removed` (`target_flops`, `target_latency`): channels chosen by earlier rounds
    (`rounds.score_in_rounds`); they stay in the plan, and each group is normalised by the mean of
    the channels still alive. `latency` (`target_latency` only): the predicted milliseconds the
    plan must fit (`chanprune_cli.latency` measures the model and corrects the budget)."""
    planner = _Planner(graph, scores, options, removed or {})
    if options.ratio is not None:
        plan, requested = planner.uniform(options.ratio), {"ratio": options.ratio}
    elif isinstance(options.target_latency, LatencyGoal):
        if latency is None:
            raise UserError("--target-latency needs a latency model of the target: prune through chanprune_cli.latency "
                            "(chanprune prune builds one), or use --target-flops")
        plan, requested = planner.latency_ranking(latency), options.target_latency.requested()
    else:
        assert options.target_flops is not None
        plan, requested = planner.global_ranking(options.target_flops), {"target_flops": options.target_flops}
    return Allocation({k: v for k, v in plan.items() if v}, requested, planner.before, planner.estimator.macs(plan),
                      planner.floors, planner.fixed_ratio)


class _Planner:
    """One allocation: the prunable groups with their floors, scores and fixed ratios, the channels
    earlier rounds removed, and the MACs of any plan."""

    def __init__(self, graph: ChannelGraph, scores: Mapping[int, torch.Tensor], options: AllocationOptions,
                 removed: Mapping[int, Sequence[int]]) -> None:
        groups = graph.prunable_groups()
        if not groups:
            raise UserError("this model has no prunable channel group (see `chanprune analyze` for the reasons)")
        if not isinstance(options.round_to, int):
            raise UserError("--round-to auto takes its multiple from a latency target: give the number (e.g. --round-to 8), "
                            "or prune through chanprune prune, which measures the target")
        widest = max(g.channels for g in groups)
        if widest < options.round_to:
            raise UserError(f"--round-to {options.round_to} is larger than every prunable layer (widest: {widest} "
                            "channels); use a smaller --round-to")
        if options.ratio is not None and any(removed.values()):
            raise UserError("pruning in rounds needs --target-flops, not --ratio")
        self.groups, self.scores, self.options, self.removed = groups, scores, options, removed
        self.gone = {gid: set(indices) for gid, indices in removed.items()}
        # the prunable channels no earlier round removed: the ones checked and normalised
        self.alive = {g.id: [i for i in g.prunable_classes if i not in self.gone.get(g.id, ())] for g in groups}
        _check_scores(graph, scores, self.alive)
        self.floors = {g.id: _floor(g, options.min_keep, options.round_to) for g in groups}
        self.estimator = MacsEstimator(graph)
        self.before = self.estimator.macs({})
        self.fixed_ratio = match_layer_ratios(groups, options.layer_ratio)  # type: ignore[arg-type]

    def at_ratio(self, g: ChannelGroup, r: float) -> list[int]:
        """The fraction `r` of group `g`'s channels, lowest scores first."""
        min_keep = self.options.min_keep

        def ratio_floor(width: int) -> int:  # every layer keeps its share, not only the group
            return max(_width_floor(width, min_keep), width - round(r * width))

        s = self.scores[g.id]
        if self.gone.get(g.id):  # an earlier round's choices go first (their scores may be NaN)
            s = s.double().clone()
            s[sorted(self.gone[g.id])] = -math.inf
        kept = _kept_count(g, round(r * g.channels), self.floors[g.id], self.options.round_to)
        return _removal(g, s, kept, ratio_floor)

    def uniform(self, ratio: float) -> dict[int, list[int]]:
        return {g.id: self.at_ratio(g, self.fixed_ratio.get(g.id, ratio)) for g in self.groups}

    def ranking(self, ranked: Sequence[ChannelGroup]) -> dict[int, torch.Tensor]:
        """The scores of the `ranked` groups on one scale: normalised, weighted, divided by their cost
        to the power `cost_exponent`; channels of earlier rounds at -inf (first to go, at any threshold)."""
        weights = group_weights(self.scores)  # e.g. layer sensitivity: heavier groups keep more
        normalised = {}
        for g in ranked:
            s = self.scores[g.id].double()
            alive = self.alive[g.id]
            mean = s[alive].abs().mean() if self.options.normalize != "none" and alive else 1.0
            normalised[g.id] = (s / mean if mean > 0 else s) * weights.get(g.id, 1.0)
        exponent = self.options.cost_exponent
        if exponent and ranked:
            cost = {g.id: self.before - self.estimator.macs({g.id: [g.prunable_classes[0]]}) for g in ranked}
            mean_cost = sum(cost.values()) / len(cost)
            for g in ranked:
                if cost[g.id] > 0:
                    normalised[g.id] = normalised[g.id] * (mean_cost / cost[g.id]) ** exponent
        for gid, indices in self.removed.items():
            if gid in normalised:
                normalised[gid][list(indices)] = -math.inf
        return normalised

    def reduced(self, after: int) -> float:
        return 1 - after / self.before if self.before else 0.0

    def global_ranking(self, target: float) -> dict[int, list[int]]:
        """The plan of the smallest threshold on the ranked scores that removes `target` of the MACs,
        with the threshold's overshoot given back (`_give_back`)."""
        min_keep, round_to = self.options.min_keep, self.options.round_to
        fixed = {g.id: self.at_ratio(g, self.fixed_ratio[g.id]) for g in self.groups if g.id in self.fixed_ratio}
        ranked = [g for g in self.groups if g.id not in self.fixed_ratio]
        normalised = self.ranking(ranked)

        def plan_at(threshold: float) -> dict[int, list[int]]:
            plan = dict(fixed)
            for g in ranked:
                below = sum(1 for i in g.prunable_classes if float(normalised[g.id][i]) < threshold)
                kept = _kept_count(g, below, self.floors[g.id], round_to)
                plan[g.id] = _removal(g, normalised[g.id], kept, lambda width: _width_floor(width, min_keep))
            return plan

        def reduction(plan: Mapping[int, list[int]]) -> float:
            return self.reduced(self.estimator.macs(plan))

        most = plan_at(math.inf)
        if reduction(most) < target:
            fixed_text = f" and --layer-ratio fixing {len(fixed)} group(s)" if fixed else ""
            fix_text = ", lower --min-keep or raise or drop --layer-ratio" if fixed else " or lower --min-keep"
            raise UserError(f"--target-flops {target:g} is unreachable: with --min-keep {min_keep:g}{fixed_text} at "
                            f"most {reduction(most):.1%} of the prunable MACs can be removed; ask for less{fix_text}")
        if fixed and not any(self.removed.values()) and reduction(fixed) >= target:
            return plan_at(-math.inf)  # the fixed ratios alone reach the target: the ranking removes nothing more
        # Smallest threshold (index into the sorted score values) that reaches the target.
        values = sorted({float(normalised[g.id][i]) for g in ranked for i in g.prunable_classes})
        lo, hi = 0, len(values)
        while lo < hi:
            mid = (lo + hi) // 2
            threshold = values[mid] if mid < len(values) else math.inf
            if reduction(plan_at(math.nextafter(threshold, math.inf))) >= target:
                hi = mid
            else:
                lo = mid + 1
        threshold = values[lo] if lo < len(values) else math.inf
        plan = plan_at(math.nextafter(threshold, math.inf))
        return _give_back(plan, ranked, normalised, self.gone, round_to, min_keep, self.estimator,
                          lambda after: self.reduced(after) >= target)

    def latency_ranking(self, budget: LatencyBudget) -> dict[int, list[int]]:
        """The plan whose predicted latency fits `budget`, losing the least importance per millisecond
        saved (see `_LatencySearch`)."""
        fixed = {g.id: self.at_ratio(g, self.fixed_ratio[g.id]) for g in self.groups if g.id in self.fixed_ratio}
        ranked = [g for g in self.groups if g.id not in self.fixed_ratio]
        return _LatencySearch(self, ranked, fixed, budget).run()


class _LatencySearch:
    """The latency allocation. Each ranked group removes its channels in one order (lowest normalised
    score first, layers' floors kept: `_removal_order`); its candidate widths are those --min-keep and
    --round-to allow. From the widths held, the move of least importance lost per predicted ms saved
    (the other groups at their widths) is taken, over and over, until the prediction fits the budget.
    The least slope is the first edge of the lower convex hull of (ms saved, importance lost), so a
    width slower than a narrower one, or no faster than a wider one, is never where a group stops: the
    staircase of the tables snaps every group to the fastest width at or below its choice. The last
    move can overshoot; removals are then given back, most importance regained per ms first, while
    the prediction still fits."""

    def __init__(self, planner: _Planner, ranked: Sequence[ChannelGroup], fixed: Mapping[int, list[int]],
                 budget: LatencyBudget) -> None:
        options = planner.options
        self.planner, self.ranked, self.fixed = planner, list(ranked), dict(fixed)
        self.model, self.budget = budget.model, budget.ms
        normalised = planner.ranking(self.ranked)
        self.order: dict[int, list[int]] = {}
        self.lost: dict[int, torch.Tensor] = {}  # group -> importance lost by removing the first k of its order
        self.counts: dict[int, dict[tuple[str, str], torch.Tensor]] = {}  # group -> slot -> removed by the first k
        self.choices: dict[int, torch.Tensor] = {}  # group -> removal counts it may stop at (ascending)
        self.k: dict[int, int] = {}  # group -> removal count held
        for g in self.ranked:
            order = _removal_order(g, normalised[g.id], lambda width: _width_floor(width, options.min_keep))
            values = normalised[g.id][order] if order else torch.zeros(0, dtype=torch.float64)
            values = torch.where(torch.isneginf(values), torch.zeros_like(values), values)  # earlier rounds' removals
            self.order[g.id] = order
            self.lost[g.id] = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(values, 0)])
            counts: dict[tuple[str, str], torch.Tensor] = {}
            for step, ci in enumerate(order):
                for module, kind, _ in g.classes[ci]:
                    counts.setdefault((module, kind), torch.zeros(len(order) + 1, dtype=torch.long))[step + 1:] += 1
            self.counts[g.id] = counts
            start = len(planner.gone.get(g.id, ()))
            kept = g.channels - torch.arange(len(order) + 1)
            allowed = (kept >= planner.floors[g.id]) & ((kept % options.round_to == 0) | (kept == g.channels))
            allowed[:start] = False
            allowed[start] = True
            self.choices[g.id] = torch.nonzero(allowed).flatten()
            self.k[g.id] = start
        self.removed: Counter[tuple[str, str]] = removed_slots(planner.estimator.graph, self.fixed)
        for g in self.ranked:
            for slot, c in self.counts[g.id].items():
                self.removed[slot] += int(c[self.k[g.id]])
        self.reading = {g.id: self.model.modules_reading(list(self.counts[g.id])) for g in self.ranked}
        self.neighbours = {g.id: [h.id for h in self.ranked if set(self.reading[g.id]) & set(self.reading[h.id])]
                           for g in self.ranked}
        self.original_ms = self.model.predict({})
        self.totals: tuple[Any, Any] = (0.0, 0)

    def predict(self) -> float:
        """The prediction for the widths held (and `totals`, its layers' sum and the rest's MACs, refreshed)."""
        self.totals = (self.model.layers_ms(self.removed), self.model.rest_macs(self.removed))
        return float(self.model.combine(*self.totals))

    def evaluate(self, gid: int, ks: torch.Tensor) -> torch.Tensor:
        """The predicted latency with group `gid` removing each of `ks`, the other groups as they are."""
        modules = self.reading[gid]
        trial = {slot: self.removed[slot] - int(c[self.k[gid]]) + c[ks] for slot, c in self.counts[gid].items()}
        layers_all, rest_all = self.totals
        layers = layers_all - self.model.layers_ms(self.removed, modules) + self.model.layers_ms(ChainMap(trial, self.removed), modules)
        rest = rest_all - self.model.rest_macs(self.removed, modules) + self.model.rest_macs(ChainMap(trial, self.removed), modules)
        return self.model.combine(layers, rest)

    def best_move(self, gid: int) -> tuple[float, int] | None:
        """(importance lost per ms saved, removal count) of group `gid`'s least-slope move, if any saves time."""
        held = self.k[gid]
        ks = self.choices[gid][self.choices[gid] > held]
        if not len(ks):
            return None
        now, times = self.evaluate(gid, torch.tensor([held])), self.evaluate(gid, ks)
        saved = now - times
        faster = saved > 1e-9 * max(float(now), 1e-12)
        if not bool(faster.any()):
            return None
        slope = (self.lost[gid][ks] - self.lost[gid][held]) / torch.where(faster, saved, torch.ones_like(saved))
        slope = torch.where(faster, slope, torch.full_like(slope, math.inf))
        best = int(torch.argmin(slope))  # the first (widest) of equal slopes
        return float(slope[best]), int(ks[best])

    def move(self, gid: int, k: int) -> None:
        for slot, c in self.counts[gid].items():
            self.removed[slot] += int(c[k]) - int(c[self.k[gid]])
        self.k[gid] = k

    def run(self) -> dict[int, list[int]]:
        predicted = self.predict()
        best = {g.id: self.best_move(g.id) for g in self.ranked}
        while predicted > self.budget:
            moves = [(found[0], gid) for gid, found in best.items() if found is not None]
            if not moves:
                self.unreachable(predicted)
            _, gid = min(moves)
            self.move(gid, best[gid][1])  # type: ignore[index]
            predicted = self.predict()
            for h in self.neighbours[gid]:
                best[h] = self.best_move(h)
        self.give_back(predicted)
        plan = dict(self.fixed)
        plan.update({gid: sorted(self.order[gid][:k]) for gid, k in self.k.items()})
        return plan

    def give_back(self, predicted: float) -> None:
        """Widen groups while the prediction fits, the most importance regained per ms added first
        (a width that is no slower goes back first)."""
        while True:
            found: tuple[float, int, int, float] | None = None
            for g in self.ranked:
                held = self.k[g.id]
                ks = self.choices[g.id][self.choices[g.id] < held]
                if not len(ks):
                    continue
                times = self.evaluate(g.id, ks)
                regained = self.lost[g.id][held] - self.lost[g.id][ks]
                added = times - predicted
                value = torch.where(added > 0, regained / torch.clamp(added, min=1e-300), torch.full_like(added, math.inf))
                value = torch.where((times <= self.budget) & (regained > 0), value, torch.full_like(value, -math.inf))
                i = int(torch.argmax(value))
                if value[i] > -math.inf and (found is None or float(value[i]) > found[0]):
                    found = (float(value[i]), g.id, int(ks[i]), float(times[i]))
            if found is None:
                return
            self.move(found[1], found[2])
            predicted = self.predict()

    def unreachable(self, predicted: float) -> None:
        options = self.planner.options
        fixed = f" and --layer-ratio fixing {len(self.fixed)} group(s)" if self.fixed else ""
        raise LatencyUnreachable(
            f"--target-latency {options.target_latency.describe()}: the plan cannot get below {predicted:.3g} ms as "  # type: ignore[union-attr]
            f"predicted ({predicted / self.original_ms:.0%} of the original's {self.original_ms:.3g} ms; the budget "
            f"is {self.budget:.3g} ms): every prunable group is at its floor (--min-keep {options.min_keep:g}"
            f"{f', --round-to {options.round_to}' if options.round_to > 1 else ''}){fixed} or removing more saves no "
            "time; ask for less or lower --min-keep", predicted, self.original_ms)
