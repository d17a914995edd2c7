"""Requests to chatd's control socket (frames of :mod:`holderd.wire`)."""

from __future__ import annotations

from holderd import paths
from holderd.wire import FrameSocket, close_fds


class ControlError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def call(op: str, path: str | None = None, timeout: float = 10.0) -> dict:
    """One control request; the reply body. Raises ControlError with chatd's error code."""
    path = path or paths.chatd_control_socket()
    try:
        with FrameSocket(path, timeout) as conn:
            conn.send({"op": op})
            frame = conn.receive()
    except (OSError, ConnectionError) as exc:
        raise ControlError(
            "unavailable",
            f"cannot reach chatd's control socket {path} ({exc}); is chatd running? "
            "(`systemctl status chatd`, or pass --control PATH)",
        ) from None
    close_fds(frame.fds)
    if not frame.body.get("ok"):
        raise ControlError(frame.body.get("error", "unknown"), frame.body.get("message", ""))
    return frame.body
