"""What each command does, as one function to call from Python (the commands call them too).

Each recipe takes the checkpoint and one options object (`PruneOptions`, ...), composed of the
shared ones (`ModelOptions`: where the model comes from and what it takes; `DataOptions`: the data
it reads; `AllocationOptions`: what pruning removes), each validated when made. It checks every
output before any slow step, prints progress and warnings to stderr, writes the command's output
files, and returns a result object with what the command's report shows (`report/` renders it).
Failures raise `errors.UserError` (bad input) or `errors.ChanpruneError`.

    from chanprune_cli import AllocationOptions, ModelOptions, PruneOptions, prune_checkpoint
    result = prune_checkpoint("r20.pt", PruneOptions(AllocationOptions(ratio=0.5), criterion="l1",
                                                     model=ModelOptions(arch="cifar_resnet20"), out="p.safetensors"))

Every module here that lists names in `__all__` has them exported from this package (and from
`chanprune_cli`), so a new recipe needs no line here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def _exports() -> dict[str, Any]:
    """The names every module of this package lists in its `__all__`."""
    found: dict[str, Any] = {}
    for module in pkgutil.iter_modules(__path__):
        namespace = vars(importlib.import_module(f"{__name__}.{module.name}"))
        found.update({name: namespace[name] for name in namespace.get("__all__", ())})
    return found


_EXPORTS = _exports()
globals().update(_EXPORTS)
__all__ = sorted(_EXPORTS)
