"""Training-time pruning schedules, as `train.Hook`s of the fine-tuning loop; one module per
schedule, each described in its own docstring:

`asfp` (`asfp`, `sfp`)  soft filter pruning: the lowest-norm filters zeroed every interval, at an
                       asymptotic or constant rate, and removed physically at the end;
`cac`                  online conditional-accuracy-change gates, removing channels in rounds early
                       in training;
`whitebox`             class-wise masks trained on frozen weights, one global removal with BN
                       rescaling, then fine-tuning.

`base` holds what they share and the registry behind `--schedule` (`make_schedule`, `SCHEDULES`).
Targets: `ratio` (fraction of the channels of every group, uniform) or `target_flops` (fraction
of the MACs, one global ranking), the same allocation rules as `chanprune prune` (`min_keep`,
`round_to`, `ignore`). Every physical removal is verified against the masked model.
"""

from __future__ import annotations

from . import asfp, cac, whitebox  # noqa: F401  (importing registers every schedule)
from .asfp import SoftFilterPruning, asfp_coefficients, asfp_rate
from .base import PruningSchedule, make_schedule, register_schedule, schedule_names
from .cac import CACSchedule
from .whitebox import WhiteboxSchedule

SCHEDULES = schedule_names()

__all__ = [
    "SCHEDULES",
    "CACSchedule",
    "PruningSchedule",
    "SoftFilterPruning",
    "WhiteboxSchedule",
    "asfp_coefficients",
    "asfp_rate",
    "make_schedule",
    "register_schedule",
]
