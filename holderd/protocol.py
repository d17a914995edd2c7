"""The holder protocol: what holderd does with each request, without any I/O.

Theory of operation
-------------------
holderd keeps duplicates of other processes' file descriptors so that they
outlive the process that made them. Each held descriptor has a *name* and a
small opaque *metadata* blob, and belongs to the uid of the peer that stored it:
a uid sees and touches only its own names.

Requests and replies are frames (see :mod:`fdkeep.frames`) whose JSON bodies are
described in ``holderd/PROTOCOL.md``. :class:`HolderCore` turns one request
(the peer's uid, the frame's body and descriptors) into its :class:`Replies`:
the reply frames (bodies and descriptors to send), which the caller takes one
at a time, when it has room to send them. It owns the held descriptors: it
closes the ones it drops and those of a request it refuses, so a caller never
has to.

The core tells a :class:`Watcher` when a descriptor starts and stops being
held, so that the daemon can watch held sockets for a hang-up (and drop them,
as systemd's own store does) and mirror them elsewhere, without the core
knowing how.

Replies that carry descriptors carry fresh duplicates: the caller sends and
closes them, and a held descriptor dropped meanwhile can never be confused with
a new one that reused its number.

``RETRIEVE`` and ``LIST`` answer in chunks (:class:`Chunks`), and a chunk is
made only when it is taken: :meth:`Replies.take` is given the room the caller
has for fds (what its peer may still have unread), and a RETRIEVE chunk
duplicates that many fds at most, from the names selected, as they are held
*then* (a name dropped since is skipped; one replaced gives its new fd). So a
RETRIEVE of everything never needs more free fds than one chunk's, whatever is
held, and a peer that reads no replies makes holderd duplicate no more than
its caller lets it. Duplicating leaves :attr:`Limits.fd_reserve` fds free
(room to accept clients and take STOREs meanwhile): the last duplicates are
given back if fewer would be left, and a chunk is cut short rather than fail;
with no fd to spare at all, :meth:`Replies.take` says so (None) and the caller
waits for fds to be freed, or ends the replies with ``no-resources``
(:meth:`Replies.fail`).

*Leases* let two processes of one uid take turns (chatd and its warm
standby): ``LEASE`` grants a name to the first connection that asks; the others
queue. A lease belongs to a connection, held while the connection and the
process that opened it both live: when the daemon finds either gone (the
kernel closed the socket, or the process exited while a child of it keeps the
socket), it says so once, and :meth:`HolderCore.peer_gone` hands the lease to
the next in the queue and says whom to tell, at once.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections import deque
from dataclasses import dataclass, field

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.frames import BATCH_BYTES, MAX_FDS_PER_FRAME, item_size

PROTOCOL_VERSION = 1
OPERATIONS = ("PING", "STORE", "RETRIEVE", "REMOVE", "LIST", "LEASE")
#: Items in one LIST chunk, at most.
LIST_CHUNK = 1000


@dataclass(frozen=True)
class Limits:
    """Every bound of holderd, with its default; ``holderd --help`` and
    ``holderd/PROTOCOL.md`` name the option and the error of each."""

    # Checked by the core: what a uid may have held, and what an item may be.
    max_fds_per_uid: int = 65536
    max_meta_bytes: int = 4096
    max_name_bytes: int = 200
    #: fds that duplicating for RETRIEVE leaves free, for accepting and taking STOREs meanwhile.
    fd_reserve: int = 64
    # Checked by the daemon: what one peer, and one uid over all its connections,
    # may make holderd keep while it serves them.
    max_connections_per_uid: int = 256
    #: fds of replies a peer, or a uid, has not read (queued in holderd or in flight in its socket).
    max_unread_fds_per_peer: int = 1024
    max_unread_fds_per_uid: int = 4096
    #: What a uid's connections keep parked in holderd: received, not yet a whole frame.
    max_parked_bytes_per_uid: int = 8 << 20
    max_parked_fds_per_uid: int = 1024
    #: Seconds a frame begun may take to arrive whole.
    frame_timeout: float = 10.0


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


class Replies:
    """The reply frames to one request, in order, taken one at a time as the caller
    has room to send them; iterating takes them all (with room for every fd)."""

    def __init__(self, request_id, replies: list[Reply] = ()):
        self.request_id = request_id
        self._ready = deque(replies)

    @property
    def done(self) -> bool:
        return not self._ready

    def take(self, fd_room: int = MAX_FDS_PER_FRAME) -> Reply | None:
        """The next reply, carrying at most ``fd_room`` fds; None if it needs fds and
        none can be made now (``fd_room`` is 0, or holderd has no fd to spare)."""
        return self._ready.popleft()

    def fail(self, error: Error) -> Reply:
        """End the replies with ``error`` instead of what is left of them."""
        self._ready.clear()
        return Reply(error.as_reply(self.request_id))

    def __iter__(self):
        while not self.done:
            reply = self.take()
            yield reply if reply is not None else self.fail(out_of_fds())


def out_of_fds() -> Error:
    return Error("no-resources", "holderd has no fds to spare for duplicates now; retry later, "
                 "retrieve fewer items at once, or raise holderd's LimitNOFILE")


class Chunks(Replies):
    """A RETRIEVE's or a LIST's replies: the selected names in chunks, each made from
    what is held when it is taken (a RETRIEVE's duplicates too)."""

    def __init__(self, core: "HolderCore", uid: int, request_id, names: list[str], with_fds: bool):
        super().__init__(request_id)
        self._core = core
        self._uid = uid
        self._names = names
        self._with_fds = with_fds
        self._next = 0  # the first name not in a chunk yet
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def take(self, fd_room: int = MAX_FDS_PER_FRAME) -> Reply | None:
        most = min(fd_room, MAX_FDS_PER_FRAME) if self._with_fds else LIST_CHUNK
        if most <= 0:
            return None
        held_now = self._core._names.get(self._uid, {})
        chunk: list[tuple[int, Held]] = []  # (position in names, what is held under it)
        position, used = self._next, 0
        while position < len(self._names) and len(chunk) < most:
            held = held_now.get(self._names[position])
            if held is not None:
                size = _reply_size(held)
                if chunk and used + size > BATCH_BYTES:
                    break
                chunk.append((position, held))
                used += size
            position += 1
        fds = []
        if self._with_fds and chunk:
            fds = self._core._duplicate([held.fd for _, held in chunk])
            if not fds:
                return None
            if len(fds) < len(chunk):
                position = chunk[len(fds)][0]  # the rest in a later chunk
                chunk = chunk[:len(fds)]
        self._next = position
        self._done = position >= len(self._names)
        if self._with_fds:
            items = [{"name": h.name, "meta": _b64(h.meta), "ino": h.ino} for _, h in chunk]
        else:
            items = [h.describe() for _, h in chunk]
        return Reply({"id": self.request_id, "ok": True, "items": items, "more": not self._done}, fds)

    def fail(self, error: Error) -> Reply:
        self._done = True
        return super().fail(error)


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
        #: (uid, lease name) -> how often the lease passed from a holder gone to a waiter (a takeover).
        self.leases_passed: dict[tuple[int, str], int] = {}

    # -- queries used by the daemon -------------------------------------------------
    def count(self, uid: int | None = None) -> int:
        if uid is None:
            return sum(len(names) for names in self._names.values())
        return len(self._names.get(uid, {}))

    def leases(self) -> list[tuple[int, str, bool, int]]:
        """(uid, lease name, whether someone holds it, how many wait for it), for the metrics."""
        keys = set(self._leases) | {key for key, waiting in self._waiting.items() if waiting}
        return [(uid, name, (uid, name) in self._leases, len(self._waiting.get((uid, name), ())))
                for uid, name in sorted(keys)]

    def held_items(self):
        """Every (uid, Held) pair, for the daemon's own backup."""
        for uid, names in self._names.items():
            for held in names.values():
                yield uid, held

    # -- the requests -----------------------------------------------------------------
    def handle(self, uid: int, body: dict, fds: list[int], peer: int = 0) -> Replies:
        """The replies to one request of connection ``peer`` (any number the caller keeps
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
            answer = handler(uid, body, fds)
        except Error as exc:
            close_fds(fds)
            return Replies(request_id, [Reply(exc.as_reply(request_id))])
        if isinstance(answer, Replies):
            return answer
        return Replies(request_id, [Reply({"id": request_id, "ok": True, **answer})])

    def _op_ping(self, uid, body, fds):
        return {"version": PROTOCOL_VERSION, "held": self.count(uid), "uid": uid}

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
            if old is not None and old.ino == ino and kind == old.kind == "socket":
                # The same socket again (a client re-stores after a change):
                # keep the fd held, take the new metadata. Only a socket's inode
                # is its own (sockfs gives each one); every eventfd or epoll fd
                # shares one anon inode, and files on two filesystems may share a
                # number: those are always taken as new.
                close_fds([fd])
                if old.meta != meta:
                    old.meta = meta
                    self.watcher.updated(uid, old)
                continue
            self._hold(uid, Held(name, meta, fd, ino, kind))
        return {"stored": len(parsed)}

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
        # Characters first: any JSON string may arrive, a lone surrogate too, which
        # no encoding takes. Printable ASCII has one byte a character.
        if len(name) > self.limits.max_name_bytes:
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
        return Chunks(self, uid, body.get("id"), [h.name for h in self._selected(uid, body)], with_fds=True)

    def _op_list(self, uid, body, fds):
        return Chunks(self, uid, body.get("id"), [h.name for h in self._selected(uid, body)], with_fds=False)

    def _duplicate(self, fds: list[int]) -> list[int]:
        """Duplicates of the first of ``fds``: as many as can be made leaving ``fd_reserve`` fds free."""
        reserve = self.limits.fd_reserve
        made = []
        # Duplicate all, then ``reserve`` more to see that they would be free, and
        # give those back: exact, where counting the free fds would cost a walk of
        # /proc/self/fd, as long as what is held.
        for fd in fds + fds[:1] * reserve:
            try:
                made.append(os.dup(fd))
            except OSError:
                break
        kept = max(min(len(made) - reserve, len(fds)), 0)
        close_fds(made[kept:])
        return made[:kept]

    def _op_remove(self, uid, body, fds):
        if "names" not in body and "prefix" not in body:
            raise Error("bad-request", "REMOVE needs 'names' (a list) or 'prefix'")
        selected = self._selected(uid, body)
        for held in selected:
            self._release(uid, held)
        return {"removed": len(selected)}

    def _op_lease(self, uid, body, fds):
        name = self._check_name(body.get("lease"))
        key = (uid, name)
        holder = self._leases.setdefault(key, self._peer)
        if holder == self._peer:
            return {"lease": name, "granted": True}
        waiting = self._waiting.setdefault(key, [])
        if self._peer not in waiting:
            waiting.append(self._peer)
        return {"lease": name, "granted": False, "waiting": waiting.index(self._peer) + 1}

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
                self.leases_passed[key] = self.leases_passed.get(key, 0) + 1
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
