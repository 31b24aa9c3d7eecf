"""Matching a data set's classes to a model's outputs.

Folder sources number their classes by sorted folder name, which is right only when the folders
are exactly the model's classes. `--classes` (or the class names a checkpoint records under
`meta.classes`) names the model's outputs in order; `fit_classes` then labels each data class by
its name's position there, and warns when data and model disagree and nothing says how they match.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .base import ChanpruneDataset, DataWarning

__all__ = ["CLASSES_KEY", "ClassesArg", "fit_classes", "parse_classes", "recorded_classes", "with_classes"]

CLASSES_KEY = "classes"  # checkpoint meta: the model's class names in output order

ClassesArg = str | Sequence[str]  # "cat,dog,..." or "@names.txt" (as --classes), or a list of names


def parse_classes(value: ClassesArg) -> list[str]:
    """The class names of `--classes`: comma-separated, or `@FILE` with one name per line."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("@"):
            path = Path(text[1:]).expanduser()
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise UserError(f"--classes {text}: cannot read {path} ({exc}); give a text file with one class name per line") from None
            names = [line.strip() for line in lines if line.strip()]
        else:
            names = [part.strip() for part in text.split(",")]
    else:
        names = [str(name).strip() for name in value]
    if not names or any(not name for name in names):
        raise UserError("--classes: give the model's class names in output order, e.g. --classes cat,dog,horse "
                        "(no empty names), or @FILE with one name per line")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"--classes names {', '.join(map(repr, duplicates[:3]))} more than once; "
                        "give each output class once, in the model's output order")
    return names


def recorded_classes(meta: dict[str, Any]) -> list[str] | None:
    """The class names a checkpoint's metadata records (a list of distinct names), if any."""
    names = meta.get(CLASSES_KEY)
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        return None
    return names if len(set(names)) == len(names) else None


def with_classes(meta: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`meta` recording `names` as the model's classes, for the file a command writes."""
    return {**meta, CLASSES_KEY: list(names)}


def _shown(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _relabel(dataset: ChanpruneDataset, names: Sequence[str]) -> None:
    position = {name: i for i, name in enumerate(names)}
    old = list(dataset.classes)
    dataset.targets = [position[old[t]] for t in dataset.targets]
    dataset.classes = list(names)


def fit_classes(dataset: ChanpruneDataset, outputs: int | None, classes: ClassesArg | None = None, *,
                recorded: Sequence[str] | None = None) -> None:
    """Label `dataset` as the model with `outputs` classes (None: unknown) numbers them.

    `classes` (`--classes`) names the model's outputs in order: every data class must be one of
    them (UserError otherwise). Without it, class names `recorded` in the checkpoint are used when
    they cover the data's classes. Otherwise the data's own (sorted) order stands, with a warning
    when its class count differs from the model's outputs."""
    if classes is not None:
        names = parse_classes(classes)
        if outputs is not None and len(names) != outputs:
            raise UserError(f"--classes names {len(names)} classes but the model outputs {outputs}; "
                            "give one name per output class, in the model's output order")
        unknown = [c for c in dataset.classes if c not in names]
        if unknown:
            raise UserError(f"{dataset.source} has class(es) {_shown(unknown)} that --classes does not name; "
                            f"check --classes ({_shown(names)}) against the data's class folders")
        _relabel(dataset, names)
        return
    if recorded is not None and (outputs is None or len(recorded) == outputs) \
            and all(c in recorded for c in dataset.classes):
        _relabel(dataset, recorded)
        return
    if outputs is None or not dataset.labels_by_name or dataset.num_classes >= outputs:
        return  # stored labels are the model's indices; more classes than outputs: the label check refuses
    hint = (f" (the checkpoint records {_shown(list(recorded))}, which do not cover them)" if recorded is not None else "")
    n = dataset.num_classes
    warnings.warn(DataWarning(
        f"{dataset.source} has {n} class{'es' if n != 1 else ''} ({_shown(dataset.classes)}) but the model outputs "
        f"{outputs}{hint}: labelled {'0' if n == 1 else f'0-{n - 1}'} in sorted order, right only if "
        f"{'it is' if n == 1 else 'they are'} the model's first; pass --classes with the model's class names in "
        "output order"), stacklevel=2)
