"""Channel-importance criteria; one module per criterion, all behind `base.Criterion`."""

from .base import Criterion, Scores, available, check_requirements, get_criterion

__all__ = ["Criterion", "Scores", "available", "check_requirements", "get_criterion"]
