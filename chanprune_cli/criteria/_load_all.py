"""Importing this module registers every built-in criterion."""

from . import bn, cac, fpgm, hrank, info, norms, random, sensitivity, taylor, whitebox  # noqa: F401
