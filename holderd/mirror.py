"""holderd's own backup: everything it holds also sits in systemd's fd store.

Theory of operation
-------------------
systemd keeps the fds a service stores (``FDSTORE=1``) across a crash or a
restart of that service and passes them to its next process. It keeps a short
name per fd (``FDNAME=``), hands every name to the next process in one
environment string capped at 128 KiB, and compares each fd it is handed with
every fd it keeps. So holderd stores few fds, whatever it holds:

- every held fd is appended, keyed by a *serial* of its own, to one of
  :data:`SHARDS` *bundles* (:mod:`fdkeep.bundle`: a socketpair whose queue
  keeps fds in flight), shard ``serial % SHARDS``; both ends of each bundle are
  stored as ``bundle/<shard>/<generation>/w`` and ``…/r``;
- what each serial means (its uid, name and metadata, up to 4 KiB) is written
  to an *index*: a memfd, itself in the store as ``index-<generation>``, made
  of one line per change::

      + <serial> <uid> <name> <meta, base64>     an fd is held as <serial>
                                                 (again: its metadata changed)
      - <serial>                                 it was released
      v <version>                                the index's version, first if
                                                 present; none means 1

Each line is appended with one ``pwrite``, so a crash can cut short only the
last line, and a line without its newline is ignored. The order of steps makes
a crash at any instant harmless: a ``+`` line is written before its fd is
appended to a bundle, and a released fd's ``-`` line is written when it is let
go (its copy stays in the bundle, dead, until the bundle is rebuilt). What a
crash can leave is an fd without a record or a record without an fd;
:func:`read_index` and :meth:`FdStoreMirror.restore` discard both.

A bundle is rebuilt (its live fds packed into a fresh socketpair) when its
queue is full or its dead outnumber its live (and dropped when none is live): the fresh one is complete before
it is stored, and the old one is removed from the store only after; a restore
takes each shard's highest generation. The index only grows, so once it is over
:data:`COMPACT_AT` bytes and four times the size of its live lines, a new index
holding only the live lines is written in full, stored as ``index-<generation+1>``,
and only then is the old one removed: after a crash in between, the highest
generation wins.

On a clean stop holderd leaves the store alone: ``systemctl restart`` keeps the
store, and ``systemctl stop`` empties it anyway.

The index's version is :data:`INDEX_VERSION` (docs/formats.md); this release
writes no ``v`` line (what 0.1.0 reads too) and refuses an index of another
version rather than forget what it holds (Error ``unknown-format``: holderd
does not start).

The parsing is pure (:func:`read_index`); :class:`FdStoreMirror` does the I/O.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from dataclasses import dataclass

from fdkeep.bundle import Bundle, Shard
from fdkeep.errors import Error
from fdkeep.systemd import ServiceManager

from .protocol import Held, HolderCore, Watcher

log = logging.getLogger("holderd")

INDEX_PREFIX = "index-"
#: The index's version: a ``v <n>`` first line, or none for 1 (what every release so far writes).
INDEX_VERSION = 1
BUNDLE_NAME = re.compile(r"bundle/(\d+)/(\d+)/([wr])\Z")
SHARDS = 16
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
            elif fields[0] == b"v" and len(fields) == 2 and not entries:
                if int(fields[1]) != INDEX_VERSION:
                    raise Error("unknown-format", f"systemd's fd store keeps a holderd index of version "
                                f"{int(fields[1])}; this holderd reads version {INDEX_VERSION} only. Nothing was "
                                "touched: run the release that wrote it (`systemctl stop holderd` empties the "
                                "store, and ends what it holds)")
            else:
                raise ValueError(line[:40])
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"index line {line[:60]!r} is malformed: {exc}") from None
    return entries, complete


def add_line(serial: int, uid: int, name: str, meta: bytes) -> bytes:
    return b"+ %d %d %s %s\n" % (serial, uid, name.encode("ascii"), base64.b64encode(meta))


def remove_line(serial: int) -> bytes:
    return b"- %d\n" % serial


def bundle_names(shard: Shard) -> tuple[str, str]:
    base = f"bundle/{shard.number}/{shard.generation}/"
    return base + "w", base + "r"


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
        self._shards: dict[int, Shard] = {}
        self._adopting: dict[int, int] = {}  # fd -> serial, while restoring

    # -- after a restart: take back what the store kept --------------------------------
    def restore(self, core: HolderCore) -> int:
        """Hold again every fd systemd passed back; the count restored."""
        passed = self.manager.take_passed_fds()
        if not self.enabled:
            for fd in passed:
                os.close(fd)
            return 0
        entries = self._take_newest_index(passed)
        by_serial = self._take_bundles(passed, entries)
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
            log.info("took back %d held fds from systemd's fd store (index generation %d, %d bundles)",
                     len(by_serial), self._generation, len(self._shards))
        return len(by_serial)

    def _take_newest_index(self, passed: dict[int, str]) -> dict[int, IndexEntry]:
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
        return entries

    def _take_bundles(self, passed: dict[int, str], entries: dict[int, IndexEntry]) -> dict[int, int]:
        """Each shard's newest whole bundle; the fds in it the index knows, by serial."""
        ends: dict[tuple[int, int], dict[str, int]] = {}
        for fd, name in passed.items():
            if name.startswith(INDEX_PREFIX):
                continue
            match = BUNDLE_NAME.match(name)
            if match is None:
                log.warning("systemd passed fd %d named %r, which holderd does not know: dropping it", fd, name)
                self._forget(name, fd)
                continue
            ends.setdefault((int(match[1]), int(match[2])), {})[match[3]] = fd
        newest: dict[int, int] = {}
        for (number, generation), pair in ends.items():
            if set(pair) == {"w", "r"} and generation > newest.get(number, 0):
                newest[number] = generation
        by_serial: dict[int, int] = {}
        for (number, generation), pair in ends.items():
            if newest.get(number) != generation:
                for end, fd in pair.items():
                    self._forget(f"bundle/{number}/{generation}/{end}", fd)
                continue
            shard = Shard(number, Bundle.from_fds(pair["w"], pair["r"]), generation)
            for serial, fd in shard.bundle.read():
                if serial in entries and serial not in by_serial:
                    by_serial[serial] = fd
                    shard.live[serial] = fd
                else:
                    os.close(fd)
                    shard.dead += 1
            self._shards[number] = shard
        return by_serial

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

    # -- bundles ------------------------------------------------------------------------
    def _keep(self, serial: int, fd: int) -> None:
        number = serial % SHARDS
        shard = self._shards.get(number)
        if shard is None:
            shard = Shard(number, Bundle.create(), generation=1)
            self._shards[number] = shard
            shard.add([(serial, fd)])
            self._store_shard(shard)
        elif not shard.add([(serial, fd)]):
            shard.live[serial] = fd
            self._rebuild(shard)

    def _store_shard(self, shard: Shard) -> None:
        for name, fd in zip(bundle_names(shard), shard.bundle.fds()):
            self.manager.store(name, fd)

    def _rebuild(self, old: Shard) -> None:
        fresh = old.rebuilt()
        self._store_shard(fresh)
        self._shards[old.number] = fresh
        self._drop(old)

    def _drop(self, shard: Shard) -> None:
        for name in bundle_names(shard):
            self.manager.remove(name)
        shard.bundle.drain()  # what systemd may still keep of it must not keep fds in flight
        shard.bundle.close()

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
            self._keep(serial, held.fd)
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
        self._append(remove_line(serial))
        shard = self._shards.get(serial % SHARDS)
        if shard is not None:
            shard.forget(serial)
            if not shard.live:
                del self._shards[shard.number]
                self._drop(shard)
            elif shard.worth_rebuilding():
                self._rebuild(shard)
        self._live_size -= len(self._lines.pop(serial))
        if self._index_size > COMPACT_AT and self._index_size > 4 * self._live_size:
            self._start_index()

    def _append(self, line: bytes) -> None:
        os.pwrite(self._index_fd, line, self._index_size)
        self._index_size += len(line)

    def detach(self) -> None:
        """Stop mirroring (on a clean stop: what is stored stays stored)."""
        self.enabled = False
