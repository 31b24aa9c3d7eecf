"""Steps the recipes share besides opening the model (opening.py): what every recipe's entry does
(`recipe_entry`), the data options and loaders, checking outputs before the slow work, seeding,
and the lines recipes print on stderr.

Everything here raises `UserError` with the message the command line shows; nothing prints except
`say`/`warn`, which write one line to stderr (where progress and warnings go, so that stdout
carries only reports).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from ..data import ClassesArg, check_labels, fit_classes, make_loader, open_dataset
from ..errors import UserError
from ..support.fsutil import check_output
from ..train.process import threads

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

__all__ = ["DataOptions", "OptionsChecked", "checking_options"]

Entry = TypeVar("Entry", bound=Callable[..., Any])
_SAID: ContextVar[list[str] | None] = ContextVar("chanprune_said_warnings", default=None)
_CHECKING: ContextVar[bool] = ContextVar("chanprune_checking_options", default=False)


def say(text: str) -> None:
    """One progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """One `warning:` line on stderr (and in the JSON report of a command that lists its warnings)."""
    say(f"warning: {text}")
    said = _SAID.get()
    if said is not None and text not in said:
        said.append(text)


# --------------------------------------------------------------------------------------------
# a recipe's entry


class OptionsChecked(Exception):
    """What a recipe raises at its entry under `checking_options()`: its options were made and checked."""


@contextmanager
def checking_options() -> Iterator[None]:
    """Inside, a recipe stops at its entry with `OptionsChecked` instead of running: a command run
    in this context checks every value it was given (its options objects check theirs when made)
    and does nothing else. `chanprune run` checks every stage so before the first one runs."""
    token = _CHECKING.set(True)
    try:
        yield
    finally:
        _CHECKING.reset(token)


def recipe_entry(entry: Entry) -> Entry:
    """What every recipe's entry (`entry(target, options, ...)`) does around its work: stop under
    `checking_options`; run on the CPU threads `options.model.threads` asks for (torch's count
    restored afterwards); and add the warnings said meanwhile (`warn` lines and chanprune's Python
    warnings, e.g. about the data) to the result's `warnings` list, for a result that has one."""

    @functools.wraps(entry)
    def run(target: Any, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        if _CHECKING.get():
            raise OptionsChecked
        with threads(getattr(getattr(options, "model", None), "threads", None)), collected_warnings() as said:
            result = entry(target, options, *args, **kwargs)
        listed = getattr(result, "warnings", None)
        if isinstance(listed, list):
            listed.extend(text for text in said if text not in listed)
        return result

    return run  # type: ignore[return-value]


@contextmanager
def collected_warnings() -> Iterator[list[str]]:
    """The warnings said inside, in order, once each: `warn` lines and chanprune's own Python
    warnings (shown as usual)."""
    said: list[str] = []
    token = _SAID.set(said)
    try:
        with warnings.catch_warnings():  # restores the handler below afterwards
            show = warnings.showwarning

            def noted(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
                text = " ".join(str(message).split())
                if category.__module__.startswith("chanprune_cli") and text not in said:
                    said.append(text)
                show(message, category, *args, **kwargs)

            warnings.showwarning = noted
            yield said
    finally:
        _SAID.reset(token)


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


# Fewer images than this tell too little about a model's accuracy to call it chance.
CHANCE_MIN_IMAGES = 100


def chance_warning(top1: float, images: int, classes: int | None, data: str) -> str | None:
    """The warning for a top-1 (percent, on `images` images of `data`) no better than guessing among
    `classes` classes: the model does not recognise this data (other data, another normalisation,
    other classes) or is untrained. None when the accuracy says nothing of the kind."""
    if classes is None or classes < 2 or images < CHANCE_MIN_IMAGES:
        return None
    chance = 100.0 / classes
    if top1 > min(1.5 * chance, chance + 10.0):
        return None
    return (f"top-1 {top1:.2f} % on {images:,} images of {data} is chance level ({chance:.3g} % for {classes} classes): "
            "the model does not recognise this data; check that it is the model's task, with its --mean/--std and "
            "--classes")


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
