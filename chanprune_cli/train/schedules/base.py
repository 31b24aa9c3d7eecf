"""What every pruning schedule shares (the target, the allocation rules, the physical removal) and
the registry behind `--schedule NAME`.

A schedule registers itself (`register_schedule`) when its module is imported; the package imports
every module, so `make_schedule` and `schedule_names` see all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ...engine.allocate import AllocationOptions, allocate
from ...engine.graph import build_graph
from ...errors import UserError
from ...prune.pruning import plan_record, pruned_copy
from ..hooks import Hook
from ..trainer import Trainer


class PruningSchedule(Hook):
    """Shared parts: the target, the allocation rules, and the final physical removal."""

    criterion = "schedule"
    # The `make_schedule` options this schedule takes besides the target, the allocation rules,
    # `interval` and `until` (the others belong to other schedules).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, input_shape: Sequence[int], ratio: float | None = None, target_flops: float | None = None,
                 interval: int | None = None, until: float = 1.0, min_keep: float = 0.1, round_to: int = 1,
                 ignore: Sequence[str] = ()) -> None:
        if (ratio is None) == (target_flops is None):
            raise UserError(f"--schedule {self.name} needs exactly one of --ratio or --target-flops")
        for label, value in (("--ratio", ratio), ("--target-flops", target_flops)):
            if value is not None and not 0 < value < 1:
                raise UserError(f"{label} must be between 0 and 1 (exclusive), got {value:g}")
        if interval is not None and interval < 1:
            raise UserError(f"--prune-every must be at least 1 step, got {interval}")
        if not 0 < until <= 1:
            raise UserError(f"--prune-until must be in (0, 1], got {until:g}")
        self.input_shape = tuple(input_shape)
        self.ratio, self.target_flops = ratio, target_flops
        self.target = ratio if ratio is not None else target_flops
        self.interval_opt, self.until = interval, until
        self.min_keep, self.round_to, self.ignore = min_keep, round_to, tuple(ignore)
        self.graph: Any = None
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.verify_result: dict[str, Any] | None = None

    @property
    def final_architecture(self) -> bool:  # type: ignore[override]
        return self.done

    def _allocate(self, scores: Mapping[int, torch.Tensor], amount: float) -> Any:
        target = {"ratio": amount} if self.ratio is not None else {"target_flops": amount}
        return allocate(self.graph, scores, AllocationOptions(**target, min_keep=self.min_keep, round_to=self.round_to))

    def _build_graph(self, model: nn.Module) -> None:
        self.graph = build_graph(model, self.input_shape, ignore=self.ignore)
        if not self.graph.prunable_groups():
            raise UserError("this model has no prunable channel group (see `chanprune analyze` for the reasons)")

    def _remove(self, trainer: Trainer, allocation: Any, *, carry_momentum: bool = True) -> None:
        """Remove `allocation.plan` physically, verified against the masked model, and continue
        training the smaller model (with the surviving weights' momentum unless `carry_momentum`
        is False: then the optimizer starts fresh)."""
        plan = allocation.plan
        pruned, result = pruned_copy(trainer.model, self.graph, plan, self.input_shape, schedule=self.name)
        assert result is not None
        self.verify_result = {"max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance, "passed": result.passed}
        self.records.append(plan_record(self.graph, allocation, self.criterion))
        if carry_momentum:
            trainer.replace_model(pruned, graph=self.graph, plan=plan)
        else:
            trainer.replace_model(pruned)

    def plans(self) -> list[dict[str, Any]]:
        return list(self.records)


_REGISTRY: dict[str, tuple[type[PruningSchedule], dict[str, Any]]] = {}


def register_schedule(name: str, cls: type[PruningSchedule], **preset: Any) -> None:
    """Make `--schedule NAME` build `cls(**preset, ...)` (one class may serve several names)."""
    _REGISTRY[name] = (cls, preset)


def schedule_names() -> tuple[str, ...]:
    """Every `--schedule` choice: "none", then the schedules in the order they registered."""
    return ("none", *_REGISTRY)


def make_schedule(name: str, *, input_shape: Sequence[int], ratio: float | None, target_flops: float | None,
                  interval: int | None, until: float | None, min_keep: float | None, round_to: int,
                  ignore: Sequence[str], seed: int, drop_prob: float = 0.1, rounds: int = 4,
                  lam: float = 5e-3) -> Hook | None:
    """The hook for `--schedule NAME` (None for "none"). `until` and `min_keep` left None take the
    schedule's own defaults; `seed`, `drop_prob`, `rounds` and `lam` reach the schedules that take them."""
    if name not in schedule_names():
        raise UserError(f"unknown --schedule {name!r}; choose one of: {', '.join(schedule_names())}")
    if name == "none":
        if ratio is not None or target_flops is not None:
            *others, last = _REGISTRY
            raise UserError(f"--ratio/--target-flops need a pruning --schedule ({', '.join(others)} or {last}); to prune "
                            "before fine-tuning use `chanprune prune`")
        return None
    cls, preset = _REGISTRY[name]
    given = {"until": until, "min_keep": min_keep}
    options = {"seed": seed, "drop_prob": drop_prob, "rounds": rounds, "lam": lam}
    return cls(**preset, input_shape=input_shape, ratio=ratio, target_flops=target_flops, interval=interval,
               round_to=round_to, ignore=ignore, **{k: v for k, v in given.items() if v is not None},
               **{k: v for k, v in options.items() if k in cls.options})
