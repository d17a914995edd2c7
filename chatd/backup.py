"""Where chatd keeps copies of its descriptors: the *holders*.

A holder takes (name, metadata, fd) items, forgets names, and gives back what it
holds after a crash. holderd is one; systemd's fd store is the other (see
:mod:`chatd.fdstore`). chatd talks to every holder through this one interface
and never stops serving because a holder is down: each failure is logged once,
when the holder goes from working to failing, and its recovery likewise.
"""

from __future__ import annotations

import logging

from holderd.client import HolderClient, HolderError, HolderUnavailable, Retrieved

log = logging.getLogger("chatd")

PREFIX = "chatd/"
LISTEN_NAME = PREFIX + "listen"
STATE_NAME = PREFIX + "state"
CLIENT_PREFIX = PREFIX + "client/"


def client_name(member_id: int) -> str:
    return f"{CLIENT_PREFIX}{member_id}"


def member_id_of(name: str) -> int | None:
    if not name.startswith(CLIENT_PREFIX):
        return None
    tail = name[len(CLIENT_PREFIX):]
    return int(tail) if tail.isdigit() else None


class HolderdHolder:
    """holderd, reached over its UNIX socket."""

    label = "holderd"

    def __init__(self, path: str | None):
        self.client = HolderClient(path, timeout=3.0)
        self.working: bool | None = None

    def _outcome(self, error: Exception | None, what: str) -> bool:
        if error is None:
            if self.working is False:
                log.info("holderd at %s works again", self.client.path)
            self.working = True
            return True
        if isinstance(error, HolderUnavailable):
            if self.working is not False:
                log.warning("holderd unavailable, %s skipped: %s", what, error.message)
            self.working = False
        else:
            log.warning("holderd refused %s: %s", what, error)
        return False

    def store(self, items: list[tuple[str, bytes, int]]) -> bool:
        try:
            self.client.store(items)
        except HolderError as exc:
            return self._outcome(exc, f"storing {len(items)} fds")
        return self._outcome(None, "")

    def remove(self, names: list[str]) -> bool:
        try:
            self.client.remove(names=names)
        except HolderError as exc:
            return self._outcome(exc, f"removing {len(names)} names")
        return self._outcome(None, "")

    def retrieve(self) -> list[Retrieved]:
        try:
            items = self.client.retrieve(PREFIX)
        except HolderError as exc:
            self._outcome(exc, "retrieving")
            return []
        self._outcome(None, "")
        return items

    def forget_all(self) -> bool:
        try:
            removed = self.client.remove(prefix=PREFIX)
        except HolderError as exc:
            return self._outcome(exc, "forgetting everything")
        log.info("holderd forgot the %d fds it kept for chatd (--fresh)", removed)
        return self._outcome(None, "")

    def held_count(self) -> int | None:
        """How many fds holderd keeps for chatd's uid; None if it cannot be asked."""
        try:
            held = self.client.ping()["held"]
        except HolderError as exc:
            self._outcome(exc, "checking")
            return None
        self._outcome(None, "")
        return held

    def held_names(self) -> set[str] | None:
        try:
            items = self.client.list(PREFIX)
        except HolderError as exc:
            self._outcome(exc, "listing")
            return None
        return {item["name"] for item in items}
