"""Channel-importance criteria; one module per criterion, all behind `base.Criterion`."""

from .base import Criterion, Scores, ScoringRun, available, check_requirements, get_criterion

__all__ = ["Criterion", "Scores", "ScoringRun", "available", "check_requirements", "get_criterion"]
