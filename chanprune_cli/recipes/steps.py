"""Steps the recipes share: checking options and outputs before the slow work, loading the model
and its input shape, evaluation/calibration loaders, seeding, and the lines they print on stderr.

Everything here raises `UserError` with the message the command line shows; nothing prints except
`say`/`warn`, which write one line to stderr (where progress and warnings go, so that stdout
carries only reports).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import LoadedCheckpoint, output_suffix
from ..checkpoint.pickled_model import check_pickled_output
from ..criteria.base import NEEDS_LABELS
from ..data import (
    ClassesArg,
    check_labels,
    fit_classes,
    make_loader,
    open_dataset,
    parse_floats,
    parse_shape,
    recorded_classes,
)
from ..errors import UserError
from ..models import ArchSpec, default_input_shape
from ..support.fsutil import check_output

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from ..prune.scoring import ResolvedCriterion

Shape = tuple[int, int, int]
ShapeArg = str | Sequence[int]  # "3,32,32" (as --input-shape) or (3, 32, 32)
FloatsArg = str | Sequence[float]  # "0.5,0.5,0.5" (as --mean/--std) or (0.5, 0.5, 0.5)


def say(text: str) -> None:
    """One progress line on stderr."""
    print(text, file=sys.stderr, flush=True)


def warn(text: str) -> None:
    """One `warning:` line on stderr."""
    say(f"warning: {text}")


# --------------------------------------------------------------------------------------------
# options and outputs, checked before any slow step


def parse_inputs(input_shape: ShapeArg | None, mean: FloatsArg | None,
                 std: FloatsArg | None) -> tuple[Shape | None, tuple[float, ...] | None, tuple[float, ...] | None]:
    """The model-input options parsed: (C, H, W) and the normalisation mean/std (None: not given)."""
    def text(value: str | Sequence[float]) -> str:
        # sequences go through the same parser as the command line, so they are checked alike
        return value if isinstance(value, str) else ",".join(str(v) for v in value)

    shape = parse_shape(text(input_shape)) if input_shape is not None else None
    mean_t = parse_floats(text(mean), name="mean") if mean is not None else None
    std_t = parse_floats(text(std), name="std") if std is not None else None
    return shape, mean_t, std_t


def parse_output(output: str | None) -> str | None:
    """`--output` checked (None: not given; see `measure.parse_task_output`)."""
    from ..measure import parse_task_output

    return parse_task_output(output) if output is not None else None


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
# the model


def load_model(checkpoint: str, arch: str | ArchSpec | None, arch_kwargs: str | dict | None,
               trust_pickle: bool) -> LoadedCheckpoint:
    # looked up at call time: tests count loads by replacing checkpoint.load_checkpoint
    from ..checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle)


def model_out_path(out: str | None, checkpoint: str, kind: str, loaded: LoadedCheckpoint) -> str:
    """Where a command writes its model: `out`, or CKPT-STEM.KIND next to the checkpoint with the
    suffix `checkpoint.save_model` writes for `loaded` (.pt for a whole pickled model). A pickled
    model cannot become a safetensors file, which fails here, before the slow steps."""
    suffix = output_suffix(loaded)
    if out is None:
        return str(Path(checkpoint).with_name(f"{Path(checkpoint).stem}.{kind}{suffix}"))
    if suffix == ".pt":
        check_pickled_output(out)
    return out


def resolve_input_shape(explicit: Shape | None, loaded: LoadedCheckpoint, data: str | None = None) -> Shape:
    """--input-shape, else the shape recorded in the checkpoint, else the architecture's default,
    else the size of the samples of `data` (checked on one forward pass)."""
    if explicit is not None:
        return explicit
    if loaded.input_shape is not None:
        return tuple(loaded.input_shape)  # type: ignore[return-value]
    shape = default_input_shape(loaded.arch)
    if shape is not None:
        return tuple(shape)  # type: ignore[return-value]
    if data is None:
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W (the channels and size of "
                        "the images it takes), or --data to take it from the data")
    return _data_input_shape(data, loaded.model)


def _data_input_shape(data: str, model: torch.nn.Module) -> Shape:
    """The (C, H, W) of `data`'s samples as stored (MNIST 1x28x28, an image folder's common size)."""
    from ..checkpoint.messages import first_line

    with warnings.catch_warnings():  # what is wrong with the data is said once, when it is opened for use
        warnings.simplefilter("ignore")
        shape: Shape = tuple(open_dataset(data).input_shape)  # type: ignore[assignment]
    try:
        _forward(model, shape)
    except Exception as exc:
        raise UserError(f"the model does not run on {'x'.join(map(str, shape))} inputs, the size of the samples of "
                        f"--data {data} ({first_line(exc)}); pass --input-shape C,H,W") from None
    return shape


def select_task_output(loaded: LoadedCheckpoint, explicit: str | None, input_shape: Shape) -> str | None:
    """The task output (`--output`, else the one the checkpoint records), set on the model for
    `measure.logits_of` and checked on one forward pass; None: the default rule."""
    from ..checkpoint.chanprune_format import resolve_task_output
    from ..measure import logits_of, set_task_output

    choice = resolve_task_output(loaded.meta, explicit)
    model = loaded.model
    set_task_output(model, choice)
    if choice is not None:
        logits_of(_forward(model, input_shape), model)
    return choice


def _forward(model: torch.nn.Module, input_shape: Shape) -> Any:
    """One eval-mode forward pass of a batch of zeros (the model's mode restored)."""
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *input_shape, device=param.device if param is not None else None))
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class Labels:
    """What labelled data must match: the model's number of outputs and, when known, their class
    names (`--classes`, else the names the checkpoint records)."""

    outputs: int | None
    classes: ClassesArg | None = None
    recorded: list[str] | None = None


