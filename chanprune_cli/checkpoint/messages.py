"""Shortening exception text and key lists into the one-line UserErrors checkpoint reading raises."""

from __future__ import annotations

__all__ = ["first_line", "short_list"]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # torch appends paragraphs of advice; the first sentence carries the cause.
    return text[0].split(". ")[0][:200] if text else type(exc).__name__


def short_list(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")
