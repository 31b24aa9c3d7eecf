"""Pruning to a measured latency: plan to a predicted budget, time the pruned candidate against the
original, correct the budget, until the measured ratio meets the target.

The first budget is the target ratio of the original's predicted latency. Each attempt allocates
to the budget (`engine.allocate`, `target_latency`), removes the planned channels from a copy
(unverified: it is only timed) and times it against the original, interleaved (A, B, A, B, ...),
and the ratio is the median of the round-by-round ratios: two runs side by side share the load of
the moment, so the ratio holds on a machine whose load changes. A measured ratio off the
target by more than `tolerance` moves the budget: in proportion at first, then by the secant
through the attempts on either side of the target (removing more when the candidate was too slow,
giving back when it was faster than asked). A first budget below every prediction starts from the
fastest plan predicted (the runtime may reach what the tables do not). A budget whose plan was
timed already (the tables'
staircase is coarser than the move) counts as measured at that plan's ratio and moves on, untimed:
inside the bracket as above, else by a step that doubles each time (`MAX_MOVES` in all). At most
`max_attempts` timed attempts; the one closest to
the target is kept, and is pruned again, verified, by `prune.pruning.prune` (the allocation is
deterministic, so it is the plan that was timed). A target that no attempt comes within `accept`
of is a `UserError` that says how close it got and what stopped it, before anything is written.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from ..deploy.runtimes import LatencyTarget, Runner, Timing, median_ms, time_interleaved
from ..engine.allocate import AllocationOptions, allocate
from ..engine.graph import ChannelGraph
from ..engine.latency import LatencyBudget, LatencyGoal, LatencyUnreachable
from ..errors import UserError
from ..prune import pruning
from ..prune.scoring import ResolvedCriterion
from ..prune.workload import CountedWork
from .table import LatencyTables, pruned

__all__ = ["ACCEPT", "CHECK_TIMING", "TOLERANCE", "Attempt", "LatencyResult", "PairTimer", "PairTiming", "prune_to_latency",
           "slower_warning"]

TOLERANCE = 0.02  # a measured ratio this close to the target ends the corrections
ACCEPT = 0.05  # the closest attempt must be at least this close, else the target is not met
MAX_ATTEMPTS = 6
MAX_MOVES = 12  # untimed budget moves past plans timed already
FIRST_PUSH = 0.1  # the first such move, as a fraction of the budget (doubling)
PAIR_TIMING = Timing(warmup=3, repeats=40, max_time=6.0)
CHECK_TIMING = Timing(warmup=2, repeats=20, max_time=2.0)  # "never slower": every saved plan, briefly
SLOWER = 1.05  # a measured ratio above this is slower than timing noise explains


class PairTimer:
    """Times candidates against one original on `target`, interleaved (the original's runner is made once)."""

    def __init__(self, original: nn.Module, input_shape: Sequence[int], target: LatencyTarget,
                 timing: Timing = PAIR_TIMING) -> None:
        self.input_shape, self.target, self.timing = tuple(input_shape), target, timing
        self.original: Runner = target.model_runner(original, input_shape)

    def __call__(self, candidate: nn.Module) -> PairTiming:
        """The original's and the candidate's medians, timed round by round, and their ratio."""
        runner = self.target.model_runner(candidate, self.input_shape)
        with self.target.timing():
            before, after = time_interleaved([self.original, runner], self.timing)
        ratios = [b / a for a, b in zip(before, after)]
        low = statistics.quantiles(ratios, n=10)[0] if len(ratios) > 1 else ratios[0]
        return PairTiming(median_ms(before), median_ms(after), statistics.median(ratios), low)


class PairTiming(NamedTuple):
    """An original and a candidate timed side by side: medians (ms) and the candidate's latency as a
    fraction of the original's (the median of the round-by-round ratios; None: after / before), and
    the 10th percentile of those ratios (`low`: above 1, the candidate was slower in 9 rounds of 10)."""

    before_ms: float
    after_ms: float
    ratio: float | None = None
    low: float | None = None


@dataclass
class Attempt:
    """One timed candidate: the budget it was planned to, its prediction, the medians measured and
    the measured ratio (`PairTiming`)."""

    budget_ms: float
    predicted_ms: float
    before_ms: float
    after_ms: float
    ratio: float
    predicted_ratio: float = 1.0  # the prediction as a fraction of the original's predicted latency

    def to_json(self) -> dict[str, float]:
        return {"budget_ms": self.budget_ms, "predicted_ms": self.predicted_ms, "predicted_ratio": self.predicted_ratio,
                "before_ms": self.before_ms, "after_ms": self.after_ms, "ratio": self.ratio}


@dataclass
class LatencyResult:
    """The verified pruning of the kept attempt, and how the target was reached."""

    outcome: pruning.PruneOutcome
    goal: LatencyGoal
    goal_ratio: float  # the target as a fraction of the original's measured latency
    attempt: Attempt  # the kept one
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def predicted_ms(self) -> float:
        return self.attempt.predicted_ms


def goal_ratio(goal: LatencyGoal, original_ms: float) -> float:
    """The target as a fraction of the original's measured latency; a time at or above it is a UserError."""
    if goal.fraction is not None:
        return goal.fraction
    ratio = float(goal.ms or 0) / original_ms
    if ratio >= 1:
        raise UserError(f"--target-latency {goal.describe()} is not below the original's {original_ms:.3g} ms on this "
                        "target: there is nothing to remove; ask for less time, or give a fraction such as 0.5")
    return ratio


def prune_to_latency(model: nn.Module, graph: ChannelGraph, scores: Mapping[int, torch.Tensor],
                     input_shape: Sequence[int], *, criterion: ResolvedCriterion, options: AllocationOptions,
                     tables: LatencyTables, time_candidate: Callable[[nn.Module], tuple[float, ...]],
                     removed: Mapping[int, Sequence[int]] | None = None, check: bool = True,
                     work: CountedWork | None = None, tolerance: float = TOLERANCE, accept: float = ACCEPT,
                     max_attempts: int = MAX_ATTEMPTS,
                     progress: Callable[[str], None] | None = None) -> LatencyResult:
    """`model` pruned to `options.target_latency` as measured by `time_candidate` (see the module doc).

    `time_candidate(pruned)` returns a `PairTiming` (or its first fields) for the original and `pruned`
    timed interleaved (`PairTimer`);
    `tables`: the target's latency model of `model`. `criterion`, `removed`, `check`, `work`: as `pruning.prune`."""
    goal = options.target_latency
    assert isinstance(goal, LatencyGoal)  # AllocationOptions parses it
    latency = tables.model
    ratio = goal_ratio(goal, tables.original_ms)
    planning = dataclasses.replace(options, normalize=criterion.normalize_mode(options.normalize))
    original_ms = latency.predict({})
    budget = ratio * original_ms
    attempts: list[Attempt] = []
    plans: list[dict[int, list[int]]] = []
    known: list[Known] = []  # every budget tried: timed, or its plan timed already
    moves, floor_tried = 0, False
    stopped = None
    while len(attempts) < max_attempts:
        try:
            plan = allocate(graph, scores, planning, removed=removed, latency=LatencyBudget(latency, budget)).plan
        except LatencyUnreachable as exc:
            if floor_tried or not exc.closest_ms < exc.original_ms:
                if not attempts:
                    raise
                stopped = str(exc)
                break
            # the prediction cannot reach the budget, the runtime may: time the fastest plan predicted
            floor_tried, budget = True, exc.closest_ms * (1 + 1e-9)
            continue
        if plan in plans:  # the budget moved within one step of the staircase: move on, untimed
            moves += 1
            same = attempts[plans.index(plan)]
            known.append(Known(budget, same.predicted_ratio, same.ratio))
            following = _next_budget(known, ratio, original_ms, push=min(FIRST_PUSH * 2 ** (moves - 1), 0.9))
            if following is None or moves > MAX_MOVES:
                stopped = "the attempts on either side of the target are one plan apart" if _bracket(known, ratio) else \
                          "the plan stopped changing as the budget moved (every group at its floor, or the tables " \
                          "cannot tell the widths apart)"
                break
            budget = following
            continue
        timed = PairTiming(*time_candidate(pruned(model, graph, plan)))
        measured = timed.ratio if timed.ratio is not None else timed.after_ms / timed.before_ms
        predicted = latency.predict_plan(plan)
        attempt = Attempt(budget, predicted, timed.before_ms, timed.after_ms, measured,
                          predicted / original_ms if original_ms > 0 else 1.0)
        attempts.append(attempt)
        plans.append(plan)
        known.append(Known(budget, attempt.predicted_ratio, measured))
        if progress is not None:
            progress(f"latency attempt {len(attempts)}: {attempt.after_ms:.3g} ms vs the original's {attempt.before_ms:.3g} "
                     f"ms: {attempt.ratio:.3f} of it (target {ratio:.3f}; predicted {attempt.predicted_ratio:.3f}, "
                     f"{attempt.predicted_ms:.3g} ms)")
        if abs(attempt.ratio - ratio) <= tolerance:
            break
        following = _next_budget(known, ratio, original_ms)
        if following is None:
            stopped = "the attempts on either side of the target are one plan apart"
            break
        budget = following
    best = min(attempts, key=lambda a: abs(a.ratio - ratio))
    if stopped is None:
        stopped = f"{max_attempts} corrections did not come within {tolerance:g} of it (timing noise: a busy machine?)"
    if abs(best.ratio - ratio) > accept:
        raise UserError(f"--target-latency {goal.describe()} was not met: the closest pruned model measured "
                        f"{best.ratio:.3f} of the original's latency ({best.after_ms:.3g} vs {best.before_ms:.3g} ms), "
                        f"target {ratio:.3f}; {stopped}; nothing was written. Ask for less, lower --min-keep, or time "
                        "on a quieter machine")
    outcome = pruning.prune(model, graph, scores, input_shape, criterion=criterion, options=options, removed=removed,
                            check=check, work=work, latency=LatencyBudget(latency, best.budget_ms))
    return LatencyResult(outcome, goal, ratio, best, attempts)


class Known(NamedTuple):
    """A budget tried: the predicted and measured ratios of its plan (timed then, or before)."""

    budget_ms: float
    predicted: float
    measured: float


def _bracket(known: Sequence[Known], ratio: float) -> tuple[Known, Known] | None:
    """The largest budget known to measure faster than the target and the smallest known to measure
    slower (None: the target is not between two known budgets yet)."""
    below = [k for k in known if k.measured < ratio]
    above = [k for k in known if k.measured > ratio]
    if not below or not above:
        return None
    return max(below), min(above)


def _next_budget(known: Sequence[Known], ratio: float, original_ms: float, push: float | None = None) -> float | None:
    """The budget to try after the last of `known`: inside the bracket around the target by the
    secant through its ends; else, when the last budget gave a plan timed already, moved by the
    fraction `push`; else the time the last plan saved, as predicted, scaled by the saving asked
    over the saving measured (the prediction's range need not be the runtime's). None: no move
    would change anything."""
    bracket = _bracket(known, ratio)
    if bracket is not None:
        lo, hi = bracket
        if hi.budget_ms - lo.budget_ms <= 1e-6 * max(abs(hi.budget_ms), 1e-9) or hi.measured == lo.measured:
            return None
        t = (ratio - lo.measured) / (hi.measured - lo.measured)
        t = min(max(t, 0.1), 0.9)  # stay inside the bracket
        return lo.budget_ms + t * (hi.budget_ms - lo.budget_ms)
    last = known[-1]
    if push is not None:
        return last.budget_ms * (1 - push) if last.measured > ratio else last.budget_ms * (1 + push)
    if last.measured >= 1 or last.predicted >= 1:  # nothing saved to scale: in proportion to the budget
        return last.budget_ms * ratio / last.measured if last.measured > 0 else None
    predicted = 1 - (1 - ratio) * (1 - last.predicted) / (1 - last.measured)
    if last.measured < ratio:  # giving back: at most half of what the last plan saved
        predicted = min(predicted, (1 + last.predicted) / 2)
    return max(predicted, 0.0) * original_ms


def slower_warning(before_ms: float, after_ms: float, target: LatencyTarget, ratio: float | None = None,
                   low: float | None = None) -> str | None:
    """One line when the pruned model runs slower than the original on `target`, by more than timing
    noise: by more than `SLOWER` in the measured `ratio` when given, else in the medians, and, given
    the rounds' `low` ratio, in 9 rounds of 10 (a busy machine spreads equal models' rounds around
    1). None: it does not."""
    if (ratio if ratio is not None else after_ms / before_ms) <= SLOWER or after_ms <= before_ms:
        return None
    if low is not None and low <= 1:
        return None
    return (f"the pruned model is slower than the original on {target.runtime} ({target.device}, batch {target.batch}): "
            f"{after_ms:.3g} ms vs {before_ms:.3g} ms; prune with --target-latency to plan for this target, or "
            "--round-to auto for the widths its kernels favour")
