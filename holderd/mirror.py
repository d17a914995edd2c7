"""holderd's own backup: everything it holds also sits in systemd's fd store.

Theory of operation
-------------------
systemd keeps the fds a service stores (``FDSTORE=1``) across a crash or a
restart of that service and passes them to its next process. It keeps a name
per fd, but only a short one (``FDNAME=``, at most 255 characters), while each
held fd comes with a uid, a name of up to 200 bytes and up to 4 KiB of
metadata. So each held fd is stored under a short name of its own,
``held-<serial>``, and what it means is written to an *index*: a memfd, itself
in the store, made of one line per change::

    + <serial> <uid> <name> <meta, base64>     an fd was stored as held-<serial>
                                               (again: its metadata changed)
    - <serial>                                 it was released

Each line is appended with one ``pwrite``, so a crash can cut short only the
last line, and a line without its newline is ignored. The order of steps makes
a crash at any instant harmless: a ``+`` line is written before its fd is
stored, and the fd is removed from the store before its ``-`` line is written.
What a crash can leave is an fd without a record or a record without an fd;
:func:`read_index` and :meth:`FdStoreMirror.restore` discard both.

The index only grows, so once it is over :data:`COMPACT_AT` bytes and four
times the size of its live lines, a new index holding only the live lines is
written in full, stored as ``index-<generation+1>``, and only then is the old
one removed: after a crash in between, the highest generation wins.

On a clean stop holderd leaves the store alone: ``systemctl restart`` keeps the
store, and ``systemctl stop`` empties it anyway.

The parsing is pure (:func:`read_index`); :class:`FdStoreMirror` does the I/O.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from dataclasses import dataclass

from .protocol import Held, HolderCore, Watcher
from fdkeep.systemd import ServiceManager

log = logging.getLogger("holderd")

INDEX_PREFIX = "index-"
HELD_PREFIX = "held-"
COMPACT_AT = 1 << 20


@dataclass(frozen=True)
class IndexEntry:
    uid: int
    name: str
    meta: bytes


def read_index(data: bytes) -> tuple[dict[int, IndexEntry], int]:
    """The live entries ``{serial: entry}`` and the length of the complete lines."""
    entries: dict[int, IndexEntry] = {}
    complete = data.rfind(b"\n") + 1
    for line in data[:complete].split(b"\n")[:-1]:
        fields = line.split(b" ")
        try:
            if fields[0] == b"+" and len(fields) == 5:
                serial, uid = int(fields[1]), int(fields[2])
                meta = base64.b64decode(fields[4], validate=True)
                entries[serial] = IndexEntry(uid, fields[3].decode("ascii"), meta)
            elif fields[0] == b"-" and len(fields) == 2:
                entries.pop(int(fields[1]), None)
            else:
                raise ValueError(line[:40])
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"index line {line[:60]!r} is malformed: {exc}") from None
    return entries, complete


def add_line(serial: int, uid: int, name: str, meta: bytes) -> bytes:
    return b"+ %d %d %s %s\n" % (serial, uid, name.encode("ascii"), base64.b64encode(meta))


def remove_line(serial: int) -> bytes:
    return b"- %d\n" % serial


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


class FdStoreMirror(Watcher):
    """Keeps systemd's fd store and the index in step with what the core holds."""

    def __init__(self, manager: ServiceManager):
        self.manager = manager
        self.enabled = manager.present
        self._serial_of: dict[int, int] = {}  # held fd -> serial
        self._lines: dict[int, bytes] = {}  # serial -> its + line, for compaction
        self._live_size = 0
        self._next_serial = 1
        self._index_fd: int | None = None
        self._index_size = 0
        self._generation = 0
        self._adopting: dict[int, int] = {}  # fd -> serial, while restoring

    # -- after a restart: take back what the store kept --------------------------------
    def restore(self, core: HolderCore) -> int:
        """Hold again every fd systemd passed back; the count restored."""
        passed = self.manager.take_passed_fds()
        if not self.enabled:
            return 0
        indexes = sorted(
            ((int(name[len(INDEX_PREFIX):]), fd) for fd, name in passed.items()
             if name.startswith(INDEX_PREFIX) and name[len(INDEX_PREFIX):].isdigit()),
            reverse=True,
        )
        entries: dict[int, IndexEntry] = {}
        for generation, fd in indexes:
            if self._index_fd is None:
                try:
                    entries, complete = read_index(_read_all(fd))
                except (OSError, ValueError) as exc:
                    log.error("index-%d unusable (%s): trying an older one", generation, exc)
                    self._forget(f"{INDEX_PREFIX}{generation}", fd)
                    continue
                os.ftruncate(fd, complete)  # drop a line a crash cut short
                self._index_fd, self._index_size, self._generation = fd, complete, generation
            else:
                self._forget(f"{INDEX_PREFIX}{generation}", fd)  # an old generation
        by_serial = {}
        for fd, name in passed.items():
            if name.startswith(INDEX_PREFIX):
                continue
            tail = name[len(HELD_PREFIX):]
            if name.startswith(HELD_PREFIX) and tail.isdigit() and int(tail) in entries:
                by_serial[int(tail)] = fd
            else:
                log.warning("systemd passed fd %d named %r, which the index does not know: dropping it", fd, name)
                self._forget(name, fd)
        if self._index_fd is None:
            self._start_index()
        self._next_serial = max([*entries, 0]) + 1
        self._adopting = {fd: serial for serial, fd in by_serial.items()}
        try:
            for serial, fd in sorted(by_serial.items()):
                entry = entries[serial]
                core.adopt(entry.uid, entry.name, entry.meta, fd)
        finally:
            self._adopting = {}
        for serial in entries.keys() - by_serial.keys():
            self._append(remove_line(serial))  # its fd is gone (hung up while we were away)
        if by_serial:
            log.info("took back %d held fds from systemd's fd store (index generation %d)",
                     len(by_serial), self._generation)
        return len(by_serial)

    def _forget(self, name: str, fd: int) -> None:
        self.manager.remove(name)
        os.close(fd)

    def _start_index(self) -> None:
        self._generation += 1
        fd = os.memfd_create("holderd-index", os.MFD_CLOEXEC)
        for held_line in self._lines.values():
            os.write(fd, held_line)
        self._index_size = os.lseek(fd, 0, os.SEEK_CUR)
        self.manager.store(f"{INDEX_PREFIX}{self._generation}", fd)
        old, self._index_fd = self._index_fd, fd
        if old is not None:
            self.manager.remove(f"{INDEX_PREFIX}{self._generation - 1}")
            os.close(old)

    # -- the watcher ----------------------------------------------------------------------
    def held(self, uid: int, held: Held) -> None:
        if not self.enabled:
            return
        if self._index_fd is None:
            self._start_index()
        serial = self._adopting.get(held.fd)
        line = add_line(serial if serial is not None else self._next_serial, uid, held.name, held.meta)
        if serial is None:
            serial = self._next_serial
            self._next_serial += 1
            self._append(line)
            self.manager.store(f"{HELD_PREFIX}{serial}", held.fd)
        self._serial_of[held.fd] = serial
        self._lines[serial] = line
        self._live_size += len(line)

    def updated(self, uid: int, held: Held) -> None:
        """New metadata: a new ``+`` line for the same serial supersedes the old one."""
        serial = self._serial_of.get(held.fd)
        if serial is None or not self.enabled:
            return
        line = add_line(serial, uid, held.name, held.meta)
        self._append(line)
        self._live_size += len(line) - len(self._lines[serial])
        self._lines[serial] = line

    def released(self, uid: int, held: Held) -> None:
        serial = self._serial_of.pop(held.fd, None)
        if serial is None or not self.enabled:
            return
        self.manager.remove(f"{HELD_PREFIX}{serial}")
        self._append(remove_line(serial))
        self._live_size -= len(self._lines.pop(serial))
        if self._index_size > COMPACT_AT and self._index_size > 4 * self._live_size:
            self._start_index()

    def _append(self, line: bytes) -> None:
        os.pwrite(self._index_fd, line, self._index_size)
        self._index_size += len(line)

    def detach(self) -> None:
        """Stop mirroring (on a clean stop: what is stored stays stored)."""
        self.enabled = False
