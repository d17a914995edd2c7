"""What a standby readies while it waits: the client sockets, their records, their members.

Theory of operation
-------------------
A takeover that starts from nothing reads every bundle (a duplicate of every
client socket, ~2 µs each), parses every journal record (~5 µs each) and makes
every member: at 10,000 clients some 100 ms in which nobody is served. None of
that needs the lease: the bundles can be read without being consumed
(``SO_PEEK_OFF``, :meth:`fdkeep.bundle.Bundle.read_from`) and the journal read
without being written (:class:`chatd.journal.JournalReader`). So a standby
(:mod:`chatd.standby`) does it while it waits, every :data:`REFRESH` seconds:

- it asks holderd for what it keeps for chatd (one round trip: the bundles'
  ends and the journal, some 80 fds, closed again at once);
- of each bundle it has read before it reads only what was appended since
  (the byte offset it stopped at), of a new one (a new shard, or a rebuild's
  new generation) everything; bundles holderd no longer keeps are let go;
- it keeps each client socket's duplicate, its inode, and its place in an
  epoll set of its own (nobody waits on that set while it stands by; at the
  takeover it tells at once which sockets have bytes to read);
- it reads the journal's records, parsing only those whose bytes changed.

**One reader at a time.** Reading a bundle without consuming it moves its
socket's peek offset, which every duplicate of the socket shares: two processes
reading one bundle at once would each skip or repeat what the other read. A
chatd reads the bundles in its restore and never again; it names itself the
journal's owner only once that is done. So a standby reads only while the
journal names a live owner (not while a chatd starts, takes over or hands over),
and the one taking over reads alone: the other instance, restarting, finds the
owner dead until the new one has restored.

At the takeover the restore (:mod:`chatd.restore`) still asks the holders for
everything, and takes from here only what it can prove current: a bundle whose
two ends are the very sockets read here (inodes), with what was appended since
read from the offset; a record whose bytes are exactly the current copy's. So a
standby that read a moment ago loses only time, never correctness.

The cost, measured: the standby holds one more fd per client, in its own
process (``RLIMIT_NOFILE`` is per process: the ceiling of clients does not move,
each chatd unit has the same limit and the server holds as many); the kernel
shares the socket itself, so the duplicate costs a file table entry and a few
hundred bytes of Python. A refresh at 10,000 idle clients takes a few ms.

At the ceiling of clients the standby holds as many sockets as the server,
and needs the same room besides (every bundle's two ends, its own fds) for the
takeover: it leaves a bundle unread (the takeover reads it) rather than hold a
socket more than that room allows.

Limits: the records read here are used only if unchanged at the takeover; a
busy standby whose refresh fails (holderd away, out of fds) gives up what it had
prepared and the takeover reads everything, as without it.
"""

from __future__ import annotations

import logging
import os
import resource
import select
import socket
import time
from typing import Callable

from fdkeep.bundle import Bundle
from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.loop import IN
from fdkeep.tcpcount import CLOSE_WAIT, ESTABLISHED
from holderd.client import HolderClient

from .bundles import OWN_FDS, SHARD_SLOTS, parse_name
from .holders import PREFIX, STATE_NAME
from .journal import JournalReader, read_owner
from .records import Record, member_of
from .room import Member

log = logging.getLogger("chatd")

#: How often (s) a standby reads what is new.
REFRESH = 0.5


def _shut_down(fd: int) -> bool:
    """Whether this client socket was shut down (by chatd: it is dead weight in its bundle), as a
    restore judges it (chatd.adoption.take_back): neither established nor closed by its peer only."""
    sock = socket.socket(fileno=fd)
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] not in (ESTABLISHED, CLOSE_WAIT)
    except OSError:
        return False  # not for this check to decide: the restore does
    finally:
        sock.detach()


class _Read:
    """A bundle read here: its two ends' inodes, how far it was read, and what it held."""

    def __init__(self, inodes: tuple[int, int]):
        self.inodes = inodes
        self.offset = 0
        self.entries: list[tuple[int, int]] = []  # (slot, fd), oldest first; the fds are Prepared's
        self.dead = 0  # entries of sockets chatd shut down, closed here as soon as read


