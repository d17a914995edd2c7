"""The one error type: what failed, as a stable code, and what to do, in words.

Every expected failure in process-backup (a bad frame, a refused request, a
daemon that cannot be reached) is an :class:`Error`. Programs branch on
``code`` (``"unavailable"``, ``"bad-frame"``, ``"limit-reached"`` …; the
holder protocol's codes are listed in ``holderd/PROTOCOL.md``); people read
``message``, which says what to do about it where anything can be done.
"""

from __future__ import annotations


class Error(Exception):
    """``code``: a stable name; ``message``: one line for a person.

    ``fatal`` marks an error after which a connection's byte stream can no
    longer be trusted to be in sync, so the connection must end.
    """

    def __init__(self, code: str, message: str, *, fatal: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.fatal = fatal

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def as_reply(self, request_id=None) -> dict:
        """The error as a frame body: ``{"ok": false, "error": code, "message": …}``."""
        return {"id": request_id, "ok": False, "error": self.code, "message": self.message}
