"""Steps the recipes share besides opening the model (opening.py): the data options and loaders,
checking outputs before the slow work, seeding, and the lines recipes print on stderr.

Everything here raises `UserError` with the message the command line shows; nothing prints except
`say`/`warn`, which write one line to stderr (where progress and warnings go, so that stdout
carries only reports).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..data import ClassesArg, check_labels, fit_classes, make_loader, open_dataset
from ..errors import UserError
from ..support.fsutil import check_output

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

__all__ = ["DataOptions"]


def say(text: str) -> None:
    """One progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """One `warning:` line on stderr."""
    say(f"warning: {text}")


@dataclass(frozen=True)
class DataOptions:
    """The data a command reads in batches; the names are the flags'. `data`: any --data form (None:
    no data); `seed` also seeds everything else random the command does; `calib_batches`: at most
    that many batches, drawn at random with `seed` (None: all)."""

    data: str | None = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    calib_batches: int | None = None

    def __post_init__(self) -> None:
        for name, value, least in (("--batch-size", self.batch_size, 1), ("--workers", self.workers, 0),
                                   ("--calib-batches", self.calib_batches, 1)):
            if value is not None and value < least:
                raise UserError(f"{name} must be at least {least}, got {value}")


# --------------------------------------------------------------------------------------------
# outputs, checked before any slow step


def check_json_report(path: str | None, force: bool) -> None:
    """Fail before any long computation when the caller's JSON report (`--json`) could not be written."""
    if path is not None and path != "-":
        check_output(path, force)


def check_distinct_outputs(*options: tuple[str, str | None]) -> None:
    """Two output options naming one file would silently overwrite one result with the other."""
    seen: dict[str, str] = {}
    for option, path in options:
        if path is None or path == "-":
            continue
        key = os.path.normcase(os.path.realpath(path))
        if key in seen:
            raise UserError(f"{seen[key]} and {option} both name {path}; give each output its own file")
        seen[key] = option


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Labels:
    """What labelled data must match: the model's number of outputs and, when known, their class
    names (`--classes`, else the names the checkpoint records)."""

    outputs: int | None
    classes: ClassesArg | None = None
    recorded: list[str] | None = None


def open_labelled(source: str, labels: Labels, *, input_shape: tuple[int, int, int], mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None, train: bool = False) -> Any:
    """A data set whose labels are the model's output indices (`data.fit_classes`); labels the model
    cannot output fail here, before any slow step."""
    dataset = open_dataset(source, input_shape=input_shape, mean=mean, std=std, train=train)
    fit_classes(dataset, labels.outputs, labels.classes, recorded=labels.recorded)
    if labels.outputs is not None:
        check_labels(dataset, labels.outputs)
    return dataset


def eval_loader(source: str, *, input_shape: tuple[int, int, int], mean: tuple[float, ...] | None,
                std: tuple[float, ...] | None, batch_size: int, workers: int, seed: int,
                max_batches: int | None = None, labels: Labels | None = None) -> DataLoader:
    """An evaluation loader; with `max_batches` it draws that many random batches (seeded). With
    `labels`, the data's classes are matched to the model's outputs (without: labels unused)."""
    # mean/std None: the source's own statistics (ImageNet for RGB images, see data.open_dataset).
    data: Any = source if labels is None else open_labelled(source, labels, input_shape=input_shape, mean=mean, std=std)
    return make_loader(data, batch_size=batch_size, workers=workers, seed=seed, shuffle=max_batches is not None,
                       max_batches=max_batches, train=False, input_shape=input_shape, mean=mean, std=std)
