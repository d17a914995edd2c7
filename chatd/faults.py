"""Crash points for tests: ``CHATD_FAULT`` makes chatd die of ``os.abort()`` at a named point.

Tests use it to crash chatd at exactly the instants that matter for zero loss,
one test each::

    CHATD_FAULT=after-read      just after bytes came from a client's socket
    CHATD_FAULT=after-handle    a command handled, its output not yet committed or sent
    CHATD_FAULT=mid-write       a client's socket took only part of what was sent
    CHATD_FAULT=after-commit    a step committed and sent, before the next read
    CHATD_FAULT=after-accept    a connection accepted, not yet stored anywhere
    CHATD_FAULT=poison=TEXT     handling a message whose text contains TEXT

``NAME:N`` dies the N-th time the point is reached instead of the first.
Points count from the moment chatd serves (:func:`start_counting`), not during
its own restore; a poison kills wherever its line is handled, restore included. Unset (as always outside tests), every check is one comparison with None.
"""

from __future__ import annotations

import os

from fdkeep.errors import Error

POINTS = ("after-read", "after-handle", "mid-write", "after-commit", "after-accept", "poison")


def parse(value: str | None) -> tuple[str, int, str] | None:
    """``"mid-write:3"`` -> ("mid-write", 3, ""); ``"poison=boom"`` -> ("poison", 1, "boom")."""
    if not value:
        return None
    spec, _, text = value.partition("=")
    name, _, count = spec.partition(":")
    if name not in POINTS or (count and not count.isdigit()) or (name == "poison") != bool(text):
        raise Error("bad-fault", f"CHATD_FAULT={value!r}: expected one of {', '.join(POINTS)}, "
                                 "optionally :N (the N-th time), and poison=TEXT")
    return name, int(count or 1), text


_armed: tuple[str, int, str] | None = None
_counting = False
_seen = 0


def arm(value: str | None = None) -> None:
    """Arm the fault ``value`` names (default: ``$CHATD_FAULT``); raises Error ``bad-fault``.

    A poison is live at once (it is about the input, wherever it is handled);
    the other points count only after :func:`start_counting`."""
    global _armed, _seen
    _armed, _seen = parse(os.environ.get("CHATD_FAULT") if value is None else value), 0


def start_counting() -> None:
    global _counting
    _counting = True


def reached(point: str) -> None:
    """Die here if the armed fault is this point (and this is its N-th time)."""
    global _seen
    if _armed is None or _armed[0] != point or not _counting:
        return
    _seen += 1
    if _seen >= _armed[1]:
        os.abort()


def poisons(text: str) -> bool:
    """True if handling ``text`` is to kill chatd (the armed fault is poison=…)."""
    return _armed is not None and _armed[0] == "poison" and _armed[2] in text
