"""A client's two rings in the journal: its input waiting to be handled, its output waiting to be sent.

Theory of operation
-------------------
Each ring is a view of the client's part of the journal's memfd (see
:mod:`chatd.journal`), addressed by stream offset: byte ``x`` of the stream
lives at ``x % size``. Both rings only ever move forward.

:class:`InRing` holds ``[handled, received)``: the kernel writes into it
directly (``recv_into``/``recvmsg_into`` of the free part, in two pieces when
it wraps), so a byte leaves the socket only to land in crash-surviving memory.
``received`` is what the kernel counts as read; ``handled`` moves on as
commands are handled and is committed with their effects. Until it is
committed, the bytes it passed over stay untouched: the room after them is
free only up to the committed ``handled``, so a crash finds them to handle again.

:class:`OutRing` holds ``[kept, end)``: events are encoded straight into it
(:meth:`OutRing.append`), and :meth:`OutRing.commit` marks everything appended
so far as committed (the journal record's ``out_end``, committed in the same
step). :meth:`OutRing.flush` sends committed bytes only, so nothing reaches a
client before the journal says it was to be sent; ``sent`` is what the kernel
counts as written. ``kept`` follows ``sent``, except for a client with a session
(:meth:`OutRing.retain`, :mod:`chatd.sessions`): written is not received, and a
connection cut loses what was in flight, so its output is kept until the client
says it has it (:meth:`OutRing.release_to`), and a resume sends again what it lacks.
The record's ``out_start`` is ``kept``.

:class:`Outbox` (across hosts only) holds ``[published, end)``: forwards to
members of other hosts, each a length-prefixed payload, appended and committed
like output, and given up only once the cluster acknowledged them
(:meth:`Outbox.published_to`, committed in a later step). After a crash, every
entry in the committed window is published again, in order.
"""

from __future__ import annotations

import socket
import struct


class RingFull(Exception):
    """What was to be appended does not fit the ring's free room: the reader takes too little
    (a distinct type, so that no other error, an encoder's bug among them, reads as this)."""


class InRing:
    def __init__(self, view: memoryview, handled: int = 0, received: int = 0):
        if not 0 <= received - handled <= len(view):
            raise ValueError(f"input window [{handled}, {received}) does not fit a ring of {len(view)}")
        self.view = view
        self.size = len(view)
        self.handled = handled
        self.received = received
        #: ``handled`` as the journal last committed it: bytes from here on may
        #: be needed again after a crash, so only the room before it is free.
        self.committed = handled

    @property
    def free(self) -> int:
        return self.size - (self.received - self.committed)

    def receive(self, sock: socket.socket, limit: int = 65536) -> int:
        """One read from ``sock`` straight into the ring; the count (0 at EOF). Raises OSError."""
        want = min(self.free, limit)
        if want <= 0:
            raise ValueError("the input ring is full")
        start = self.received % self.size
        first = self.view[start:min(self.size, start + want)]
        if len(first) == want:
            count = sock.recv_into(first)
        else:
            count = sock.recvmsg_into([first, self.view[:want - len(first)]])[0]
        self.received += count
        return count

    def bytes(self, start: int, end: int) -> bytes:
        """A copy of stream bytes [start, end), which must lie in the ring's window."""
        if not self.handled <= start <= end <= self.received:
            raise ValueError(f"[{start}, {end}) is not in the window [{self.handled}, {self.received})")
        a, b = start % self.size, end - start
        if a + b <= self.size:
            return bytes(self.view[a:a + b])
        return bytes(self.view[a:]) + bytes(self.view[:b - (self.size - a)])

    def consume(self, upto: int) -> None:
        """Bytes before ``upto`` are handled: their room is free again."""
        if not self.handled <= upto <= self.received:
            raise ValueError(f"cannot consume up to {upto}: the window is [{self.handled}, {self.received})")
        self.handled = upto