def model_labels(loaded: LoadedCheckpoint, input_shape: Shape, classes: ClassesArg | None) -> Labels:
    """The `Labels` of a loaded model (one forward pass of zeros counts its outputs)."""
    from ..measure import logits_of

    out = logits_of(_forward(loaded.model, input_shape), loaded.model)
    outputs = int(out.shape[1]) if out.dim() == 2 else None  # not a classifier: nothing to match
    return Labels(outputs, classes, recorded_classes(loaded.meta))


def criterion_labels(resolved: ResolvedCriterion, loaded: LoadedCheckpoint, input_shape: Shape,
                     classes: ClassesArg | None) -> Labels | None:
    """The `Labels` calibration data must match when the criterion reads labels; None when it does
    not (unlabelled calibration data, e.g. one folder of images, is then fine)."""
    if resolved.criterion is None or resolved.criterion.requires(resolved.options) != NEEDS_LABELS:
        return None
    return model_labels(loaded, input_shape, classes)


def open_labelled(source: str, labels: Labels, *, input_shape: Shape, mean: tuple[float, ...] | None,
                  std: tuple[float, ...] | None, train: bool = False) -> Any:
    """A data set whose labels are the model's output indices (`data.fit_classes`); labels the model
    cannot output fail here, before any slow step."""
    dataset = open_dataset(source, input_shape=input_shape, mean=mean, std=std, train=train)
    fit_classes(dataset, labels.outputs, labels.classes, recorded=labels.recorded)
    if labels.outputs is not None:
        check_labels(dataset, labels.outputs)
    return dataset


def eval_loader(source: str, *, input_shape: Shape, mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                batch_size: int, workers: int, seed: int, max_batches: int | None = None,
                labels: Labels | None = None) -> DataLoader:
    """An evaluation loader; with `max_batches` it draws that many random batches (seeded). With
    `labels`, the data's classes are matched to the model's outputs (without: labels unused)."""
    # mean/std None: the source's own statistics (ImageNet for RGB images, see data.open_dataset).
    data: Any = source if labels is None else open_labelled(source, labels, input_shape=input_shape, mean=mean, std=std)
    return make_loader(data, batch_size=batch_size, workers=workers, seed=seed, shuffle=max_batches is not None,
                       max_batches=max_batches, train=False, input_shape=input_shape, mean=mean, std=std)


def calibration_loader(source: str | None, *, input_shape: Shape, mean: tuple[float, ...] | None,
                       std: tuple[float, ...] | None, batch_size: int, workers: int, seed: int,
                       max_batches: int | None, labels: Labels | None = None) -> DataLoader | None:
    """The calibration batches of --data (None without data); `labels` when the criterion reads them."""
    if source is None:
        return None
    return eval_loader(source, input_shape=input_shape, mean=mean, std=std, batch_size=batch_size, workers=workers,
                       seed=seed, max_batches=max_batches, labels=labels)
