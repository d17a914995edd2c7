"""The client side of the holder protocol, for chatd and chatctl.

Blocking and simple: one request, then its reply (or replies, for RETRIEVE and
LIST, which come in chunks of at most 253 fds). Every failure reported by
holderd raises :class:`fdkeep.errors.Error` with holderd's error code; a
holderd that cannot be reached raises the code ``unavailable``, and a reply
this client cannot parse ``bad-reply``.
"""

from __future__ import annotations

import base64
import itertools
import os
from dataclasses import dataclass

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.frames import MAX_FDS_PER_FRAME, batches, item_size
from fdkeep.paths import runtime_dir
from fdkeep.peer import FrameSocket


def default_socket(*, own_service: bool = False) -> str:
    """Where holderd listens unless told otherwise: ``$HOLDERD_SOCKET``, else
    ``holderd.sock`` in its runtime directory (:func:`fdkeep.paths.runtime_dir`)."""
    return os.environ.get("HOLDERD_SOCKET") or os.path.join(
        runtime_dir("holderd", own_service=own_service), "holderd.sock"
    )


def unavailable(path: str, reason: str) -> Error:
    return Error(
        "unavailable",
        f"cannot reach holderd at {path} ({reason}); is it running? (start it with "
        "`holderd`, or `systemctl start holderd`)",
    )


@dataclass
class Retrieved:
    name: str
    meta: bytes
    fd: int
    ino: int


class HolderClient:
    def __init__(self, path: str | None = None, timeout: float = 5.0):
        self.path = path or default_socket()
        self.timeout = timeout
        self._conn: FrameSocket | None = None
        self._ids = itertools.count(1)

    def connect(self) -> "HolderClient":
        if self._conn is None:
            try:
                self._conn = FrameSocket(self.path, self.timeout)
            except OSError as exc:
                raise unavailable(self.path, exc.strerror or str(exc)) from None
        return self

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def connection(self) -> FrameSocket | None:
        """The connection now open (a new one after a failure), to watch for holderd going away."""
        return self._conn

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def _call(self, body: dict, fds=()) -> list[tuple[dict, list[int]]]:
        """Send one request; return every reply frame (chunks end with more=false).

        A connection kept from an earlier call may have died with a holderd
        that restarted since: then the request is sent once more on a new one.
        Every operation may be repeated safely (a STORE replaces, a REMOVE of
        what is gone removes nothing).
        """
        if self._conn is not None:
            try:
                return self._call_once(body, fds)
            except Error as exc:
                if exc.code != "unavailable":
                    raise
        return self._call_once(body, fds)

    def _call_once(self, body: dict, fds=()) -> list[tuple[dict, list[int]]]:
        self.connect()
        request_id = next(self._ids)
        replies = []
        try:
            try:
                self._conn.send({"id": request_id, **body}, fds)
            except (BrokenPipeError, ConnectionResetError):
                # holderd may have refused us and hung up before our request
                # went out: its reason is still there to be read.
                pass
            while True:
                frame = self._conn.receive()
                replies.append((frame.body, frame.fds))
                if not frame.body.get("ok") or not frame.body.get("more"):
                    break
        except Error as exc:
            # holderd sent what this client cannot parse: not worth a retry.
            self._drop(replies)
            raise Error("bad-reply", f"holderd's reply is unreadable: {exc.message}") from None
        except (OSError, ConnectionError) as exc:
            # The stream's position is unknown now: start afresh next time.
            self._drop(replies)
            raise unavailable(self.path, str(exc)) from None
        last = replies[-1][0]
        if not last.get("ok"):
            self._drop(replies, keep_connection=True)
            raise Error(str(last.get("error", "unknown")), str(last.get("message", "")))
        return replies

    def _drop(self, replies, keep_connection: bool = False) -> None:
        for _, fds in replies:
            close_fds(fds)
        if not keep_connection:
            self.close()

    def ping(self) -> dict:
        return self._call({"op": "PING"})[0][0]

    def store(self, items: list[tuple[str, bytes, int]]) -> int:
        """Store (name, meta, fd) items, in as many frames as SCM_RIGHTS needs."""
        stored = 0
        for batch in batches(items, MAX_FDS_PER_FRAME, lambda item: item_size(item[0], item[1])):
            if not batch:
                continue
            body = {
                "op": "STORE",
                "items": [{"name": name, "meta": base64.b64encode(meta).decode()} for name, meta, _ in batch],
            }
            stored += self._call(body, [fd for _, _, fd in batch])[0][0]["stored"]
        return stored

    def retrieve(self, prefix: str = "") -> list[Retrieved]:
        """Duplicates of every held fd whose name starts with ``prefix``; the caller owns them."""
        result = []
        for body, fds in self._call({"op": "RETRIEVE", "prefix": prefix}):
            for item, fd in zip(body["items"], fds):
                result.append(Retrieved(item["name"], base64.b64decode(item["meta"]), fd, item["ino"]))
        return result

    def list(self, prefix: str = "") -> list[dict]:
        items = []
        for body, _ in self._call({"op": "LIST", "prefix": prefix}):
            for item in body["items"]:
                items.append({**item, "meta": base64.b64decode(item["meta"])})
        return items

    def remove(self, names: list[str] | None = None, prefix: str | None = None) -> int:
        body = {"op": "REMOVE"}
        if names is not None:
            body["names"] = names
        if prefix is not None:
            body["prefix"] = prefix
        return self._call(body)[0][0]["removed"]


class Lease:
    """A lease from holderd, on a connection of its own that lives as long as its holder.

    holderd grants a lease name (per uid) to the first connection that asks and
    queues the others; when the holder's process exits or its connection ends,
    whichever is first (a child that keeps the socket does not keep the lease), the
    next in line is told at once. :meth:`request` asks; then :meth:`fileno` goes
    into the caller's event loop and :meth:`poll` says what came: ``"granted"``
    (it is ours now) or ``"lost"`` (holderd went away: ask again once it is back,
    since a restarted holderd remembers no lease).
    """

    def __init__(self, name: str, path: str | None = None, timeout: float = 1.0):
        self.name = name
        self.path = path or default_socket()
        self.timeout = timeout
        self._conn: FrameSocket | None = None

    def request(self) -> bool:
        """Ask for the lease; True if it is ours, False if we wait in line. Raises Error."""
        self.close()
        try:
            self._conn = FrameSocket(self.path, self.timeout)
            try:
                self._conn.send({"id": 1, "op": "LEASE", "lease": self.name})
            except (BrokenPipeError, ConnectionResetError):
                pass  # holderd may have refused us and hung up first: its reason is there to be read
            reply = self._conn.receive().body
        except (OSError, ConnectionError) as exc:
            self.close()
            raise unavailable(self.path, str(exc)) from None
        except Error as exc:
            self.close()
            raise Error("bad-reply", f"holderd's reply is unreadable: {exc.message}") from None
        if not reply.get("ok"):
            self.close()
            raise Error(str(reply.get("error", "unknown")), str(reply.get("message", "")))
        self._conn.sock.setblocking(False)
        return bool(reply.get("granted"))

    def fileno(self) -> int:
        return self._conn.sock.fileno()

    def poll(self) -> str | None:
        """What holderd said since: "granted", "lost", or None (nothing yet)."""
        if self._conn is None:
            return "lost"
        try:
            frame = self._conn.receive()
        except (BlockingIOError, InterruptedError):
            return None
        except (OSError, ConnectionError, Error):
            self.close()
            return "lost"
        close_fds(frame.fds)
        if frame.body.get("event") == "lease-granted" and frame.body.get("lease") == self.name:
            return "granted"
        return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
