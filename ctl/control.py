"""Requests to chatd's control socket (frames of :mod:`fdkeep.frames`; see :mod:`chatd.control`),
and the words for a reply that ``chatctl`` and its console both print."""

from __future__ import annotations

from chatd.control import call  # noqa: F401 - chatctl's requests, made where chatd makes them too
from fdkeep.text import plural


def backup_report(reply: dict) -> tuple[list[str], bool]:
    """A ``backup`` reply in words, one line for chatd and one a holder, from what each holder
    answered; and whether some holder keeps every fd (either holder alone restores chatd)."""
    lines = [f"chatd packed {plural(reply['sockets'], 'client socket')} afresh and asked its holders to keep "
             f"{plural(reply['fds'], 'fd')} (listening sockets, journal, bundle ends)"]
    for holder in reply["holders"]:
        name, fds = holder["holder"], reply["fds"]
        source = "by its own list" if holder["listed"] else "as far as chatd can tell: it sends back no list"
        if not holder["answered"]:
            lines.append(f"  {name}: keeps NOTHING, it did not answer: {holder['error']}")
        elif holder["missing"]:
            lines.append(f"  {name}: keeps {holder['keeps']} of {fds} ({source}); no copy of "
                         f"{', '.join(holder['missing'])}" + (f": {holder['error']}" if holder["error"] else ""))
        else:
            lines.append(f"  {name}: keeps all {fds} ({source})")
    if not reply["holders"]:
        lines.append("  no holder at all: chatd runs with --no-holderd and not under systemd")
    backed_up = bool(reply["kept_whole_by"])
    if not backed_up:
        lines.append("NOT backed up: no holder keeps all of chatd's fds; a crash now would end the connections")
    return lines, backed_up