class OutRing:
    def __init__(self, view: memoryview, sent: int = 0, end: int = 0, kept: int | None = None):
        """``kept``: where a session's kept output begins (at most ``sent``); None: no session."""
        retaining, kept = kept is not None, sent if kept is None else kept
        if not 0 <= sent - kept <= end - kept <= len(view):
            raise ValueError(f"output window [{kept}, {sent}, {end}) does not fit a ring of {len(view)}")
        self.view = view
        self.size = len(view)
        self.sent = sent
        self.end = end
        self.committed = end
        #: Output before this is given up; ``sent`` itself unless the output is retained.
        self.kept = kept
        self.retaining = retaining
        #: ``kept`` as the journal last committed it: a crash goes back to it, so with a
        #: session the room before it only is free (as InRing's ``committed``).
        self.kept_committed = kept

    @property
    def pending(self) -> int:
        """Bytes appended and not yet sent (committed or not)."""
        return self.end - self.sent

    @property
    def free(self) -> int:
        return self.size - (self.end - (self.kept_committed if self.retaining else self.kept))

    def __bool__(self) -> bool:
        return self.committed > self.sent

    def retain(self) -> None:
        """Keep what is sent from now on until :meth:`release_to` gives it up (a session)."""
        self.retaining = True

    def release_to(self, offset: int) -> None:
        """The client has everything before ``offset`` (at most what was sent): its room is free."""
        if not self.kept <= offset <= self.sent:
            raise ValueError(f"cannot release up to {offset}: [{self.kept}, {self.sent}) is kept")
        self.kept = offset

    def kept_bytes(self) -> bytes:
        """A copy of the kept output ``[kept, end)``, sent or not."""
        a, b = self.kept % self.size, self.end - self.kept
        if a + b <= self.size:
            return bytes(self.view[a:a + b])
        return bytes(self.view[a:]) + bytes(self.view[:b - (self.size - a)])

    def append(self, data: bytes) -> None:
        if len(data) > self.free:
            raise RingFull(f"{len(data)} bytes do not fit the {self.free} free in the output ring")
        a = self.end % self.size
        first = min(len(data), self.size - a)
        self.view[a:a + first] = data[:first]
        if first < len(data):
            self.view[:len(data) - first] = data[first:]
        self.end += len(data)

    def commit(self) -> bool:
        """All appended bytes may be sent now; True if there were new ones."""
        new = self.end > self.committed
        self.committed = self.end
        self.kept_committed = self.kept
        return new

    def flush(self, sock: socket.socket) -> bool:
        """Send committed bytes; True once all are sent. Raises OSError."""
        while self.sent < self.committed:
            a, b = self.sent % self.size, self.committed - self.sent
            try:
                if a + b <= self.size:
                    count = sock.send(self.view[a:a + b])
                else:
                    count = sock.sendmsg([self.view[a:], self.view[:b - (self.size - a)]])
            except (BlockingIOError, InterruptedError):
                return False
            self.sent += count
            if not self.retaining:
                self.kept = self.sent
            if count < b:
                return False
        return True

    def clear(self) -> None:
        """Give up on what is unsent (the client is gone)."""
        self.sent = self.committed = self.end
        if not self.retaining:
            self.kept = self.sent


class Outbox:
    ENTRY = struct.Struct("<I")

    def __init__(self, view: memoryview, published: int = 0, end: int = 0):
        if not 0 <= end - published <= len(view):
            raise ValueError(f"outbox window [{published}, {end}) does not fit a ring of {len(view)}")
        self.view = view
        self.size = len(view)
        self.published = published
        self.end = end
        self.committed = end

    @property
    def free(self) -> int:
        return self.size - (self.end - self.published)

    def __bool__(self) -> bool:
        return self.committed > self.published

    def append(self, payload: bytes) -> int:
        """Add an entry; its stream offset. Raises :class:`RingFull` if it does not fit."""
        entry = self.ENTRY.pack(len(payload)) + payload
        if len(entry) > self.free:
            raise RingFull(f"{len(entry)} bytes do not fit the {self.free} free in the outbox")
        start = self.end
        a = start % self.size
        first = min(len(entry), self.size - a)
        self.view[a:a + first] = entry[:first]
        if first < len(entry):
            self.view[:len(entry) - first] = entry[first:]
        self.end += len(entry)
        return start

    def commit(self) -> None:
        self.committed = self.end

    def _read(self, start: int, count: int) -> bytes:
        a = start % self.size
        if a + count <= self.size:
            return bytes(self.view[a:a + count])
        return bytes(self.view[a:]) + bytes(self.view[:count - (self.size - a)])

    def entries(self, start: int | None = None, *, uncommitted: bool = False) -> list[tuple[int, int, bytes]]:
        """(start, end, payload) of each committed entry (``uncommitted``: and those appended
        since the last commit, which a member that goes in this turn leaves too) from ``start``
        (default: the first not yet published) on."""
        offset = self.published if start is None else start
        last = self.end if uncommitted else self.committed
        found = []
        while offset < last:
            (length,) = self.ENTRY.unpack(self._read(offset, self.ENTRY.size))
            end = offset + self.ENTRY.size + length
            if end > last:
                raise ValueError(f"the outbox entry at {offset} runs past the end {last}")
            found.append((offset, end, self._read(offset + self.ENTRY.size, length)))
            offset = end
        return found

    def published_to(self, end: int) -> None:
        """Entries before ``end`` are acknowledged by the cluster: their room is free (once committed)."""
        if not self.published <= end <= self.committed:
            raise ValueError(f"cannot publish up to {end}: the window is [{self.published}, {self.committed})")
        self.published = end
