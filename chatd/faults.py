"""Crash points for tests: ``CHATD_FAULT`` makes chatd die of ``os.abort()`` at a named point.

Tests use it to crash chatd at exactly the instants that matter for zero loss,
one test each::

    CHATD_FAULT=after-read      just after bytes came from a client's socket
    CHATD_FAULT=after-handle    a command handled, its output not yet committed or sent
    CHATD_FAULT=mid-write       a client's socket took only part of what was sent
    CHATD_FAULT=after-commit    a step committed and sent, before the next read
    CHATD_FAULT=after-accept    a connection accepted, not yet stored anywhere
    CHATD_FAULT=poison=TEXT     handling a message whose text contains TEXT

Two more act while a message whose text contains TEXT is handled, without dying:

    CHATD_FAULT=hang=TEXT       chatd hangs there (sleeps forever): a command that hangs it
    CHATD_FAULT=stall=TEXT      chatd stops itself there (SIGSTOP), as if stalled from outside
                                (a SIGSTOP, a starved host), for the test to kill it as the
                                world would (SIGKILL, or SIGQUIT as systemd's watchdog)

A poison and a hang are the command's doing: they act in a child process that
tries the command too (:mod:`chatd.trial`). A stall is not: it acts only in
the process that armed it, never in its children.

``NAME:N`` dies the N-th time the point is reached instead of the first.
Points count from the moment chatd serves (:func:`start_counting`), not during
its own restore; the three of a message's TEXT act wherever its line is
handled, restore included. Unset (as always outside tests), every check is one
comparison with None.
"""

from __future__ import annotations

import os
import signal
import time

from fdkeep.errors import Error

#: The points that act on a message whose text contains the TEXT they name.
MESSAGE_POINTS = ("poison", "hang", "stall")
POINTS = ("after-read", "after-handle", "mid-write", "after-commit", "after-accept") + MESSAGE_POINTS


def parse(value: str | None) -> tuple[str, int, str] | None:
    """``"mid-write:3"`` -> ("mid-write", 3, ""); ``"poison=boom"`` -> ("poison", 1, "boom")."""
    if not value:
        return None
    spec, _, text = value.partition("=")
    name, _, count = spec.partition(":")
    if name not in POINTS or (count and not count.isdigit()) or (name in MESSAGE_POINTS) != bool(text):
        raise Error("bad-fault", f"CHATD_FAULT={value!r}: expected one of {', '.join(POINTS)}, "
                                 f"optionally :N (the N-th time), and {'|'.join(MESSAGE_POINTS)}=TEXT")
    return name, int(count or 1), text


_armed: tuple[str, int, str] | None = None
_armed_by = 0  # the process that armed it (a stall acts there only)
_counting = False
_seen = 0


def arm(value: str | None = None) -> None:
    """Arm the fault ``value`` names (default: ``$CHATD_FAULT``); raises Error ``bad-fault``.

    A message's point (poison, hang, stall) is live at once (it is about the input,
    wherever it is handled); the other points count only after :func:`start_counting`."""
    global _armed, _armed_by, _seen
    _armed, _seen = parse(os.environ.get("CHATD_FAULT") if value is None else value), 0
    _armed_by = os.getpid()


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


def handling_message(text: str) -> None:
    """A message with ``text`` is being handled: die (poison), hang, or stall here, if so armed."""
    if _armed is None or _armed[0] not in MESSAGE_POINTS or _armed[2] not in text:
        return
    if _armed[0] == "poison":
        os.abort()
    elif _armed[0] == "hang":
        while True:
            time.sleep(1)
    elif os.getpid() == _armed_by:  # a stall: never in a child that tries the command
        os.kill(os.getpid(), signal.SIGSTOP)
