"""Importing this module registers every built-in criterion."""

from . import bn, fpgm, norms, random  # noqa: F401
