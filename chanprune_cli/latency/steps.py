"""What `chanprune prune` does about latency, step by step: check the target before anything slow,
build its tables, prune to a latency target or time any other plan against the original ("never
slower"), and the record reports show (`latency_record`, `staircases`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..deploy.runtimes import LatencyTarget
from ..engine.graph import ChannelGraph
from ..engine.latency import width_curve
from ..errors import UserError
from .correction import LatencyResult
from .table import LatencyTables, build_latency_model

__all__ = ["STAIRCASES", "build_tables", "check_batch", "checked_target", "latency_record", "staircases"]

STAIRCASES = 6  # groups drawn by `prune --plot`


def checked_target(target: LatencyTarget, device: torch.device) -> LatencyTarget:
    """`target` on the command's device, checked (runtime installed, device it runs on)."""
    resolved = dataclasses.replace(target, device=str(device))
    resolved.check()
    return resolved


def check_batch(model: nn.Module, input_shape: Sequence[int], batch: int) -> None:
    """One forward at the latency batch size: a model that cannot take it fails here, in one line."""
    param = next(model.parameters(), None)
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0))
    if param is not None:
        x = x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else torch.float32)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001  (a model rejects a batch size with any exception type)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"--latency-batch {batch}: the model cannot run a batch of {batch} ({first}); "
                        "pick a batch size it takes") from None


def build_tables(model: nn.Module, graph: ChannelGraph, input_shape: Sequence[int], target: LatencyTarget,
                 say: Callable[[str], None]) -> LatencyTables:
    """The target's latency tables of `model`, with a line saying what was measured and what was cached."""
    tables = build_latency_model(model, graph, input_shape, target)
    say(f"latency tables: {tables.layers} layers on {target.runtime} ({target.device}, batch {target.batch}), "
        f"{tables.measured} timed, {tables.cached} from the cache, in {tables.seconds:.1f} s; the original runs in "
        f"{tables.original_ms:.3g} ms")
    return tables


def latency_record(target: LatencyTarget, before_ms: float, after_ms: float, ratio: float | None, *,
                   tables: LatencyTables | None,
                   plan: Mapping[int, Sequence[int]], result: LatencyResult | None) -> dict[str, Any]:
    """The prune report's `latency`: where it was timed, the original and pruned medians (interleaved)
    and the measured ratio (`correction.PairTiming`), and, with tables, the prediction for the plan
    (in ms as the tables' whole-model timing saw the machine, and as a fraction of the original's
    prediction: what compares with the measured ratio when the machine's load has changed since);
    with a latency target, the attempts."""
    predicted = tables.model.predict_plan(plan) if tables is not None else None
    record: dict[str, Any] = {**target.to_json(), "before_ms": before_ms, "after_ms": after_ms,
                              "ratio": ratio, "predicted_ms": predicted}
    if tables is not None:
        original = tables.model.predict({})
        record["predicted_ratio"] = float(predicted or 0.0) / original if original > 0 else None
        record["tables"] = {"layers": tables.layers, "timed": tables.measured, "cached": tables.cached,
                            "seconds": round(tables.seconds, 3), "cache": tables.cache, "without_table": tables.rest,
                            "original_ms": tables.original_ms, "thinned_ms": tables.thinned_ms,
                            "scale": tables.model.scale}
    if result is not None:
        record["target_ratio"] = result.goal_ratio
        record["attempts"] = [a.to_json() for a in result.attempts]
    return record


def staircases(tables: LatencyTables, plan: Mapping[int, Sequence[int]], count: int = STAIRCASES) -> list[dict[str, Any]]:
    """Latency vs kept width of the `count` groups whose layers cost most, with the plan's width of each."""
    model = tables.model
    curves = []
    for group in model.graph.prunable_groups():
        widths, ms = width_curve(model, plan, group.id)
        curves.append({"group": group.name, "widths": widths, "ms": ms,
                       "kept": group.channels - len(plan.get(group.id, ()))})
    curves.sort(key=lambda c: -c["ms"][0])
    return curves[:count]
