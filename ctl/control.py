"""Requests to chatd's control socket (frames of :mod:`fdkeep.frames`; see :mod:`chatd.control`)."""

from __future__ import annotations

from chatd.control import default_socket
from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.peer import FrameSocket


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
