"""Bundles: many descriptors kept in flight inside one UNIX socketpair, so a holder keeps two fds, not thousands.

Theory of operation
-------------------
A descriptor sent over a UNIX socket (SCM_RIGHTS) and not yet received is *in
flight*: the kernel keeps the open file referenced by the message queued on
the receiving end. So a socketpair whose writer has sent many descriptors to a
reader that never takes them holds them all, for as long as either end of the
pair is open anywhere. Give the two ends to a holder (holderd, systemd's fd
store) and it keeps every descriptor in the bundle, under two names, whatever
the count. systemd then compares two fds with its store, not thousands, and
hands the next process two names, not thousands (its ``LISTEN_FDNAMES`` is one
environment string, capped at 128 KiB).

A :class:`Bundle` appends *entries*: a 64-bit key and a descriptor each, packed
up to 253 descriptors a message (SCM_RIGHTS' limit). Each message is framed (a
header: magic, entry count, payload length) so it can be parsed without
trusting the stream's boundaries; the magic names the layout's version
(:data:`VERSION` 1). :meth:`Bundle.read` walks every message
*without consuming it*: ``SO_PEEK_OFF`` set to 0, then ``recvmsg(MSG_PEEK)``
until the queue is exhausted, which duplicates each descriptor into the
reader's process and leaves the queue as it was. So reading a bundle back
after a crash loses nothing even if the reader crashes in the middle, and the
same bundle can be read again and again. Appending is one ``sendmsg`` to a
local socket: no round trip to anyone.

Limits to respect, from the kernel:

- the queue is charged to the writer's send buffer (``SO_SNDBUF``, capped by
  ``net.core.wmem_max``: about 200 KB on a stock system, some 1 KB a message),
  so :meth:`Bundle.append` raises :class:`BlockingIOError` when it is full and
  the owner builds a fresh bundle with the live entries packed 253 a message;
- descriptors in flight count against the sending user's ``RLIMIT_NOFILE``
  (``ETOOMANYREFS`` past it): a bundle's owner needs a limit above what it
  keeps, with room for a fresh bundle while the old one still exists;
- a descriptor closed on purpose still sits in the queue: its owner shuts the
  socket down (so the peer sees the end at once), forgets its key, and builds a
  fresh bundle once the dead are many (:class:`Shard`);
- a bundle replaced by a fresh one is :meth:`drained <Bundle.drain>` once its
  successor is kept everywhere: any holder that still keeps a copy of the old
  pair (until it forgets it) would otherwise keep its queue, and its fds in
  flight, alive.

:class:`Shard` is one bundle with that bookkeeping: which keys are live, how
many are dead, when to rebuild. How the ends reach the holders, and in which
order (store the new, then remove the old, so a crash in between leaves a
complete bundle held), is the owner's job.
"""

from __future__ import annotations

import socket
import struct

from .fdpass import MAX_FDS, close_fds, recv_with_fds

SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)
MESSAGE = struct.Struct("<HHI")  # magic, entry count, payload bytes
MAGIC = 0xB0DE
#: The message layout's version (docs/formats.md): 1, named by :data:`MAGIC` itself. A new
#: layout takes a new magic, so that a release that does not know it refuses the message.
VERSION = 1
KEY = struct.Struct("<Q")
#: A send buffer this large holds a few hundred one-entry messages, or tens of
#: thousands of entries packed; the kernel caps it at net.core.wmem_max.
SEND_BUFFER = 4 << 20


def _ask_for_send_buffer(sock: socket.socket) -> None:
    for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
        except OSError:
            continue  # SO_SNDBUFFORCE needs CAP_NET_ADMIN: the plain one is capped, but works


