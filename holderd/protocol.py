"""The holder protocol: what holderd does with each request, without any I/O.

Theory of operation
-------------------
holderd keeps duplicates of other processes' file descriptors so that they
outlive the process that made them. Each held descriptor has a *name* and a
small opaque *metadata* blob, and belongs to the uid of the peer that stored it:
a uid sees and touches only its own names.

Requests and replies are frames (see :mod:`fdkeep.frames`) whose JSON bodies are
described in ``holderd/PROTOCOL.md``. :class:`HolderCore` turns one request
(the peer's uid, the frame's body and descriptors) into a list of replies
(bodies and descriptors to send). It owns the held descriptors: it closes the
ones it drops and those of a request it refuses, so a caller never has to.

The core tells a :class:`Watcher` when a descriptor starts and stops being
held, so that the daemon can watch held sockets for a hang-up (and drop them,
as systemd's own store does) and mirror them elsewhere, without the core
knowing how.

Replies that carry descriptors carry fresh duplicates: the caller sends and
closes them, and a held descriptor dropped meanwhile can never be confused with
a new one that reused its number.

*Leases* let two processes of one uid take turns (chatd and its warm
standby): ``LEASE`` grants a name to the first connection that asks; the others
queue. A lease belongs to a connection, not a process: when that connection
ends (the holder died: the kernel closed its socket), :meth:`HolderCore.peer_gone`
hands the lease to the next in the queue and says whom to tell, at once.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, field

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.frames import MAX_FDS_PER_FRAME, batches, item_size

PROTOCOL_VERSION = 1
OPERATIONS = ("PING", "STORE", "RETRIEVE", "REMOVE", "LIST", "LEASE")


@dataclass(frozen=True)
class Limits:
    max_fds_per_uid: int = 65536
    max_meta_bytes: int = 4096
    max_name_bytes: int = 200


@dataclass
class Held:
    name: str
    meta: bytes
    fd: int
    ino: int
    kind: str

    def describe(self) -> dict:
        return {"name": self.name, "meta": _b64(self.meta), "ino": self.ino, "kind": self.kind}


@dataclass
class Reply:
    body: dict
    fds: list[int] = field(default_factory=list)


class Watcher:
    """Told when a descriptor starts or stops being held. The default does nothing."""

    def held(self, uid: int, held: Held) -> None:
        pass

    def released(self, uid: int, held: Held) -> None:
        pass

    def updated(self, uid: int, held: Held) -> None:
        """``held`` got new metadata; its fd stayed."""


def describe_fd(fd: int) -> tuple[int, str]:
    """The inode (the same for every duplicate of one socket) and a kind label."""
    st = os.fstat(fd)
    if stat.S_ISSOCK(st.st_mode):
        kind = "socket"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return st.st_ino, kind


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _reply_size(held: Held) -> int:
    return item_size(held.name, held.meta)


class HolderCore:
    def __init__(self, limits: Limits = Limits(), watcher: Watcher | None = None):
        self.limits = limits
        self.watcher = watcher or Watcher()
        self._names: dict[int, dict[str, Held]] = {}
        self._by_fd: dict[int, tuple[int, Held]] = {}
        #: (uid, lease name) -> the peer holding it, and the peers waiting for it, in order.
        self._leases: dict[tuple[int, str], int] = {}
        self._waiting: dict[tuple[int, str], list[int]] = {}
        self._peer = 0  # the peer whose request is being handled

    # -- queries used by the daemon -------------------------------------------------
    def count(self, uid: int | None = None) -> int:
        if uid is None:
            return sum(len(names) for names in self._names.values())
        return len(self._names.get(uid, {}))

    def held_items(self):
        """Every (uid, Held) pair, for the daemon's own backup."""
        for uid, names in self._names.items():
            for held in names.values():
                yield uid, held

    # -- the requests -----------------------------------------------------------------
    def handle(self, uid: int, body: dict, fds: list[int], peer: int = 0) -> list[Reply]:
        """Replies to one request of connection ``peer`` (any number the caller keeps
        for it: leases are held by connections) whose uid is ``uid``."""
        self._peer = peer
        request_id = body.get("id")
        op = body.get("op")
        try:
            if op not in OPERATIONS:
                raise Error(
                    "unknown-op", f"unknown operation {op!r}; known: {', '.join(OPERATIONS)}"
                )
            if op != "STORE" and fds:
                raise Error("fd-count-mismatch", f"{op} takes no fds, {len(fds)} came")
            handler = getattr(self, "_op_" + op.lower())
            replies = handler(uid, body, fds)
        except Error as exc:
            close_fds(fds)
            return [Reply(exc.as_reply(request_id))]
        for reply in replies:
            reply.body = {"id": request_id, "ok": True, **reply.body}
        return replies

    def _op_ping(self, uid, body, fds):
        return [Reply({"version": PROTOCOL_VERSION, "held": self.count(uid), "uid": uid})]

    def _op_store(self, uid, body, fds):
        items = body.get("items")
        if not isinstance(items, list) or not items:
            raise Error("bad-request", "STORE needs a non-empty list 'items' of {name, meta}")
        if len(items) != len(fds):
            raise Error(
                "fd-count-mismatch", f"STORE lists {len(items)} items but {len(fds)} fds came"
            )
        parsed = [self._parse_item(item) for item in items]
        names = self._names.setdefault(uid, {})
        new_names = {name for name, _ in parsed} - names.keys()
        if len({name for name, _ in parsed}) != len(parsed):
            raise Error("bad-request", "STORE names one name twice")
        if len(names) + len(new_names) > self.limits.max_fds_per_uid:
            raise Error(
                "limit-reached",
                f"uid {uid} may hold at most {self.limits.max_fds_per_uid} fds "
                f"({len(names)} held, {len(new_names)} new); remove some or raise --max-fds-per-uid",
            )
        described = []
        for fd in fds:
            try:
                described.append(describe_fd(fd))
            except OSError as exc:
                raise Error("bad-fd", f"cannot inspect a stored fd: {exc}") from None
        for (name, meta), fd, (ino, kind) in zip(parsed, fds, described):
            old = names.get(name)
            if old is not None and old.ino == ino and old.kind == kind:
                # The same socket again (a client re-stores after a change):
                # keep the fd held, take the new metadata.
                close_fds([fd])
                if old.meta != meta:
                    old.meta = meta
                    self.watcher.updated(uid, old)
                continue
            self._hold(uid, Held(name, meta, fd, ino, kind))
        return [Reply({"stored": len(parsed)})]

    def adopt(self, uid: int, name: str, meta: bytes, fd: int) -> Held:
        """Hold ``fd`` as if ``uid`` had stored it, unchecked: what holderd held before a restart."""
        held = Held(name, meta, fd, *describe_fd(fd))
        self._hold(uid, held)
        return held

    def _hold(self, uid: int, held: Held) -> None:
        names = self._names.setdefault(uid, {})
        old = names.get(held.name)
        if old is not None:
            self._release(uid, old)
        names[held.name] = held
        self._by_fd[held.fd] = (uid, held)
        self.watcher.held(uid, held)

    def _parse_item(self, item) -> tuple[str, bytes]:
        if not isinstance(item, dict):
            raise Error("bad-request", "each STORE item must be an object {name, meta}")
        name = self._check_name(item.get("name"))
        meta_text = item.get("meta", "")
        if not isinstance(meta_text, str):
            raise Error("bad-request", f"meta of {name!r} must be a base64 string")
        try:
            meta = base64.b64decode(meta_text, validate=True)
        except (binascii.Error, ValueError):
            raise Error("bad-request", f"meta of {name!r} is not valid base64") from None
        if len(meta) > self.limits.max_meta_bytes:
            raise Error(
                "meta-too-large",
                f"meta of {name!r} is {len(meta)} bytes; the limit is {self.limits.max_meta_bytes}",
            )
        return name, meta

    def _check_name(self, name) -> str:
        if not isinstance(name, str) or not name:
            raise Error("bad-name", "a name must be a non-empty string")
        if len(name.encode()) > self.limits.max_name_bytes:
            raise Error("bad-name", f"name longer than {self.limits.max_name_bytes} bytes")
        if not all(33 <= ord(ch) <= 126 for ch in name):
            raise Error("bad-name", f"name {name!r} must be printable ASCII without spaces")
        return name

    def _selected(self, uid: int, body: dict) -> list[Held]:
        names = self._names.get(uid, {})
        if "names" in body:
            wanted = body["names"]
            if not isinstance(wanted, list) or not all(isinstance(n, str) for n in wanted):
                raise Error("bad-request", "'names' must be a list of strings")
            return [names[name] for name in dict.fromkeys(wanted) if name in names]
        prefix = body.get("prefix", "")
        if not isinstance(prefix, str):
            raise Error("bad-request", "'prefix' must be a string")
        return [held for name, held in sorted(names.items()) if name.startswith(prefix)]

    def _op_retrieve(self, uid, body, fds):
        selected = self._selected(uid, body)
        chunks = batches(selected, MAX_FDS_PER_FRAME, _reply_size)
        replies = []
        for index, chunk in enumerate(chunks):
            duplicates = []
            try:
                for held in chunk:
                    duplicates.append(os.dup(held.fd))
            except OSError as exc:
                for reply in replies:
                    close_fds(reply.fds)
                close_fds(duplicates)
                raise Error("no-resources", f"holderd cannot duplicate fds now: {exc}") from None
            items = [{"name": h.name, "meta": _b64(h.meta), "ino": h.ino} for h in chunk]
            replies.append(Reply({"items": items, "more": index < len(chunks) - 1}, duplicates))
        return replies

    def _op_list(self, uid, body, fds):
        selected = self._selected(uid, body)
        chunks = batches(selected, 1000, _reply_size)
        return [
            Reply({"items": [h.describe() for h in chunk], "more": index < len(chunks) - 1})
            for index, chunk in enumerate(chunks)
        ]

    def _op_remove(self, uid, body, fds):
        if "names" not in body and "prefix" not in body:
            raise Error("bad-request", "REMOVE needs 'names' (a list) or 'prefix'")
        selected = self._selected(uid, body)
        for held in selected:
            self._release(uid, held)
        return [Reply({"removed": len(selected)})]

    def _op_lease(self, uid, body, fds):
        name = self._check_name(body.get("lease"))
        key = (uid, name)
        holder = self._leases.setdefault(key, self._peer)
        if holder == self._peer:
            return [Reply({"lease": name, "granted": True})]
        waiting = self._waiting.setdefault(key, [])
        if self._peer not in waiting:
            waiting.append(self._peer)
        return [Reply({"lease": name, "granted": False, "waiting": waiting.index(self._peer) + 1})]

    def peer_gone(self, peer: int) -> list[tuple[int, dict]]:
        """Connection ``peer`` ended: its leases pass to the next waiters.
        (peer, event body) for each one to tell that it holds a lease now."""
        told = []
        for key, waiting in list(self._waiting.items()):
            if peer in waiting:
                waiting.remove(peer)
        for key, holder in list(self._leases.items()):
            if holder != peer:
                continue
            del self._leases[key]
            waiting = self._waiting.get(key, [])
            if waiting:
                self._leases[key] = waiting.pop(0)
                told.append((self._leases[key], {"id": None, "ok": True, "event": "lease-granted", "lease": key[1]}))
        return told

    # -- dropping -----------------------------------------------------------------------
    def _release(self, uid: int, held: Held) -> None:
        names = self._names.get(uid, {})
        if names.get(held.name) is held:
            del names[held.name]
        self._by_fd.pop(held.fd, None)
        self.watcher.released(uid, held)
        close_fds([held.fd])

    def drop_fd(self, fd: int) -> Held | None:
        """Drop whatever is held under descriptor ``fd`` (its socket hung up)."""
        entry = self._by_fd.get(fd)
        if entry is None:
            return None
        uid, held = entry
        self._release(uid, held)
        return held

    def close(self) -> None:
        for uid, held in list(self.held_items()):
            self._release(uid, held)
