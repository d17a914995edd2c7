"""One client's TCP connection: the one place where its bytes enter and leave chatd.

Theory of operation
-------------------
A :class:`Connection` owns a client socket, registered in the event loop, the
client's codec (:mod:`chatd.protocols`), and the client's two rings in the
journal (:mod:`chatd.rings`). Bytes are received straight into the input ring,
then fed to the codec; its owner (the server) takes commands from the codec one
at a time and moves ``inbox.handled`` on as it handles them. Events are encoded
by the same codec into the output ring, and sent from there once the journal has
committed them.

The connection knows nothing of the server: it tells its owner what happened
through three callbacks given to it, as :class:`~fdkeep.peer.FramePeer` does:
``on_input(connection)`` (new bytes, or the client's EOF: take its commands),
``on_output_moved(connection)`` (some output was sent: room for whoever waits on
it) and ``on_lost(connection, reason)`` (the socket failed or hung up).

**One state, its transitions in one place** (:data:`TRANSITIONS`):

=============  ===================================================================
``OPEN``       its commands are taken as they come
``BLOCKED``    an output ring a command may write to (its own, its peer's, its
               outbox to other hosts) has no room: its commands wait for room
``PARKED``     a command waits for the cluster's answer (a NICK being claimed, or
               a member restored paired across hosts waiting for the directory)
``FINISHING``  it said its last word (BYE): closed once its output is sent
``CLOSED``     shut down and closed
=============  ===================================================================

Beside the state, one fact: :attr:`input_ended` (the client's EOF was read). It
goes with ``OPEN``, ``BLOCKED`` and ``PARKED`` alike: what the client sent before
its EOF is still handled, and only then is it closed. Reading from the socket
follows from the state (:meth:`update_reading`): only an ``OPEN`` connection
whose input has not ended and whose input ring has room reads (and a ``BLOCKED``
one with a session, so that its ACKs come in: :mod:`chatd.sessions`); otherwise
TCP's own flow control slows the client down, and nothing is dropped.

:meth:`Connection.close` shuts the socket down before closing it: the holders
still have duplicates of it, and only ``shutdown()`` ends the TCP connection
for every duplicate at once, so the client sees its EOF now.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import socket
from typing import Callable

from fdkeep.peer import Channel
from fdkeep.loop import Loop

from . import faults
from .protocols import Codec, codec_for
from .records import CLOSING, Record
from .rings import InRing, OutRing, Outbox
from .room import Event

log = logging.getLogger("chatd")

READ_SIZE = 65536


class ConnectionState(enum.Enum):
    OPEN = "open"
    BLOCKED = "blocked"
    PARKED = "parked"
    FINISHING = "finishing"
    CLOSED = "closed"


OPEN, BLOCKED, PARKED, FINISHING, CLOSED = ConnectionState

#: Every legal change of state; anything else is a bug (:class:`StateError`).
TRANSITIONS: dict[ConnectionState, frozenset[ConnectionState]] = {
    OPEN: frozenset({BLOCKED, PARKED, FINISHING, CLOSED}),
    BLOCKED: frozenset({OPEN, FINISHING, CLOSED}),
    PARKED: frozenset({OPEN, FINISHING, CLOSED}),
    FINISHING: frozenset({CLOSED}),
    CLOSED: frozenset(),
}


class StateError(RuntimeError):
    """A change of state :data:`TRANSITIONS` does not allow: a bug in chatd, never the client's doing."""


