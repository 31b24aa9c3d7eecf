"""Where a model comes from and what it takes (`ModelOptions`, the options every command shares),
and the one step every recipe opens its checkpoint with (`open_model`): load → input shape →
normalisation → task output → NaN/Inf weights refused.

The result, `OpenedModel`, also opens data the way the model takes it (input shape, normalisation,
its classes), so the recipes never pass those around one by one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import LoadedCheckpoint, output_suffix, refuse_nonfinite
from ..checkpoint.chanprune_format import resolve_normalization, resolve_task_output
from ..checkpoint.pickled_model import check_pickled_output
from ..criteria.base import NEEDS_LABELS
from ..data import ClassesArg, open_dataset, parse_classes, parse_floats, parse_shape, recorded_classes
from ..errors import UserError
from ..measure import logits_of, parse_task_output, set_task_output
from ..models import ArchSpec, builtin_archs, default_input_shape
from .steps import DataOptions, Labels, eval_loader, warn

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import DataLoader

    from ..prune.scoring import ResolvedCriterion

__all__ = ["ModelOptions"]

Shape = tuple[int, ...]  # (C, H, W) for images, (C, L) or (L,) for 1-D signals
Floats = tuple[float, ...]
ShapeArg = str | Sequence[int]  # "3,32,32" or "1,1024" (as --input-shape) or (3, 32, 32)
FloatsArg = str | Sequence[float]  # "0.5,0.5,0.5" (as --mean/--std) or (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class ModelOptions:
    """Where a model comes from and what it takes; the names are the flags' (`output`: --output).

    Values may be given as the command line writes them ("3,32,32", "0.5,0.5,0.5", "cat,dog" or
    "@names.txt"): they are parsed when the options are made (`input_shape` becomes (C, H, W),
    `mean`/`std`/`classes` tuples), so a bad one fails here, before any file is read; `arch` and
    `arch_kwargs` are checked when the checkpoint is loaded. None: what the checkpoint records
    (the input shape also: the architecture's default, else the size of the data's samples)."""

    arch: str | ArchSpec | None = None  # a built-in name, torchvision:NAME, timm:NAME or pkg.mod:factory
    arch_kwargs: str | dict[str, Any] | None = None  # the factory's keyword arguments (a JSON object)
    trust_pickle: bool = False
    input_shape: ShapeArg | None = None
    mean: FloatsArg | None = None  # per-channel normalisation (None: the checkpoint's, else the data's)
    std: FloatsArg | None = None
    classes: ClassesArg | None = None  # the model's class names in output order
    output: str | None = None  # the task output of a model with several: an index or key, nested with dots
    device: str = "auto"  # auto | cpu | cuda
    threads: int | None = None  # CPU threads torch runs the model on (None: torch's count)

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        shape, mean, std = parse_inputs(self.input_shape, self.mean, self.std)
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "output", parse_task_output(self.output) if self.output is not None else None)
        object.__setattr__(self, "classes", tuple(parse_classes(self.classes)) if self.classes is not None else None)


def parse_inputs(input_shape: ShapeArg | None, mean: FloatsArg | None,
                 std: FloatsArg | None) -> tuple[Shape | None, Floats | None, Floats | None]:
    """The model-input options parsed: (C, H, W), (C, L) or (L,), and the normalisation mean/std (None: not given)."""
    def text(value: str | Sequence[float]) -> str:
        # sequences go through the same parser as the command line, so they are checked alike
        return value if isinstance(value, str) else ",".join(str(v) for v in value)

    shape = parse_shape(text(input_shape)) if input_shape is not None else None
    mean_t = parse_floats(text(mean), name="mean") if mean is not None else None
    std_t = parse_floats(text(std), name="std") if std is not None else None
    return shape, mean_t, std_t


@dataclass
class OpenedModel:
    """A checkpoint opened for a command: the loaded checkpoint and what its model takes."""

    loaded: LoadedCheckpoint
    input_shape: Shape
    mean: Floats | None  # None: the data's own statistics (see data.open_dataset)
    std: Floats | None
    task_output: str | None  # the --output in force (given or recorded); None: the default rule
    classes: tuple[str, ...] | None  # --classes

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def labels(self) -> Labels:
        """What labelled data must match: the model's number of outputs (one forward pass of zeros
        counts them) and its class names (--classes, else the recorded ones)."""
        out = logits_of(_forward(self.model, self.input_shape), self.model)
        outputs = int(out.shape[1]) if out.dim() == 2 else None  # not a classifier: nothing to match
        return Labels(outputs, self.classes, recorded_classes(self.loaded.meta))

    def criterion_labels(self, resolved: ResolvedCriterion) -> Labels | None:
        """The `Labels` calibration data must match when the criterion reads labels; None when it does
        not (unlabelled calibration data, e.g. one folder of images, is then fine)."""
        if resolved.criterion is None or resolved.criterion.requires(resolved.options) != NEEDS_LABELS:
            return None
        return self.labels()

    def loader(self, source: str, data: DataOptions, *, max_batches: int | None = None,
               labels: Labels | None = None) -> DataLoader:
        """Batches of `source` as this model takes them (see `steps.eval_loader`)."""
        return eval_loader(source, input_shape=self.input_shape, mean=self.mean, std=self.std,
                           batch_size=data.batch_size, workers=data.workers, seed=data.seed, max_batches=max_batches,
                           labels=labels)


def open_model(checkpoint: str, options: ModelOptions, *, data: str | None = None, refuse: str | None = None,
               recorded: bool = True) -> OpenedModel:
    """Load `checkpoint` as `options` say and settle what its model takes: the input shape (given,
    else recorded, else the architecture's, else the size of the samples of `data`) and, with
    `recorded`, the normalisation (given, else recorded) and the task output (given, else recorded;
    checked on one forward pass). `refuse`: what the command does with the model ("prune"), when it
    refuses NaN/Inf weights; None: the caller decides (analyze and bench warn)."""
    loaded = load_model(checkpoint, options)
    shape = resolve_input_shape(options.input_shape, loaded, data)  # type: ignore[arg-type]
    mean, std, choice = options.mean, options.std, None
    if recorded:
        mean, std = resolve_normalization(loaded.meta, mean, std)  # type: ignore[arg-type]  # a flag wins
        choice = select_task_output(loaded, options.output, shape)
    if refuse is not None:
        refuse_nonfinite(loaded.model, refuse)
    return OpenedModel(loaded, shape, mean, std, choice, options.classes)  # type: ignore[arg-type]


def load_model(checkpoint: str, options: ModelOptions) -> LoadedCheckpoint:
    # looked up at call time: tests count loads by replacing checkpoint.load_checkpoint
    from ..checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, arch=options.arch, arch_kwargs=options.arch_kwargs,
                           trust_pickle=options.trust_pickle)


def default_out_path(checkpoint: str, kind: str, suffix: str = ".safetensors") -> str:
    """CKPT-STEM.KIND.SUFFIX in the working directory, where every command writes by default: the
    checkpoint's folder may be read-only or shared."""
    return f"{Path(checkpoint).stem}.{kind}{suffix}"


def model_out_path(out: str | None, checkpoint: str, kind: str, loaded: LoadedCheckpoint) -> str:
    """Where a command writes its model: `out`, or `default_out_path` with the suffix
    `checkpoint.save_model` writes for `loaded` (.pt for a whole pickled model). A pickled model
    cannot become a safetensors file, which fails here, before the slow steps."""
    suffix = output_suffix(loaded)
    if out is None:
        return default_out_path(checkpoint, kind, suffix)
    if suffix == ".pt":
        check_pickled_output(out)
    return out


def resolve_input_shape(explicit: Shape | None, loaded: LoadedCheckpoint, data: str | None = None) -> Shape:
    """--input-shape, else the shape recorded in the checkpoint, else the architecture's default,
    else the size of the samples of `data` (checked on one forward pass). An --input-shape other
    than the recorded one, or than a built-in architecture's (made for one size), is warned about."""
    recorded = tuple(loaded.input_shape) if loaded.input_shape is not None else None
    shape = default_input_shape(loaded.arch)
    if explicit is not None:
        known = recorded or (tuple(shape) if shape is not None and loaded.arch is not None
                             and loaded.arch.name in builtin_archs() else None)
        if (known is not None and len(explicit) == len(known) and explicit[0] == known[0]  # other forms fail to run
                and tuple(explicit) != known):
            where = "the checkpoint records" if recorded else f"{loaded.arch.name} is made for"  # type: ignore[union-attr]
            warn(f"--input-shape {_shape_text(explicit)} is not the {_shape_text(known)} {where}; MACs, scores and "
                 f"accuracy are those of {_shape_text(explicit)} inputs (drop --input-shape to use "
                 f"{_shape_text(known)})")
        return explicit
    if recorded is not None:
        return recorded  # type: ignore[return-value]
    if shape is not None:
        return tuple(shape)  # type: ignore[return-value]
    if data is None:
        raise UserError("cannot tell this model's input shape; pass --input-shape C,H,W (the channels and size of "
                        "the images it takes; C,L or L for 1-D signals), or --data to take it from the data")
    return _data_input_shape(data, loaded.model)


def _shape_text(shape: Sequence[int]) -> str:
    return ",".join(str(n) for n in shape)


def _data_input_shape(data: str, model: nn.Module) -> Shape:
    """The shape of `data`'s samples as stored (MNIST 1x28x28, an image folder's common size, the L or
    C,L of 1-D signals)."""
    from ..checkpoint.messages import first_line

    with warnings.catch_warnings():  # what is wrong with the data is said once, when it is opened for use
        warnings.simplefilter("ignore")
        shape: Shape = tuple(open_dataset(data).input_shape)  # type: ignore[assignment]
    try:
        _run(model, shape)
    except Exception as exc:  # noqa: BLE001  (any failure of the forward at that size: said in one line)
        raise UserError(f"the model does not run on {'x'.join(map(str, shape))} inputs, the size of the samples of "
                        f"--data {data} ({first_line(exc)}); pass --input-shape C,H,W") from None
    return shape


def select_task_output(loaded: LoadedCheckpoint, explicit: str | None, input_shape: Shape) -> str | None:
    """The task output (`--output`, else the one the checkpoint records), set on the model for
    `measure.logits_of` and checked on one forward pass; None: the default rule."""
    choice = resolve_task_output(loaded.meta, explicit)
    model = loaded.model
    set_task_output(model, choice)
    if choice is not None:
        logits_of(_forward(model, input_shape), model)
    return choice


def _forward(model: nn.Module, input_shape: Shape) -> Any:
    """`_run`, where a model that does not run at that shape fails in one line."""
    from ..checkpoint.messages import first_line

    try:
        return _run(model, input_shape)
    except Exception as exc:  # noqa: BLE001  (the user's model at a shape it may not take: any error)
        raise UserError(f"the model does not run on inputs of shape {_shape_text(input_shape)} ({type(exc).__name__}: "
                        f"{first_line(exc)}); check --input-shape (C,H,W for images, C,L or L for 1-D signals)") from None


def _run(model: nn.Module, input_shape: Shape) -> Any:
    """One eval-mode forward pass of a batch of zeros (the model's mode restored)."""
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(1, *input_shape, device=param.device if param is not None else None))
    finally:
        model.train(was_training)
