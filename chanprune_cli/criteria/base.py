"""The criterion interface and registry.

A criterion turns a model and its channel graph (plus calibration data when it needs any) into one
score vector per channel group: higher means more important, so the lowest are removed first.

A criterion is one file behind one interface: a `Criterion` subclass that implements
`compute(run)`, registered with its name, what it needs, its options with their defaults and a
one-line summary (`@register("taylor", needs=NEEDS_LABELS, defaults=DEFAULTS, summary=...)`). The
public `Criterion.score(model, graph, data, device, *, seed, **options)` parses the options against
the defaults once (unknown keys and bad values are UserErrors) and hands `compute` one `ScoringRun`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from ..data import open_dataset
from ..engine.graph import ChannelGraph, ChannelGroup, Slot
from ..engine.layer_rules import PRODUCER_KINDS, rule_for
from ..engine.scores import Scores, WeightedScores, channel_scales, group_weights  # noqa: F401  (criteria use them from here)
from ..errors import UserError
from .gates import parse_options

Batch = tuple[torch.Tensor, torch.Tensor]
NEEDS_WEIGHTS, NEEDS_DATA, NEEDS_LABELS = "weights", "data", "labels"
WEIGHTS_ONLY = "no pass over data"


@dataclass(frozen=True)
class ScoringRun:
    """One scoring call, as a criterion's `compute` reads it."""

    model: nn.Module
    graph: ChannelGraph
    data: Iterable[Batch] | None  # calibration batches; None when the command has no --data
    device: torch.device
    seed: int
    options: Mapping[str, Any]  # every option of the criterion, parsed against its defaults (read-only)


class Criterion(ABC):
    """One way of scoring channels. Subclasses implement `compute`; `register` sets the class
    attributes."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[str] = NEEDS_WEIGHTS  # weights | data (unlabelled) | labels
    defaults: ClassVar[dict[str, Any]] = {}  # option -> default (`--criterion-opt KEY=VALUE`)
    cost: ClassVar[str] = WEIGHTS_ONLY  # the data budget and the passes it costs (`--list-criteria`)

    def in_loss_units(self, options: dict[str, Any] | None = None) -> bool:
        """Whether the scores estimate the loss change of removing a channel in the same units in
        every group. Such scores compare across layers as they are: `--target-flops` then ranks them
        without dividing each group by its mean (`--normalize auto`), which lets a residual stream,
        whose channels each feed many layers, keep what it is worth."""
        return False

    def requires(self, options: dict[str, Any] | None = None) -> str:
        """What this criterion needs with these options (e.g. sensitivity needs labels only with
        the Fisher Hessian)."""
        return self.needs

    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device | str, *, seed: int = 0, **options: Any) -> Scores:
        """Scores for every prunable group of `graph` (pinned classes may get any value)."""
        parsed = parse_options(self.name, options, self.defaults)
        return self.compute(ScoringRun(model, graph, data, torch.device(device), seed, MappingProxyType(parsed)))

    @abstractmethod
    def compute(self, run: ScoringRun) -> Scores:
        """`score`'s work, on options already parsed."""


_REGISTRY: dict[str, type[Criterion]] = {}
C = TypeVar("C", bound=Criterion)


def register(name: str, *, summary: str, needs: str = NEEDS_WEIGHTS,
             defaults: dict[str, Any] | None = None, cost: str = WEIGHTS_ONLY) -> Callable[[type[C]], type[C]]:
    """Class decorator: the criterion `--criterion NAME` picks, what it needs (weights, data or
    labels), its options with their defaults (`--criterion-opt KEY=VALUE`), the summary and the
    budget with what it costs in passes over the calibration data that `score --list-criteria` shows."""

    def add(cls: type[C]) -> type[C]:
        cls.name, cls.summary, cls.needs, cls.defaults = name, summary, needs, defaults if defaults is not None else {}
        cls.cost = cost
        _REGISTRY[name] = cls
        return cls

    return add


def available() -> dict[str, type[Criterion]]:
    from . import _load_all  # noqa: F401  (importing registers every criterion)

    return dict(sorted(_REGISTRY.items()))


def get_criterion(name: str) -> Criterion:
    registry = available()
    if name not in registry:
        raise UserError(f"unknown criterion {name!r}; choose one of: {', '.join(registry)}")
    return registry[name]()


def parse_criterion_opts(criterion: Criterion, options: Mapping[str, Any] | Iterable[str] | str | None) -> dict[str, Any]:
    """The criterion's typed options from `KEY=VALUE` strings (repeatable `--criterion-opt`) or a
    {key: value} mapping (from Python).

    Unknown keys, malformed pairs and values that do not parse as the default's type (int, float,
    bool, str) are UserErrors naming the valid keys."""
    raw: dict[str, Any] = {}
    if isinstance(options, Mapping):
        raw = {str(key).strip(): value for key, value in options.items()}
    for pair in () if isinstance(options, Mapping) else [options] if isinstance(options, str) else options or ():
        key, sep, value = str(pair).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--criterion-opt {pair!r}: expected KEY=VALUE; {option_help(criterion)}")
        raw[key] = value.strip()
    unknown = sorted(set(raw) - set(criterion.defaults))
    if unknown:
        raise UserError(f"criterion {criterion.name!r} has no option {', '.join(map(repr, unknown))}; {option_help(criterion)}")
    parsed = parse_options(criterion.name, raw, criterion.defaults)
    return {key: parsed[key] for key in raw}