class Connection(Channel):
    def __init__(self, loop: Loop, sock: socket.socket, member_id: int, codec: Codec, inbox: InRing,
                 outbox: OutRing, *, on_input: Callable[["Connection"], None],
                 on_output_moved: Callable[["Connection"], None],
                 on_lost: Callable[["Connection", str], None],
                 inode: int | None = None, forwards: Outbox | None = None, finishing: bool = False,
                 opening_timeout: float | None = None):
        self.member_id = member_id
        self.codec = codec
        self.inbox = inbox
        #: Across hosts: messages to members of other hosts, until the cluster has them.
        self.forwards = forwards
        self.inode = inode if inode is not None else os.fstat(sock.fileno()).st_ino
        self._state = FINISHING if finishing else OPEN
        #: The client's EOF was read: what it sent before is handled, then it is closed.
        self.input_ended = False
        #: Since when queued output waits for the client to take some (None: nothing waits).
        self.progress_at: float | None = None
        #: The input offset a predecessor crashed handling, and how many times (chatd.lastwords).
        self.poison_offset = 0
        self.poison_count = 0
        #: The input offset a predecessor hung handling (the watchdog killed it there), if one did:
        #: that command is tried in a child process before it is handled (chatd.server).
        self.hung_at: int | None = None
        #: The client's address, as counted against --max-per-address; "" if exempt (loopback)
        #: or not counted, None until known (a restored connection: learned soon after).
        self.address: str | None = None
        self._on_input = on_input
        self._on_output_moved = on_output_moved
        self._on_lost = on_lost
        super().__init__(loop, sock, outbox)
        self.update_reading()
        # A web client must finish its opening (the HTTP request) in time: its own deadline.
        self._opening_timeout = opening_timeout
        self._opening_deadline = loop.call_later(opening_timeout, self._opening_overdue) \
            if opening_timeout is not None and codec.opening else None

    @classmethod
    def from_record(cls, loop: Loop, sock: socket.socket, member_id: int, record: "Record",
                    rings: tuple[memoryview, memoryview, memoryview | None], read: int, written: int,
                    inode: int | None = None, **owner) -> "Connection":
        """A connection as its record and the journal's rings (input, output, outbox or None)
        keep it, resumed where the kernel says the dead process stopped: ``read`` and
        ``written`` are the socket's counts; what was read and not handled is fed again."""
        in_view, out_view, box_view = rings
        inbox = InRing(in_view, record.in_handled, read)
        outbox = OutRing(out_view, written, record.out_end, kept=record.out_start if record.token else None)
        forwards = Outbox(box_view, record.box_start, record.box_end) if box_view is not None else None
        codec = codec_for(record.protocol, record.in_handled, record.codec)
        if read > record.in_handled:
            codec.feed(inbox.bytes(record.in_handled, read))
        connection = cls(loop, sock, member_id, codec, inbox, outbox, inode=inode, forwards=forwards,
                         finishing=bool(record.flags & CLOSING), **owner)
        connection.poison_offset, connection.poison_count = record.poison_offset, record.poison_count
        return connection

    # -- the state ------------------------------------------------------------------------
    @property
    def state(self) -> ConnectionState:
        return CLOSED if self.closed else self._state

    def _to(self, new: ConnectionState) -> None:
        if new is self.state:
            return
        if new not in TRANSITIONS[self.state]:
            raise StateError(f"member {self.member_id}: {self.state.value} -> {new.value} is not a legal change")
        self._state = new
        self.update_reading()

    @property
    def takes_commands(self) -> bool:
        """Its commands may be handled now: it is neither parked, finishing nor closed
        (a blocked one is asked again: room may have come)."""
        return self.state in (OPEN, BLOCKED)

    @property
    def finishing(self) -> bool:
        return self.state is FINISHING

    @property
    def blocked(self) -> bool:
        return self.state is BLOCKED

    @property
    def parked(self) -> bool:
        return self.state is PARKED

    def open(self) -> None:
        """Take its commands again (room came, or the cluster answered)."""
        self._to(OPEN)

    def block(self) -> None:
        """Its commands wait for room in an output ring."""
        self._to(BLOCKED)

    def park(self) -> None:
        """A command of it waits for the cluster's answer."""
        self._to(PARKED)

    def finish(self) -> None:
        """It said its last word: read nothing more, close once its output is sent."""
        self._to(FINISHING)

    def input_done(self) -> bool:
        """Its EOF was read and no command of it waits for room: time to close it."""
        return self.input_ended and self.state in (OPEN, PARKED)

    def update_reading(self) -> None:
        """Read while it is OPEN, its input has not ended and its input ring has room (called
        on every change of state, and by the owner once a commit frees input ring room)."""
        # A session's client reads on while its commands wait for room: the room may be its own
        # ring's or its peer's, kept until an ACK that follows in its input (chatd.sessions).
        wanted = self.state is OPEN or (self.state is BLOCKED and self.outbox.retaining)
        self.set_reading(wanted and not self.input_ended and self.inbox.free > 0)

    # -- reports ------------------------------------------------------------------------
    @property
    def remote(self) -> str:
        try:
            return "%s:%d" % self.sock.getpeername()[:2]
        except OSError:
            return "?"

    @property
    def outbox(self) -> OutRing:
        return self.output

    def __repr__(self) -> str:
        return f"<member {self.member_id} from {self.remote}, {self.state.value}>"

    # -- bytes in -----------------------------------------------------------------------
    def _readable(self) -> None:
        if self.inbox.free == 0:
            self.update_reading()
            return
        try:
            count = self.inbox.receive(self.sock, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_lost(self, f"read failed: {exc.strerror}")
            return
        faults.reached("after-read")
        if count == 0:
            self.input_ended = True
        else:
            self.codec.feed(self.inbox.bytes(self.inbox.received - count, self.inbox.received))
        self._on_input(self)
        if not self.closed:
            self.update_reading()

    def _opening_overdue(self) -> None:
        self._opening_deadline = None
        if not self.closed and self.codec.opening:
            self._on_lost(self, f"sent no complete request in {self._opening_timeout:g} s")

    def _hung_up(self) -> None:
        self._on_lost(self, "the connection hung up")

    # -- bytes out ------------------------------------------------------------------------
    def send(self, event: Event) -> None:
        """Encode ``event`` into the output ring; it is sent once the journal commits it."""
        self.outbox.append(self.codec.encode(event))

    def flush(self) -> bool:
        """Send what the socket takes of the committed output; True once none is left."""
        return self._flush()

    def _flush(self) -> bool:
        # Channel's hook, called when the socket is writable too: the owner hears of progress.
        before = self.outbox.sent
        done = super()._flush()
        if self.closed:
            return True
        if self.outbox.sent > before:
            if not done:
                faults.reached("mid-write")
            self._on_output_moved(self)
        return done

    def _write_failed(self, exc: OSError) -> None:
        # The client is gone or going; its EOF or error on the read side closes it.
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("member %d: write failed: %s", self.member_id, exc)

    def close(self) -> None:
        if self.closed:
            return
        if self._opening_deadline is not None:
            self._opening_deadline.cancel()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().close()

