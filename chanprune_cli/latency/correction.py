"""Pruning to a measured latency: plan to a predicted budget, time the pruned candidate against the
original, correct the budget, until the measured ratio meets the target.

The first budget is the target ratio of the original's predicted latency. Each attempt allocates
to the budget (`engine.allocate`, `target_latency`), removes the planned channels from a copy
(unverified: it is only timed) and times it against the original, interleaved (A, B, A, B, ...),
and the ratio is the median of the round-by-round ratios: two runs side by side share the load of
the moment, so the ratio holds on a machine whose load changes. A measured ratio off the
target by more than `tolerance` moves the budget: in proportion at first, then by the secant
through the attempts on either side of the target (removing more when the candidate was too slow,
giving back when it was faster than asked). At most `max_attempts` attempts; the one closest to
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
from .table import LatencyTables, pruned

__all__ = ["ACCEPT", "CHECK_TIMING", "TOLERANCE", "Attempt", "LatencyResult", "PairTimer", "PairTiming", "prune_to_latency",
           "slower_warning"]

TOLERANCE = 0.02  # a measured ratio this close to the target ends the corrections
ACCEPT = 0.05  # the closest attempt must be at least this close, else the target is not met
MAX_ATTEMPTS = 6
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
        return PairTiming(median_ms(before), median_ms(after), statistics.median(b / a for a, b in zip(before, after)))


class PairTiming(NamedTuple):
    """An original and a candidate timed side by side: medians (ms) and the candidate's latency as a
    fraction of the original's (the median of the round-by-round ratios; None: after / before)."""

    before_ms: float
    after_ms: float
    ratio: float | None = None


@dataclass
class Attempt:
    """One timed candidate: the budget it was planned to, its prediction, the medians measured and
    the measured ratio (`PairTiming`)."""

    budget_ms: float
    predicted_ms: float
    before_ms: float
    after_ms: float
    ratio: float

    def to_json(self) -> dict[str, float]:
        return {"budget_ms": self.budget_ms, "predicted_ms": self.predicted_ms, "before_ms": self.before_ms,
                "after_ms": self.after_ms, "ratio": self.ratio}


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
                     tolerance: float = TOLERANCE, accept: float = ACCEPT, max_attempts: int = MAX_ATTEMPTS,
                     progress: Callable[[str], None] | None = None) -> LatencyResult:
    """`model` pruned to `options.target_latency` as measured by `time_candidate` (see the module doc).

    `time_candidate(pruned)` returns a `PairTiming` (or its first fields) for the original and `pruned`
    timed interleaved (`PairTimer`);
    `tables`: the target's latency model of `model`. `criterion`, `removed`, `check`: as `pruning.prune`."""
    goal = options.target_latency
    assert isinstance(goal, LatencyGoal)  # AllocationOptions parses it
    latency = tables.model
    ratio = goal_ratio(goal, tables.original_ms)
    planning = dataclasses.replace(options, normalize=criterion.normalize_mode(options.normalize))
    budget, step, repeats = ratio * latency.predict({}), 0.0, 0
    attempts: list[Attempt] = []
    plans: list[dict[int, list[int]]] = []
    stopped = f"{max_attempts} corrections did not come within {tolerance:g} of it (timing noise: a busy machine?)"
    for _ in range(max_attempts):
        try:
            plan = allocate(graph, scores, planning, removed=removed, latency=LatencyBudget(latency, budget)).plan
        except LatencyUnreachable as exc:
            if not attempts:
                raise
            stopped = str(exc)
            break
        if plan in plans:  # the budget moved within one step of the staircase: move it as far again
            repeats += 1
            if repeats > 2 or not step:
                stopped = "the plan stopped changing as the budget moved (every group at its floor, or the tables " \
                          "cannot tell the widths apart)"
                break
            budget += step
            continue
        repeats = 0
        timed = PairTiming(*time_candidate(pruned(model, graph, plan)))
        measured = timed.ratio if timed.ratio is not None else timed.after_ms / timed.before_ms
        attempt = Attempt(budget, latency.predict_plan(plan), timed.before_ms, timed.after_ms, measured)
        attempts.append(attempt)
        plans.append(plan)
        if progress is not None:
            progress(f"latency attempt {len(attempts)}: {attempt.after_ms:.3g} ms vs the original's {attempt.before_ms:.3g} "
                     f"ms: {attempt.ratio:.3f} of it (target {ratio:.3f}; predicted {attempt.predicted_ms:.3g} ms)")
        if abs(attempt.ratio - ratio) <= tolerance:
            break
        following = _next_budget(attempts, ratio, budget)
        if following is None:
            stopped = "the attempts on either side of the target are one plan apart"
            break
        budget, step = following, following - budget
    best = min(attempts, key=lambda a: abs(a.ratio - ratio))
    if abs(best.ratio - ratio) > accept:
        raise UserError(f"--target-latency {goal.describe()} was not met: the closest pruned model measured "
                        f"{best.ratio:.3f} of the original's latency ({best.after_ms:.3g} vs {best.before_ms:.3g} ms), "
                        f"target {ratio:.3f}; {stopped}; nothing was written. Ask for less, lower --min-keep, or time "
                        "on a quieter machine")
    outcome = pruning.prune(model, graph, scores, input_shape, criterion=criterion, options=options, removed=removed,
                            check=check, latency=LatencyBudget(latency, best.budget_ms))
    return LatencyResult(outcome, goal, ratio, best, attempts)


def _next_budget(attempts: Sequence[Attempt], ratio: float, budget: float) -> float | None:
    """The budget to try next: between the closest attempts on either side of the target by their
    secant, else scaled by target / measured (None: no move would change anything)."""
    below = [a for a in attempts if a.ratio < ratio]
    above = [a for a in attempts if a.ratio > ratio]
    if below and above:
        lo = max(below, key=lambda a: a.ratio)  # the closest on either side
        hi = min(above, key=lambda a: a.ratio)
        if hi.budget_ms != lo.budget_ms and hi.ratio != lo.ratio:
            t = (ratio - lo.ratio) / (hi.ratio - lo.ratio)
            t = min(max(t, 0.1), 0.9)  # stay inside the bracket
            return lo.budget_ms + t * (hi.budget_ms - lo.budget_ms)
        return None
    last = attempts[-1]
    if last.ratio <= 0:
        return None
    return budget * ratio / last.ratio


def slower_warning(before_ms: float, after_ms: float, target: LatencyTarget, ratio: float | None = None) -> str | None:
    """One line when the pruned model runs slower than the original on `target`, by more than timing
    noise (`SLOWER`): by the measured `ratio` when given, else by the medians (None: it does not)."""
    if (ratio if ratio is not None else after_ms / before_ms) <= SLOWER or after_ms <= before_ms:
        return None
    return (f"the pruned model is slower than the original on {target.runtime} ({target.device}, batch {target.batch}): "
            f"{after_ms:.3g} ms vs {before_ms:.3g} ms; prune with --target-latency to plan for this target, or "
            "--round-to auto for the widths its kernels favour")