class Bundle:
    def __init__(self, writer: socket.socket, reader: socket.socket):
        self.writer = writer
        self.reader = reader
        writer.setblocking(False)

    @classmethod
    def create(cls) -> "Bundle":
        writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        _ask_for_send_buffer(writer)
        return cls(writer, reader)

    @classmethod
    def from_fds(cls, writer_fd: int, reader_fd: int) -> "Bundle":
        """A bundle kept by a holder: its two ends, which become this object's."""
        return cls(socket.socket(fileno=writer_fd), socket.socket(fileno=reader_fd))

    def append(self, entries: list[tuple[int, int]]) -> None:
        """Put (key, fd) entries in flight; the fds stay the caller's. Raises BlockingIOError
        when the queue is full (nothing of the message that failed was sent)."""
        for start in range(0, len(entries), MAX_FDS):
            chunk = entries[start:start + MAX_FDS]
            payload = b"".join(KEY.pack(key) for key, _ in chunk)
            data = MESSAGE.pack(MAGIC, len(chunk), len(payload)) + payload
            sent = socket.send_fds(self.writer, [data], [fd for _, fd in chunk])
            if sent != len(data):  # a stream may take part of a message: never with room for it all
                raise OSError(f"a bundle message was cut short ({sent} of {len(data)} bytes)")

    def read(self) -> list[tuple[int, int]]:
        """Duplicates of every (key, fd) in flight, oldest first; the queue stays as it was.
        The caller owns the fds."""
        return self.read_from(0)[0]

    def read_from(self, offset: int) -> tuple[list[tuple[int, int]], int]:
        """Duplicates of the (key, fd) entries appended since byte ``offset`` of the queue, and
        the offset after them: a reader that keeps it reads only what is new next time. The
        queue stays as it was (``SO_PEEK_OFF`` is the socket's, shared by every duplicate of
        it: one reader at a time)."""
        self.reader.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, offset)
        entries: list[tuple[int, int]] = []
        try:
            while True:
                try:
                    data, fds = recv_with_fds(self.reader, MESSAGE.size + MAX_FDS * KEY.size,
                                              socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    return entries, offset
                if not data:
                    close_fds(fds)
                    return entries, offset
                entries += self._parse(data, fds)
                offset += len(data)
        except BaseException:
            close_fds(fd for _, fd in entries)
            raise

    @staticmethod
    def _parse(data: bytes, fds: list[int]) -> list[tuple[int, int]]:
        magic, count, length = MESSAGE.unpack_from(data)
        if magic != MAGIC or count != len(fds) or len(data) < MESSAGE.size + length or length != count * KEY.size:
            close_fds(fds)
            raise OSError(f"a bundle message does not parse (magic {magic:#x}, {count} entries, {len(fds)} fds)")
        keys = [KEY.unpack_from(data, MESSAGE.size + index * KEY.size)[0] for index in range(count)]
        return list(zip(keys, fds))

    def drain(self) -> int:
        """Take everything out of the queue and close it; how many fds that was.

        For a bundle being replaced, once its successor is kept everywhere: a
        holder may still keep a copy of the old pair for a while (holderd's own
        backup drops it only when it rebuilds), and whatever is queued in it
        would stay in flight meanwhile, counted against the sender's limit."""
        drained = 0
        while True:
            try:
                data, fds = recv_with_fds(self.reader, MESSAGE.size + MAX_FDS * KEY.size, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return drained
            close_fds(fds)
            drained += len(fds)
            if not data:
                return drained

    def fds(self) -> tuple[int, int]:
        return self.writer.fileno(), self.reader.fileno()

    def detach(self) -> None:
        """Let go of the two fds without closing them (they are someone else's to close)."""
        self.writer.detach()
        self.reader.detach()

    def close(self) -> None:
        self.writer.close()
        self.reader.close()


class Shard:
    """A bundle and what is in it: the live keys, and how much is dead weight.

    ``generation`` grows with each rebuild, so that the holders can tell the
    fresh bundle from the one it replaces (both are held for a moment).
    """

    #: Rebuild once the dead reach this many and a quarter of the live: they are in flight,
    #: and count against the owner's fd limit like the live.
    MIN_DEAD = 32

    def __init__(self, number: int, bundle: Bundle, generation: int, live: dict[int, int] | None = None):
        self.number = number
        self.bundle = bundle
        self.generation = generation
        #: key -> the fd it was appended with (the caller's, kept open by the caller).
        self.live: dict[int, int] = dict(live or {})
        self.dead = 0
        #: Messages in the queue: each costs the reader a call and the writer's buffer some 1 KB.
        self.messages = -(-len(self.live) // MAX_FDS)

    def add(self, entries: list[tuple[int, int]]) -> bool:
        """Append; False if the bundle is full (rebuild, then add again)."""
        try:
            self.bundle.append(entries)
        except BlockingIOError:
            return False
        self.live.update(entries)
        self.messages += -(-len(entries) // MAX_FDS)
        return True

    def forget(self, key: int) -> None:
        if self.live.pop(key, None) is not None:
            self.dead += 1

    def worth_rebuilding(self) -> bool:
        return self.dead >= self.MIN_DEAD and 4 * self.dead > len(self.live)

    def worth_packing(self) -> bool:
        """Many small messages (one per append): a rebuild packs them 253 a message."""
        return self.messages > 2 * -(-len(self.live) // MAX_FDS) + 32

    def rebuilt(self) -> "Shard":
        """A fresh shard with the live entries packed; the caller stores it, then drops this one."""
        fresh = Shard(self.number, Bundle.create(), self.generation + 1)
        try:
            fresh.bundle.append(sorted(self.live.items()))
        except BaseException:
            fresh.bundle.close()
            raise
        fresh.live = dict(self.live)
        fresh.messages = -(-len(fresh.live) // MAX_FDS)
        return fresh