def option_help(criterion: Criterion) -> str:
    if not criterion.defaults:
        return f"{criterion.name!r} takes no options"
    return f"valid keys for {criterion.name!r}: " + ", ".join(f"{k} (default {_shown(v)})" for k, v in criterion.defaults.items())


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def criteria_table() -> list[tuple[str, str, str, str, str]]:
    """(name, needs, options with defaults, summary, budget and cost) for every registered criterion."""
    rows = []
    for name, cls in available().items():
        opts = " ".join(f"{k}={_shown(v)}" for k, v in cls.defaults.items()) or "-"
        rows.append((name, cls.needs, opts, cls.summary, cls.cost))
    return rows


def check_requirements(criterion: Criterion, has_data: bool, *, options: dict[str, Any] | None = None,
                       data_source: str | None = None) -> None:
    """A criterion that needs data (or labels) fails early, naming itself and the fix. The fix is
    always real data of the task: scores on random inputs (`synthetic:`) rank channels by how they
    respond to noise, and random labels make a loss meaningless.

    `data_source` (a `--data` string) is checked for labels when the criterion needs them: a data
    set with a single class (an ImageFolder with one folder, `synthetic:CxHxW:1`) is unlabelled
    calibration data, and a labelled criterion's loss would be meaningless on it."""
    needs = criterion.requires(options)
    no_labels = "; or use --criterion-opt hessian=activation, which needs images but no labels" if "hessian" in criterion.defaults else ""
    if needs != NEEDS_WEIGHTS and not has_data:
        if needs == NEEDS_LABELS:
            raise UserError(f"criterion {criterion.name!r} needs labelled calibration data; pass --data with labelled "
                            f"images of the model's task (an ImageFolder with one folder per class, a .tar.gz of one, "
                            f"MNIST IDX files){no_labels}")
        raise UserError(f"criterion {criterion.name!r} needs calibration data; pass --data with images of the model's "
                        "task (an ImageFolder, a .tar.gz of one; labels are not used)")
    if needs == NEEDS_LABELS and data_source is not None:
        classes = data_classes(data_source)
        if classes is not None and classes < 2:
            fix = ("pass labelled images of the model's task (an ImageFolder with one folder per class)"
                   + no_labels
                   + "; label-free criteria: " + ", ".join(n for n, c in available().items() if c.needs != NEEDS_LABELS))
            raise UserError(f"criterion {criterion.name!r} needs labelled data but {data_source} has "
                            f"{'no' if classes == 0 else 'a single'} class (unlabelled); {fix}")


def data_classes(source: str) -> int | None:
    """How many classes a `--data` source has, or None when that cannot be told cheaply."""
    try:
        dataset = open_dataset(source)
    except Exception:  # noqa: BLE001 -- the real load (with --input-shape etc.) reports problems in context
        return None
    classes = getattr(dataset, "num_classes", None)
    if classes is None:
        targets = getattr(dataset, "targets", None)
        classes = len(set(targets)) if targets is not None else None
    return int(classes) if classes is not None else None


def producer_rows(model: nn.Module, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """The weight rows (flattened filters) that produce one channel class, per producer module
    (the layer rule says which: a grouped conv's channel k in every group, a depthwise conv's
    `multiplier` rows, a transposed conv's column)."""
    modules = dict(model.named_modules())
    rows: list[tuple[str, torch.Tensor]] = []
    for name, kind, index in slots:
        rule = rule_for(modules[name])
        row = rule.producer_rows(modules[name], kind, index) if rule is not None and kind in PRODUCER_KINDS else None
        if row is not None:
            rows.append((name, row))
    return rows


def consumer_columns(model: nn.Module, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """The weight columns that read one channel class, per consumer module (the "in" slots)."""
    modules = dict(model.named_modules())
    cols: list[tuple[str, torch.Tensor]] = []
    for name, kind, index in slots:
        rule = rule_for(modules[name])
        col = rule.consumer_columns(modules[name], index) if rule is not None and kind == "in" else None
        if col is not None:
            cols.append((name, col))
    return cols


def producer_filter_means(model: nn.Module, group: ChannelGroup,
                          statistic: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per class of `group`: a statistic of its filters among their layer's, averaged over the
    class's producers. `statistic(filters)` gets one producer module's filters of the group
    ([classes it produces, weights], float64, `producer_rows`) and returns one value per filter."""
    per_module: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
    for ci, slots in enumerate(group.classes):
        for name, row in producer_rows(model, slots):
            per_module[name].append((ci, row.double()))
    total = torch.zeros(group.channels, dtype=torch.float64)
    count = torch.zeros(group.channels, dtype=torch.float64)
    for entries in per_module.values():
        idx = torch.tensor([ci for ci, _ in entries])
        total.index_add_(0, idx, statistic(torch.stack([row for _, row in entries])))
        count.index_add_(0, idx, torch.ones(len(entries), dtype=torch.float64))
    return total / count.clamp_min(1)


def per_class(group: ChannelGroup, fn: Any) -> torch.Tensor:
    """Apply `fn(slots) -> float` to every class of a group."""
    return torch.tensor([float(fn(slots)) for slots in group.classes], dtype=torch.float64)
