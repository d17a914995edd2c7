"""Words for people: counts that read right."""

from __future__ import annotations


def plural(count: int, noun: str) -> str:
    """``1 pair``, ``2 pairs``, ``0 clients``."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
