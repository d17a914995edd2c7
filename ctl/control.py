"""Requests to chatd's control socket (frames of :mod:`fdkeep.frames`; see :mod:`chatd.control`),
and the words for a reply that ``chatctl`` and its console both print."""

from __future__ import annotations

from chatd.control import default_socket
from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.peer import FrameSocket
from fdkeep.text import plural


#: A report of every client (``clients``) runs to some 150 bytes a client.
MAX_REPLY = 64 << 20


def call(op: str, path: str | None = None, timeout: float = 10.0) -> dict:
    """One control request; the reply body. Raises :class:`~fdkeep.errors.Error` with chatd's error code."""
    path = path or default_socket()
    try:
        with FrameSocket(path, timeout, max_frame=MAX_REPLY) as conn:
            try:
                conn.send({"op": op})
            except (BrokenPipeError, ConnectionResetError):
                pass  # chatd may have refused us and hung up first: its reason is still there to read
            frame = conn.receive()
    except (OSError, ConnectionError, Error) as exc:
        raise Error(
            "unavailable",
            f"cannot reach chatd's control socket {path} ({exc}); is chatd running? "
            "(`systemctl status chatd`, or pass --control PATH)",
        ) from None
    close_fds(frame.fds)
    if not frame.body.get("ok"):
        raise Error(str(frame.body.get("error", "unknown")), str(frame.body.get("message", "")))
    return frame.body


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