class Prepared:
    """A standby's copies of the client sockets and records; the takeover takes them over."""

    def __init__(self, holder_path: str, someone_serves: Callable[[tuple[int, int] | None], bool]):
        """``someone_serves(owner)``: whether the journal's owner is a live chatd serving (so done
        with its own restore's reading)."""
        self.holder_path = holder_path
        self.someone_serves = someone_serves
        self._bundles: dict[tuple[int, int], _Read] = {}  # (shard, generation) -> what was read
        self._journal: tuple[int, int, JournalReader] | None = None  # (inode, fd, reader)
        #: Every client fd held here, in an epoll set of its own, with its socket's inode.
        self.epoll = select.epoll()
        self.inodes: dict[int, int] = {}
        #: The fds :meth:`entries_of` handed out at the takeover (still in the epoll set), by inode.
        self.handed: dict[int, int] = {}
        self.records: dict[int, tuple[bytes, Record]] = {}
        #: The member each of those records makes (chatd.records.member_of), by slot.
        self.members: dict[int, tuple[Record, Member]] = {}
        self._failing = False  # the last refresh failed, and it was said
        self._full = False  # a bundle was left for the takeover for want of fds, and it was said
        self.refreshed_at: float | None = None
        self.refresh_ms: float | None = None

    @property
    def sockets(self) -> int:
        return len(self.inodes)

    def report(self) -> dict:
        """For `chatctl status`: what this standby holds ready."""
        ago = None if self.refreshed_at is None else round((time.monotonic() - self.refreshed_at) * 1000)
        return {"sockets": self.sockets, "records": len(self.records), "bundles": len(self._bundles),
                "refreshed_ms_ago": ago, "refresh_ms": self.refresh_ms}

    # -- while standing by ---------------------------------------------------------------
    def refresh(self) -> None:
        """Read what is new in holderd; on any failure, let go of everything prepared."""
        began = time.monotonic()
        try:
            with HolderClient(self.holder_path, timeout=1.0) as holderd:
                kept = holderd.retrieve(PREFIX)
        except Error:
            return  # holderd away: the standby asks it for the lease again anyway
        try:
            self._update(kept)
        except (OSError, Error) as exc:
            if not self._failing:  # once, not every refresh
                log.warning("standby: cannot prepare the takeover (%s): letting go of what was prepared (the "
                            "takeover reads everything then), trying again every %g s", exc, REFRESH)
            self._failing = True
            self.release()
        else:
            if self._failing:
                log.info("standby: prepares the takeover again")
            self._failing = False
        finally:
            close_fds(item.fd for item in kept)
        self.refreshed_at = time.monotonic()
        self.refresh_ms = round((self.refreshed_at - began) * 1000, 2)

    def _update(self, kept) -> None:
        journal = next((item for item in kept if item.name == STATE_NAME), None)
        if journal is None or not self.someone_serves(read_owner(journal.fd)):
            return  # a chatd may be restoring, reading the bundles itself: see "One reader at a time"
        self._read_journal(journal)
        ends: dict[tuple[int, int], dict[str, object]] = {}
        for item in kept:
            parsed = parse_name(item.name)
            if parsed is not None:
                ends.setdefault(parsed[:2], {})[parsed[2]] = item
        for key in [key for key in self._bundles if key not in ends]:
            self._drop(key)  # holderd no longer keeps it: replaced, or its shard is gone
        # Room for what a takeover holds besides: every bundle's two ends, chatd's own fds.
        # (And a margin of two bundles: the takeover's restore must never find its process full.)
        room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - OWN_FDS - 2 * len(ends) - 2 * SHARD_SLOTS
        for key, pair in sorted(ends.items()):
            if set(pair) != {"w", "r"}:
                continue
            inodes = (pair["w"].ino, pair["r"].ino)
            read = self._bundles.get(key)
            if read is not None and read.inodes != inodes:
                self._drop(key)
                read = None
            if read is None:
                if len(self.inodes) + SHARD_SLOTS > room:  # the takeover reads this one itself
                    if not self._full:
                        log.info("standby: holds %d client sockets, no room for a bundle more under its fd "
                                 "limit (the takeover needs some): the takeover reads the rest", len(self.inodes))
                    self._full = True
                    continue
                read = self._bundles[key] = _Read(inodes)
            self._read_more(read, pair["w"].fd, pair["r"].fd)

    def _read_more(self, read: _Read, writer_fd: int, reader_fd: int) -> None:
        bundle = Bundle.from_fds(os.dup(writer_fd), os.dup(reader_fd))
        try:
            entries, read.offset = bundle.read_from(read.offset)
        finally:
            bundle.close()
        for slot, fd in entries:
            inode = os.fstat(fd).st_ino
            known = self.records.get(slot)
            if (known is None or known[1].inode != inode) and _shut_down(fd):
                os.close(fd)  # dead weight in flight: held here it would cost an fd the server does not spend
                read.dead += 1
                continue
            self.inodes[fd] = inode
            self.epoll.register(fd, IN)
            read.entries.append((slot, fd))

    def _read_journal(self, item) -> None:
        if self._journal is None or self._journal[0] != item.ino:
            self._forget_journal()
            fd = os.dup(item.fd)
            try:
                self._journal = (item.ino, fd, JournalReader(fd))
            except (Error, OSError, ValueError):
                os.close(fd)
                return  # not one this release reads: the takeover says why
        self.records = self._journal[2].records()
        before = self.members
        self.members = {slot: before[slot] if slot in before and before[slot][0] is record
                        else (record, member_of(slot, record)) for slot, (_, record) in self.records.items()}

    def _drop(self, key: tuple[int, int]) -> None:
        read = self._bundles.pop(key)
        self._close([fd for _, fd in read.entries])

    def _close(self, fds: list[int]) -> None:
        for fd in fds:
            if self.inodes.pop(fd, None) is not None:
                try:
                    self.epoll.unregister(fd)  # before the close: the socket lives on elsewhere
                except OSError:
                    pass
        close_fds(fds)

    def _forget_journal(self) -> None:
        if self._journal is not None:
            self._journal[2].close()
            os.close(self._journal[1])
            self._journal = None
        self.records, self.members = {}, {}

    # -- at the takeover -------------------------------------------------------------------
    def entries_of(self, shard: int, generation: int, bundle: Bundle) -> tuple[list[tuple[int, int]], int] | None:
        """The (slot, fd) entries of this bundle, which the holders gave back: what was read here
        and what was appended since, now the caller's, and how many dead ones were left out; None
        if it is not the bundle read here."""
        read = self._bundles.pop((shard, generation), None)
        if read is None:
            return None
        try:
            inodes = (os.fstat(bundle.writer.fileno()).st_ino, os.fstat(bundle.reader.fileno()).st_ino)
        except OSError:
            inodes = None
        if inodes != read.inodes:
            self._close([fd for _, fd in read.entries])
            return None
        entries, _ = bundle.read_from(read.offset)
        for _, fd in read.entries:
            self.handed[fd] = self.inodes.pop(fd)  # the caller's now, and still in the epoll set
        return read.entries + entries, read.dead

    def records_for(self, journal_fd: int | None) -> tuple[dict[int, tuple[bytes, Record]],
                                                           dict[int, tuple[Record, Member]]]:
        """The records read here and their members, if ``journal_fd`` is the journal they were
        read from (else none): a record is used only if its bytes are still current
        (chatd.journal.Journal.records), a member only with its very record."""
        if self._journal is None or journal_fd is None:
            return {}, {}
        try:
            same = os.fstat(journal_fd).st_ino == self._journal[0]
        except OSError:
            return {}, {}
        return (self.records, self.members) if same else ({}, {})

    def take_epoll(self) -> tuple[select.epoll, dict[int, int]]:
        """The epoll set, and the inodes of the fds :meth:`entries_of` handed out, which are
        still in it (their new owner unregisters each it does not let wait); whatever else
        was prepared is let go."""
        handed, self.handed = self.handed, {}
        self.release(keep_epoll=True)
        epoll, self.epoll = self.epoll, select.epoll()
        return epoll, handed

    def release(self, keep_epoll: bool = False) -> None:
        """Let go of everything held here (the standby is done with it, or gave up)."""
        for key in list(self._bundles):
            self._drop(key)
        self._forget_journal()
        if not keep_epoll:
            self.epoll.close()
            self.epoll = select.epoll()
        self.inodes.clear()
