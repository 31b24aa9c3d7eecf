"""What each command does, as one function to call from Python (the commands call them too).

Each recipe takes the command's options as keyword arguments (`finetune_checkpoint` takes a
`FinetuneOptions`), validates them all before any slow step, prints progress and warnings to
stderr, writes the command's output files, and returns a result object with what the command's
report shows. Failures raise `errors.UserError` (bad input) or `errors.ChanpruneError`.

    from chanprune_cli import prune_checkpoint
    result = prune_checkpoint("r20.pt", arch="cifar_resnet20", criterion="l1", ratio=0.5, out="p.safetensors")
"""

from __future__ import annotations

from ..prune.scoring import ResolvedCriterion
from .analyze import AnalyzeResult, analyze_checkpoint
from .bench import BenchResult, bench_checkpoints
from .export import ExportOutcome, export_checkpoint, export_format
from .finetune import FinetuneOptions, FinetuneResult, finetune_checkpoint
from .prune import PruneResult, prune_checkpoint
from .score import ScoreResult, score_checkpoint

__all__ = [
    "AnalyzeResult",
    "BenchResult",
    "ExportOutcome",
    "FinetuneOptions",
    "FinetuneResult",
    "PruneResult",
    "ResolvedCriterion",
    "ScoreResult",
    "analyze_checkpoint",
    "bench_checkpoints",
    "export_checkpoint",
    "export_format",
    "finetune_checkpoint",
    "prune_checkpoint",
    "score_checkpoint",
]
