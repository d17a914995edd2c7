"""Serving a kept socket again: at once where work waits, the idle ones in the next turns.

Theory of operation
-------------------
A restore (:mod:`chatd.restore`) finds every client socket the holders kept and
the journal record that belongs to it (same slot, same inode). Serving one again
(:func:`take_back`) costs some 30 µs of Python: the kernel's counts of what was
read and written on it, a :class:`~chatd.connection.Connection`, its rings, its
place in the loop. At 10,000 clients that is 300 ms in which nobody is served,
though almost every one of those clients is idle and waits for nothing.

So a restore serves at once only what has work: the socket whose command the dead
chatd died handling, one whose record says it was closing, any socket the kernel
says has bytes to read, and the partner of each of those (its answer goes there).
Every other socket *waits* in :class:`Adoption`: its member is in the room from
its record (so nicks and pairs are whole from the first turn), its slot in the
journal and its fd in its bundle, but it has no connection yet. It is adopted:

- **when it has input**: each waiting fd is in the adoption's own epoll set, and
  that set in the loop; a readable one is served in the turn that sees it;
- **when someone needs it**: the room delivers to it, or a sender asks whether
  its output ring has room (:meth:`chatd.server.ChatServer.connection`);
- **in the background**: the ones whose record says output may be left unsent
  first, until none waits (``chatctl status``:
  ``adopting``, and the restore's ``all_adopted_ms``), :data:`TURN_BUDGET` of
  each turn at most, so a client that does have work waits no longer for it;
- **all at once** before anything that looks at every client (a drain, the cluster).

What is decided at adoption is what the restore would have decided: the kernel's
counts against the record's windows, the bytes in flight finished, never
repeated. A socket that turns out dead is let go as any client that left while
no chatd ran.

Limits: input the dead chatd read but had not handled, on an otherwise idle
socket, is found only when that socket's turn in the background comes (the
kernel's counts are what tell it, one syscall a socket); at 10,000 clients, within
the few hundred ms the background adoption takes.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from typing import TYPE_CHECKING, Any, Protocol

from fdkeep.loop import IN
from fdkeep.tcpcount import CLOSE_WAIT, ESTABLISHED, stream_positions
from fdkeep.text import plural

from .lastwords import HUNG, KILLED, Dying
from .protocols import codec_for
from .records import CLOSING, Record, member_of
from .room import Member

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("chatd")

#: How long (s) a loop turn spends adopting in the background: a client with work, whose
#: events wait for the turn to end, is held up no longer than this.
TURN_BUDGET = 0.002


class Served(Protocol):
    """What adopting a socket uses of the server that owns the connections (chatd.server.ChatServer
    is one): its loop, journal and connections, and the one way each kind of change is made."""

    loop: Any  # fdkeep.loop.Loop
    journal: Any  # chatd.journal.Journal
    connections: dict[int, "Connection"]
    replay: bool
    restore_summary: dict | None

    def adopt(self, sock: socket.socket, member_id: int, record: Record | None = None, read: int = 0,
              written: int = 0, inode: int | None = None) -> "Connection": ...
    def take_input(self, connection: "Connection") -> None: ...
    def let_go(self, member_id: int, reason: str) -> None: ...


class Adoption:
    """The restored sockets not served yet, and the one way each comes to be served."""

    def __init__(self, server: Served):
        self.server = server
        #: slot -> (fd, record, inode) of each waiting socket.
        self._waiting: dict[int, tuple[int, Record, int]] = {}
        self._by_fd: dict[int, int] = {}
        self._epoll: select.epoll | None = None
        self._registered: dict[int, int] = {}  # fd -> inode, in the epoll set before begin()
        #: Adopted because another needed them (:meth:`adopt`): their input is taken next turn.
        self._unread: set[int] = set()
        self._order: list[int] | None = None  # the background's order, made at its first turn
        #: The command the dead chatd died handling, and how it died (chatd.lastwords), or None.
        self._dying: Dying | None = None
        self._began = 0.0
        self.in_flight = [0, 0]  # bytes read and not handled, committed and not sent: found so far
        #: When the last waiting socket was adopted (time.monotonic()), once none waits.
        self.done_at: float | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, slot: int) -> bool:
        return slot in self._waiting

    # -- during the restore ------------------------------------------------------------
    def begin(self, dying: Dying | None, began: float,
              prepared: "tuple[select.epoll, dict[int, int]] | None" = None) -> None:
        """A restore begins: ``dying`` the marker it found (and how the chatd before died),
        ``prepared`` a standby's epoll set and the inodes of the fds already in it (chatd.prepared)."""
        self._dying, self._began = dying, began
        if prepared is not None:
            self._epoll, self._registered = prepared
        else:
            self._epoll, self._registered = select.epoll(), {}

    def can_wait(self, slot: int, record: Record | None, fd: int) -> bool:
        """Whether this socket may wait (it is its record's, and nothing about it is urgent):
        if so it now waits here, else the caller serves it at once (:func:`take_back`)."""
        inode = self._registered.pop(fd, None)
        registered = inode is not None
        if inode is None:
            try:
                inode = os.fstat(fd).st_ino
            except OSError:
                inode = None
        if (record is None or inode != record.inode or slot in self._waiting or record.flags & CLOSING
                or (self._dying and self._dying.slot == slot)):
            if registered:
                self._epoll.unregister(fd)  # served at once, in the loop's own set
            return False
        if not registered:
            try:
                self._epoll.register(fd, IN)
            except OSError:
                return False
        self._waiting[slot] = (fd, record, inode)
        self._by_fd[fd] = slot
        return True

    def with_input(self) -> list[int]:
        """The waiting slots the kernel says have bytes to read (or an end), now."""
        return [self._by_fd[fd] for fd, _ in self._epoll.poll(0) if fd in self._by_fd]

    def start(self) -> None:
        """Adopt the rest as the loop turns: when readable, when needed, and in the background."""
        for fd in self._registered:  # handed out by a standby, and not in any bundle read
            self._epoll.unregister(fd)
        self._registered = {}
        if not self._waiting:
            self._finished()
            return
        self.server.loop.add(self._epoll.fileno(), IN, self._readable)
        self.server.loop.call_later(0, self._background)

    # -- adopting ----------------------------------------------------------------------
    def adopt(self, slot: int) -> "Connection | None":
        """Serve this waiting socket now; its connection, or None if it was dead (let go)."""
        fd, record, inode = self._waiting.pop(slot)
        del self._by_fd[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:
            pass
        taken = take_back(self.server, slot, socket.socket(fileno=fd), record, None, self.in_flight, inode)
        if taken is None:
            self.server.let_go(slot, "its socket is gone (it left while no chatd served)")
            return None
        # Needed by another member's command, it may hold input of its own that the dead chatd
        # read and had not handled: taken in a turn of its own, not inside that command.
        if not self._unread:
            self.server.loop.call_later(0, self._take_unread)
        self._unread.add(slot)
        return self.server.connections.get(slot)

    def codec_of(self, slot: int):
        """A waiting socket's codec, as adopting it would make it; None if it does not wait. A
        child process that tries a command encodes its events with it (chatd.trial)."""
        waiting = self._waiting.get(slot)
        if waiting is None:
            return None
        record = waiting[1]
        return codec_for(record.protocol, record.in_handled, record.codec)

    def adopt_all(self, why: str) -> None:
        if self._waiting:
            log.info("adopting the %s still waiting at once: %s", plural(len(self._waiting), "client"), why)
        for slot in list(self._waiting):
            if slot in self._waiting:  # not adopted meanwhile, as the peer of one served before it
                self._serve(slot)

    def _serve(self, slot: int) -> None:
        connection = self.adopt(slot)
        if connection is not None:
            self._unread.discard(slot)
            self.server.take_input(connection)  # what the dead chatd had read and not handled
        if not self._waiting:
            self._finished()

    def _take_unread(self) -> None:
        unread, self._unread = self._unread, set()
        for slot in sorted(unread):
            connection = self.server.connections.get(slot)
            if connection is not None and not connection.closed:
                self.server.take_input(connection)

    def _readable(self, mask: int) -> None:
        for fd, _ in self._epoll.poll(0):
            slot = self._by_fd.get(fd)
            if slot is not None:
                self._serve(slot)

    def _background(self) -> None:
        if self._order is None:  # output a crash may have left unsent first: those clients wait for it
            waiting = self._waiting
            self._order = sorted(waiting, key=lambda slot: waiting[slot][1].out_end <= waiting[slot][1].out_start,
                                 reverse=True)  # popped from the end
        until = time.monotonic() + TURN_BUDGET
        while self._order and time.monotonic() < until:
            slot = self._order.pop()
            if slot in self._waiting:
                self._serve(slot)
        if self._waiting:
            self.server.loop.call_later(0, self._background)

    def _finished(self) -> None:
        if self.done_at is not None:
            return
        self.done_at = time.monotonic()
        if self._epoll is not None:
            if self.server.loop.watching(self._epoll.fileno()):
                self.server.loop.remove(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        summary = self.server.restore_summary
        if summary is not None:
            summary["all_adopted_ms"] = round((self.done_at - self._began) * 1000, 2)
            # The restore counted what was in flight by then (chatd.tally); the rest came with those adopted since.
            tally = self.server.journal.tally
            tally.add("input_replayed_bytes", self.in_flight[0] - summary["input_replayed"])
            tally.add("output_resent_bytes", self.in_flight[1] - summary["output_resent"])
            summary["input_replayed"], summary["output_resent"] = self.in_flight
        log.info("all %s adopted, %s ms after the restore began (in flight: %s read and not handled, %s "
                 "committed and not sent)", plural(len(self.server.connections), "client"),
                 summary and summary["all_adopted_ms"], plural(self.in_flight[0], "byte"),
                 plural(self.in_flight[1], "byte"))


def take_back(server: Served, slot: int, sock: socket.socket, record: Record | None, dying: Dying | None,
              in_flight: list[int], inode: int | None = None):
    """Serve a socket found in a bundle: its member, True for one with no place in the room
    (it said its last word), or None if it is not to be served (closed here)."""
    try:
        positions = stream_positions(sock)
        if inode is None:
            inode = os.fstat(sock.fileno()).st_ino
    except OSError as exc:
        log.warning("slot %d: cannot read its socket's counters (%s): dropping it", slot, exc)
        sock.close()
        return None
    if slot in server.connections:  # a second copy of a socket already served, or a dead one
        sock.close()
        return None
    if record is not None and record.inode == inode:
        if dying is not None and dying.slot == slot and _count_the_crash(slot, record, dying):
            server.journal.commit({slot: record})  # before handling it again, which may kill us too
        read, written = _in_flight(slot, record, positions.read, positions.written, server.replay,
                                   server.journal.in_size)
        in_flight[0] += read - record.in_handled
        in_flight[1] += record.out_end - written
        connection = server.adopt(sock, slot, record, read, written, inode)
        if dying is not None and dying.slot == slot and dying.death == HUNG:
            connection.hung_at = dying.offset  # tried in a child before it is handled (chatd.server)
        if record.flags & CLOSING:
            return True
        return member_of(slot, record)
    if positions.state not in (ESTABLISHED, CLOSE_WAIT) or record is not None or not server.journal.take(slot):
        # Shut down on purpose (closed by chatd), or its slot went to a newer socket.
        sock.close()
        return None
    # Kept right after its accept, before its first commit: a new client, nothing said yet.
    server.adopt(sock, slot, None, positions.read, positions.written, inode)
    log.info("member %d restored without a journal record (accepted just before the crash)", slot)
    return Member(slot)


def _count_the_crash(slot: int, record: Record, dying: Dying) -> bool:
    """Count the death against the command if the command may have caused it (chatd.lastwords):
    a crash; True if the record changed."""
    if dying.death == KILLED:
        log.warning("member %d: chatd died while handling its command at input offset %d, with %s: not "
                    "counted against the command, which is handled again", slot, dying.offset, dying.how)
        return False
    if dying.death == HUNG:
        log.warning("member %d: chatd died while handling its command at input offset %d, of %s (it had stopped "
                    "answering there): not counted; a child process tries the command before it is handled "
                    "again (it is skipped only if it hangs the child too)", slot, dying.offset, dying.how)
        return False
    if record.poison_offset == dying.offset:
        record.poison_count += 1
    else:
        record.poison_offset, record.poison_count = dying.offset, 1
    log.warning("member %d: chatd died while handling its command at input offset %d, of %s: %s there", slot,
                dying.offset, dying.how, "1 crash" if record.poison_count == 1 else f"{record.poison_count} crashes")
    return True


def _in_flight(slot: int, record: Record, read: int, written: int, replay: bool, in_size: int) -> tuple[int, int]:
    """Check the kernel's counts against the record's windows; (read, written) to resume from."""
    if not replay:
        record.in_handled, record.codec, record.out_end = read, b"", max(written, record.out_start)
    if not record.in_handled <= read <= record.in_handled + in_size:
        log.error("member %d: the kernel says %d bytes were read, the journal has input handled to %d: "
                  "resuming from the kernel's count", slot, read, record.in_handled)
        record.in_handled, record.codec = read, b""
    if not record.out_start <= written <= record.out_end:
        log.error("member %d: the kernel says %d bytes were written, the journal has output [%d, %d): "
                  "resuming from the kernel's count", slot, written, record.out_start, record.out_end)
        record.out_end = max(written, record.out_end) if written >= record.out_start else record.out_end
        written = min(max(written, record.out_start), record.out_end)
    return read, written
