"""A pickle module for trusted `torch.load`s that finds chanprune's classes where they live now.

A whole pickled module names each class by the module that defined it when the file was written;
files from earlier chanprune versions name paths that have since moved. torch.load takes this
module as `pickle_module` (it needs `Unpickler` and `load`).
"""

from __future__ import annotations

import pickle
from typing import IO, Any

__all__ = ["Unpickler", "load"]

# (module, class) as earlier chanprune versions pickled them → the module that provides the class now.
_MOVED = {
    ("chanprune_cli.layers", "OptionAShortcut"): "chanprune_cli.models",
    ("chanprune_cli.models.layers", "OptionAShortcut"): "chanprune_cli.models",
}


class Unpickler(pickle.Unpickler):
    """`pickle.Unpickler` that reads moved class paths at their current place."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(_MOVED.get((module, name), module), name)


def load(file: IO[bytes], **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()
