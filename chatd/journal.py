"""chatd's crash-surviving state: records, and the bytes in flight, in a shared file.

Theory of operation
-------------------
The state lives in a file that chatd maps (``MAP_SHARED``), and whose
descriptor it hands to its holders (holderd and systemd's fd store) like any
socket: a ``memfd``, or with ``--state-dir`` a file on disk
(:meth:`Journal.create` with a path; :mod:`chatd.statedir`). Every holder keeps
the same file, so whichever copy survives a crash shows the state as the dead
process left it: writes to a shared mapping are in the file (the kernel's page
cache) the moment they are made, no flush needed. A file on disk outlives the
holders too; what reaches the disk itself, and when, is the kernel's writeback:
see :meth:`Journal.seal` and the *boot* below.

The file has a header, one *slot* per connection, and for each slot two
*rings* of bytes (three across hosts):

- the **input ring**: chatd receives a client's bytes straight into it
  (``recv_into`` a view of the mapping), so what chatd takes from a socket is
  never only in its private memory;
- the **output ring**: every byte chatd means to send a client is written here
  first, and sent from here;
- across hosts (:mod:`chatd.cluster`), the **outbox**: the messages this
  client sent to members of other hosts, committed and not yet acknowledged
  by the cluster (``[box_start, box_end)``, :class:`chatd.rings.Outbox`).
  After a crash they are published again; the cluster drops what it has.

A ring holds a window of a TCP stream: stream offset ``x`` lives at position
``x % size``. Which window is given by the slot's :class:`Record`: the input
ring holds ``[in_handled, read)`` (read but not yet handled) and the output
ring ``[out_start, out_end)`` (committed to send, perhaps not yet sent). The
other ends, ``read`` and ``written``, are not in the journal: the kernel
counts them (:mod:`fdkeep.tcpcount`), exactly, for whichever process holds the
socket. So a new chatd knows what the dead one had read and not handled, and
what it had committed and not sent, to the byte.

Records are made current by :meth:`Journal.commit`, several at once, in one
atomic step. A slot keeps two copies of its record, each tagged with the
sequence number of the commit that wrote it; the header keeps the committed
sequence number, itself twice, and a one-byte selector saying which copy is
current. A commit

1. writes every record into its slot's spare copy (the one that is not
   current), tagged ``c + 1``;
2. writes ``c + 1`` into the spare copy of the committed number;
3. flips the selector byte. That one-byte store is the commit.

The committed number's copy carries the *cursor* beside it: across hosts, the
last sequence of the cluster's stream up to which every message for this host
is handled (:mod:`chatd.cluster`), so it is committed in the same step as what
handling them changed.

A process can die between any two instructions, but a one-byte store is
indivisible: a reader (:meth:`Journal.attach`) takes the committed number
``c`` the selector points at and, in each slot, the copy with the highest tag
not above ``c``: every record as it was, or every record as committed, never a
mix. Copies tagged above ``c`` are what a crash cut short; attach erases their
tags so that no later commit can revive them. Nothing is ever written over a
current copy, and ring bytes are written only outside the committed windows,
so there is nothing to undo.

The *handling marker* in the header says which command chatd is handling
(slot and stream offset) while it handles it. A chatd that finds it set knows
its predecessor died *while* handling that command; whether it died *of* it,
the dead process's last words tell (:mod:`chatd.lastwords`): only a crash of
its own counts against the command, a kill from outside never does, and a
command is skipped only once it has crashed chatd twice and a child process
that tries it too (:mod:`chatd.server`, :mod:`chatd.trial`): a *poison* line
must not kill every successor, and a good line must never be dropped.

Layout (little-endian)::

    header (4096 bytes): magic "CHATDJ03", version u32, slot count u32,
                         record size u32, input ring size u32, output ring
                         size u32, outbox size u32 (0: one host); at 64:
                         selector u8; at 72 and 88: committed sequence u64
                         and cursor u64 (copies 0 and 1); at 128: marker
                         valid u8, at 132 its slot u32, at 136 its offset
                         u64; at 160: the owner's pid u32, at 168 its start
                         time u64; at 192 the boot id, at 208 the seal;
                         at 512 and 1024: the tally (chatd.tally),
                         copies 0 and 1, up to 64 u64 each
    records:             per slot, record copy 0 then record copy 1
    rings:               page-aligned; per slot, its input ring, its output
                         ring, its outbox
    record (208 bytes):  seq u64, used u8, then its fields as
                         :data:`chatd.records.FIELDS` lists them

The version is :data:`VERSION` (3, with :data:`MAGIC`; docs/formats.md). This
release reads version 3 only: :meth:`Journal.attach` refuses any other version
or magic with Error ``unknown-format`` (:func:`format_error`: who wrote it and
what to do), which a restore does not take for damage.

The file is sparse: a ring takes memory only for the pages a connection has
used, and :meth:`Journal.commit` gives a freed slot's pages back. A file on
disk has its blocks reserved (``fallocate``) when a slot is handed out: a write
to a hole of a full disk through the mapping would kill chatd with ``SIGBUS``,
and a reservation that fails refuses that one client instead.

**The boot and the seal** (in the header; read only for a file found on disk
when the holders keep nothing, :mod:`chatd.statedir`). Each chatd that maps the
journal to write it stamps the boot id (``/proc/sys/kernel/random/boot_id``) in
it. Within one boot the page cache is the file, so a journal stamped with this
boot is exactly as its last writer left it, whoever died since. From another
boot it is only what the writeback had put on disk, perhaps torn across pages
(a selector flipped on disk before its records), unless it was *sealed*:
:meth:`Journal.seal` (at a chatd's stop, and by ``chatd --seal``) writes every
page to disk (``fsync``), then the seal (the committed number), and syncs the
header; :meth:`Journal.attach` clears a seal, and syncs that, before anything
else is written. So a seal on disk naming the committed number means nothing
was written after it. Neither is part of a commit; a release that does not know
them leaves them as they are (version 3 either way).
"""


from __future__ import annotations

import errno
import itertools
import logging
import mmap
import operator
import os
import struct
import uuid

from fdkeep.errors import Error

from .records import RECORD, Record, pack, state_error, unpack
from .tally import COPY_SIZE, Tally

MAGIC = b"CHATDJ03"
VERSION = 3
HEADER = struct.Struct("<8sIIIIII")
HEADER_SIZE = 4096
SELECTOR_OFFSET = 64
ROOT_OFFSETS = (72, 88)
ROOT = struct.Struct("<QQ")  # committed sequence, cursor
MARKER = struct.Struct("<B3xIQ")
MARKER_OFFSET = 128
OWNER = struct.Struct("<I4xQ")
OWNER_OFFSET = 160
BOOT_OFFSET = 192
BOOT_SIZE = 16
SEAL = struct.Struct("<B7xQ")  # sealed, the committed number it was sealed at
SEAL_OFFSET = 208
SEQ = struct.Struct("<Q")
#: The two copies of the tally (chatd.tally), chosen by the selector like the committed number.
TALLY_OFFSETS = (512, 512 + COPY_SIZE)
PAGE = mmap.PAGESIZE

#: Input ring: a whole line of the line protocol (64 KiB) and what follows it.
IN_RING = 128 * 1024
#: Output ring: room for what a slow reader has not taken yet (see chatd.server).
OUT_RING = 256 * 1024
#: Outbox, across hosts: a whole message (64 KiB) waiting for the cluster, and more.
BOX_RING = 128 * 1024

assert RECORD.size == 208 and ROOT_OFFSETS[0] + ROOT.size <= ROOT_OFFSETS[1] < ROOT_OFFSETS[1] + ROOT.size <= MARKER_OFFSET and MARKER_OFFSET + MARKER.size <= OWNER_OFFSET < OWNER_OFFSET + OWNER.size <= BOOT_OFFSET < BOOT_OFFSET + BOOT_SIZE <= SEAL_OFFSET < SEAL_OFFSET + SEAL.size <= TALLY_OFFSETS[0] < TALLY_OFFSETS[1] + COPY_SIZE <= HEADER_SIZE


#: The journal versions, and which releases wrote each (docs/formats.md). This release
#: reads :data:`VERSION` only; any other is refused before anything is touched.
WRITTEN_BY = {
    1: "a development build before release 0.1.0",
    2: "a development build before release 0.1.0",
    3: "releases 0.1.0 and 0.2.0",
}
#: The error code of a journal this release cannot read (another version, or not a journal):
#: unlike damage (``bad-state``), chatd refuses to serve rather than start a new journal.
UNKNOWN_FORMAT = "unknown-format"

log = logging.getLogger("chatd")
#: Sequence numbers stay below this; a root at or above it is damage, not history.
MAX_SEQUENCE = 2 ** 63


def format_error(magic: bytes, version: int, path: str | None = None) -> Error:
    """Why a held journal (or the one at ``path``, in a state directory) is not one this
    release reads, and what the operator can do."""
    if magic[:6] != MAGIC[:6]:
        what = f"not a chatd journal (magic {magic!r}, expected {MAGIC!r})"
    else:
        writer = WRITTEN_BY.get(version) or ("a release newer than this one" if version > VERSION
                                             else "no release of chatd")
        what = f"a chatd journal of version {version} (magic {magic!r}), written by {writer}"
    if path is not None:
        return Error(UNKNOWN_FORMAT,
                     f"the journal {path} is {what}; this chatd reads journal version {VERSION} only. Nothing "
                     "was touched. Run the release that wrote it, or start this one with `chatd --fresh` to set "
                     "it aside and begin afresh (every session it keeps is then lost)")
    return Error(UNKNOWN_FORMAT,
                 f"the held journal is {what}; this chatd reads journal version {VERSION} only. Nothing was "
                 "touched: the holders still keep the journal and every connection. Run the release that wrote "
                 "it, or start this one with `chatd --fresh` to drop what the holders keep (that ends every "
                 "kept connection)")


def boot_id() -> bytes:
    """This boot's id (16 bytes; zeros if the kernel does not say): another one after any
    reboot, planned or not."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as source:
            return uuid.UUID(source.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(BOOT_SIZE)


def _fallocate(fd: int, offset: int, length: int) -> None:
    """Reserve the disk blocks of ``[offset, offset + length)`` (OSError ENOSPC if there is no room)."""
    os.posix_fallocate(fd, offset, length)


def sync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable."""
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _temporary_file(path: str) -> tuple[int, str]:
    """A new, empty file beside ``path`` (mode 0600), and its name: this process's own, so two
    chatd making a journal at once cannot take each other's; one a dead process left is removed."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.new-"
    for left in os.listdir(directory):
        if left.startswith(prefix) and left[len(prefix):].isdigit() and not _alive(int(left[len(prefix):])):
            try:
                os.unlink(os.path.join(directory, left))
            except FileNotFoundError:
                pass
    temporary = os.path.join(directory, f"{prefix}{os.getpid()}")
    try:
        os.unlink(temporary)
    except FileNotFoundError:
        pass
    return os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), temporary


#: statfs(2)'s f_type of the file systems that live in memory (a memfd is tmpfs's).
IN_MEMORY = {0x01021994: "tmpfs", 0x858458F6: "ramfs", 0x958458F6: "hugetlbfs"}


def _in_memory(fd: int) -> bool:
    """Whether ``fd``'s file lives in memory (a memfd, a file on tmpfs): it has no disk
    blocks to reserve, and the pages of a freed slot are memory to give back."""
    import ctypes

    buffer = ctypes.create_string_buffer(256)  # struct statfs: f_type, a C long, comes first
    if ctypes.CDLL(None, use_errno=True).fstatfs(fd, buffer) != 0:
        return False
    return ctypes.c_long.from_buffer(buffer).value in IN_MEMORY


def is_memfd(fd: int) -> bool:
    """Whether ``fd`` is a memfd: its link in /proc names it so."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    except OSError:
        return False


def _copy_data(source: int, view: memoryview, target: int, size: int) -> None:
    """The written parts of ``source`` (mapped as ``view``) into ``target`` at the same offsets,
    holes left holes (``SEEK_DATA``/``SEEK_HOLE``; every byte, where the file system cannot say)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(source, offset, os.SEEK_DATA)
            end = os.lseek(source, start, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data past offset
                return
            start, end = offset, size
        while start < end:
            start += os.pwrite(target, view[start:end], start)
        offset = end


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _state_dir_error(path: str, doing: str, exc: OSError) -> Error:
    return Error("state-dir", f"cannot {doing} the journal {path}: {exc.strerror or exc}; make room there (the "
                              "journal needs its records' blocks at once, about 0.4 MiB a client later), or give "
                              "chatd a directory it can write with --state-dir")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Journal:
    #: False only to measure what the journal costs (``chatd --no-journal``): records are
    #: then never written, and a crash loses what was in flight and every count.
    durable = True

    def __init__(self, fd: int, slots: int, in_size: int, out_size: int, box_size: int, mapping: mmap.mmap,
                 path: str | None = None):
        self.fd = fd
        #: The file's name (--state-dir), None for a memfd or a held file: for the log.
        self.path = path
        #: A file with disk blocks (not a memfd, not on tmpfs): each slot's are reserved when it
        #: is first handed out and kept when it is freed (the next client reuses them: freeing
        #: and reserving again took 0.4 ms a client on ext4 here, 15 us kept); a file in memory
        #: gives a freed slot's pages back instead. And only such a file has anything to seal.
        self.on_disk = not _in_memory(fd)
        #: As found in the header before this process wrote it (attach): the boot that last
        #: wrote the journal, and whether it was sealed at its committed number (chatd.statedir).
        self.boot_found = bytes(BOOT_SIZE)
        self.sealed = False
        self.slots = slots
        self.in_size = in_size
        self.out_size = out_size
        self.box_size = box_size
        self._map = mapping
        self._view = memoryview(mapping)
        self._rings = self.rings_offset(slots)
        self.committed, self.cursor = ROOT.unpack_from(mapping, ROOT_OFFSETS[mapping[SELECTOR_OFFSET] & 1])
        #: What the service counted since it began (chatd.tally): committed with the records.
        self.tally = Tally.unpack_from(mapping, TALLY_OFFSETS[mapping[SELECTOR_OFFSET] & 1])
        #: Which copy of each slot is current, and whether the slot is used.
        self._current = self._used = bytearray()
        self._scan()
        #: Slots neither used nor handed out by allocate(); popped from the end.
        self._free: list[int] = list(itertools.compress(range(slots - 1, -1, -1), map(operator.not_, reversed(self._used))))
        self._allocated: set[int] = set()
        #: The disk had no room for a slot's rings when last asked (said once, until it has).
        self._disk_full = False

    def _scan(self) -> None:
        """Find each slot's current copy, reading only the tags and used bytes (C loops, not
        a Python loop over records); erase the tags no commit made."""
        size = self.slots * 2 * RECORD.size
        area = memoryview(self._map)[HEADER_SIZE:HEADER_SIZE + size]
        try:
            step = RECORD.size // SEQ.size
            tags = area.cast("Q")[::step].tolist()  # copy 0, copy 1, copy 0, ... of each slot
            used = area[8::RECORD.size].tobytes()
        finally:
            area.release()
        if tags and max(tags) > self.committed:  # what a crash cut short (rare: scanned only then)
            for index in (i for i, tag in enumerate(tags) if tag > self.committed):
                self._write(HEADER_SIZE + index * RECORD.size, SEQ.pack(0))
                tags[index] = 0
        # Per slot: copy 1 if its tag is the higher; used if that copy's used-byte is 1. In map()s,
        # not a Python loop: at 20,000 slots this is on every restore's way to serving.
        current = bytes(map(operator.gt, tags[1::2], tags[0::2]))
        chosen = map(operator.getitem, map((used[0::2], used[1::2]).__getitem__, current), range(self.slots))
        self._current = bytearray(current)
        self._used = bytearray(map((1).__eq__, chosen))

    # -- making and finding the file ----------------------------------------------------
    @staticmethod
    def rings_offset(slots: int) -> int:
        records_end = HEADER_SIZE + slots * 2 * RECORD.size
        return -(-records_end // PAGE) * PAGE

    @classmethod
    def size_for(cls, slots: int, in_size: int = IN_RING, out_size: int = OUT_RING, box_size: int = 0) -> int:
        return cls.rings_offset(slots) + slots * (in_size + out_size + box_size)

    @classmethod
    def create(cls, slots: int, in_size: int = IN_RING, out_size: int = OUT_RING, box_size: int = 0,
               path: str | None = None) -> "Journal":
        """A new journal; ``box_size`` BOX_RING across hosts (an outbox per slot), 0 on one host.

        ``path`` None: a memfd. Else a file there, mode 0600, made whole under a temporary
        name beside it (header written, its blocks and the records' reserved, on disk) and
        then renamed over ``path``: whenever chatd or the machine dies, ``path`` is the
        journal it was or the new one whole. Error ``state-dir`` if the file cannot be made."""
        if in_size % PAGE or out_size % PAGE or box_size % PAGE:
            raise ValueError(f"ring sizes must be multiples of the page size ({PAGE})")
        size = cls.size_for(slots, in_size, out_size, box_size)
        if path is None:
            fd, temporary = os.memfd_create("chatd-journal", os.MFD_CLOEXEC), None
        else:
            try:
                fd, temporary = _temporary_file(path)
            except OSError as exc:
                raise _state_dir_error(path, "make", exc) from None
        try:
            os.ftruncate(fd, size)  # sparse: pages come when first written
            mapping = mmap.mmap(fd, size)
        except OSError as exc:
            os.close(fd)
            if temporary is None:
                raise
            _unlink(temporary)
            raise _state_dir_error(path, "make", exc) from None
        HEADER.pack_into(mapping, 0, MAGIC, VERSION, slots, RECORD.size, in_size, out_size, box_size)
        journal = cls(fd, slots, in_size, out_size, box_size, mapping, path)
        journal.stamp_boot()
        if temporary is not None:
            try:
                if journal.on_disk:
                    _fallocate(fd, 0, cls.rings_offset(slots))
                os.fsync(fd)
                os.rename(temporary, path)
                sync_directory(path)
            except OSError as exc:
                journal.close()
                _unlink(temporary)
                raise _state_dir_error(path, "make", exc) from None
        return journal

    @classmethod
    def attach(cls, fd: "int | str") -> "Journal":
        """Map a journal that survived a crash: ``fd`` (it becomes this object's, on success),
        or the file at a path (a state directory's, :mod:`chatd.statedir`). A seal found is
        cleared, and that made durable, before anything else is written."""
        if isinstance(fd, str):
            path, fd = fd, os.open(fd, os.O_RDWR | os.O_CLOEXEC)
            try:
                return cls._attach(fd, path)
            except BaseException:
                os.close(fd)
                raise
        return cls._attach(fd, None)

    @classmethod
    def _attach(cls, fd: int, path: str | None) -> "Journal":
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise state_error(f"state file is {size} bytes, too short for a header")
        mapping = mmap.mmap(fd, size)
        magic, version, slots, record_size, in_size, out_size, box_size = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION:
            mapping.close()
            raise format_error(magic, version, path)
        if record_size != RECORD.size:
            mapping.close()
            raise state_error(f"state file's records are {record_size} bytes, not {RECORD.size} as version "
                              f"{VERSION} has them: it is damaged; `chatd --fresh` starts anew")
        # Exactly the size create() made: a header damaged to a smaller geometry would
        # otherwise be read, and the slots past it silently lost.
        if (not in_size or not out_size or in_size % PAGE or out_size % PAGE or box_size % PAGE
                or size != cls.size_for(slots, in_size, out_size, box_size)):
            mapping.close()
            raise state_error(f"state file of {size} bytes does not match its header ({slots} slots and rings): "
                              "it is damaged; `chatd --fresh` starts anew")
        committed, _ = ROOT.unpack_from(mapping, ROOT_OFFSETS[mapping[SELECTOR_OFFSET] & 1])
        if committed >= MAX_SEQUENCE:
            mapping.close()
            raise state_error(f"state file's commit number {committed} is out of range: it is damaged; "
                              "`chatd --fresh` starts anew")
        boot_found = mapping[BOOT_OFFSET:BOOT_OFFSET + BOOT_SIZE]
        sealed, sealed_at = SEAL.unpack_from(mapping, SEAL_OFFSET)
        if sealed:
            # Before any other write, and on disk before it: a seal on disk must mean that
            # nothing was written after it (the module docstring: the boot and the seal).
            SEAL.pack_into(mapping, SEAL_OFFSET, 0, 0)
            mapping.flush(0, PAGE)
        journal = cls(fd, slots, in_size, out_size, box_size, mapping, path)
        journal.boot_found = boot_found
        journal.sealed = sealed == 1 and sealed_at == journal.committed
        journal.stamp_boot()
        return journal

    def stamp_boot(self) -> None:
        """Say in the header that this boot writes the journal (not a commit)."""
        self._map[BOOT_OFFSET:BOOT_OFFSET + BOOT_SIZE] = boot_id()

    def seal(self) -> None:
        """Put every page of the journal on disk, then say so in it (the seal, at the committed
        number), on disk too: until the next writer attaches, the disk has the journal as it
        is now, whatever becomes of the machine. A memfd has no disk: nothing to do. Call it
        only where nothing writes the journal any more (a chatd that stops)."""
        if not self.on_disk:
            return
        self._map.flush()
        os.fsync(self.fd)
        SEAL.pack_into(self._map, SEAL_OFFSET, 1, self.committed)
        self._map.flush(0, PAGE)

    def copy_to(self, path: str) -> "Journal":
        """A copy of this journal in a new file at ``path`` (made as :meth:`create` makes one:
        whole under a temporary name, then renamed), attached; only the pages written are
        copied, and the used slots' blocks reserved (on a disk). Nothing may write this one meanwhile.
        Error ``state-dir`` if the file cannot be made."""
        try:
            fd, temporary = _temporary_file(path)
        except OSError as exc:
            raise _state_dir_error(path, "make", exc) from None
        try:
            size = os.fstat(self.fd).st_size
            os.ftruncate(fd, size)
            if not _in_memory(fd):
                # Header, records and every slot's rings up to the last used one, in one call: the
                # slots are handed out from the first, so the used ones are nearly all of those.
                used = [slot for slot in itertools.compress(range(self.slots), self._used)]
                _fallocate(fd, 0, self._ring_offset(used[-1] + 1) if used else self._rings)
            _copy_data(self.fd, self._view, fd, size)
            # No fsync (a third of a second at 10,000 clients, in a takeover): within this boot the
            # page cache is the file, and after a reboot an unsealed journal is not trusted anyway.
            os.rename(temporary, path)
            sync_directory(path)
            copy = Journal.attach(fd)
        except OSError as exc:
            os.close(fd)
            _unlink(temporary)
            raise _state_dir_error(path, "copy the journal into", exc) from None
        copy.path = path
        return copy

    def _reserve(self, slot: int, fd: int | None = None) -> bool:
        """The disk blocks of the slot's rings, reserved (a file on disk only); False if the
        disk has no room for them (the slot must not be used: a write to an unreserved
        page of a full disk would kill chatd with SIGBUS)."""
        if fd is None and not self.on_disk:
            return True
        try:
            _fallocate(self.fd if fd is None else fd, self._ring_offset(slot), self.in_size + self.out_size + self.box_size)
        except OSError as exc:
            if fd is not None:
                raise
            if not self._disk_full:
                log.error("the journal's disk has no room for another client's rings (%s): refusing new clients "
                          "until there is; free some space where --state-dir is", exc.strerror or exc)
            self._disk_full = True
            return False
        if self._disk_full:
            log.info("the journal's disk has room again: taking new clients")
            self._disk_full = False
        return True

    # -- the two copies ---------------------------------------------------------------
    def _copy_offset(self, slot: int, copy: int) -> int:
        return HEADER_SIZE + (2 * slot + copy) * RECORD.size

    def _write(self, offset: int, data: bytes) -> None:
        """Every byte a commit writes goes through here (a test replays them)."""
        self._map[offset:offset + len(data)] = data

    # -- records -----------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken; commit a record to it, or None to give it back."""
        if not self._free:
            return None
        slot = self._free.pop()
        if not self._reserve(slot):
            self._free.append(slot)
            return None
        self._allocated.add(slot)
        return slot

    def take(self, slot: int) -> bool:
        """Hand out this very slot if it is free (a restore found a socket kept for it)."""
        if slot >= self.slots or self._used[slot] or slot in self._allocated or slot not in self._free:
            return False
        if not self._reserve(slot):
            return False
        self._free.remove(slot)
        self._allocated.add(slot)
        return True

    def commit(self, changes: dict[int, Record | None], cursor: int | None = None) -> None:
        """Make every record in ``changes``, and the ``cursor`` if given, current at once,
        crash-atomically; None frees a slot. The tally (chatd.tally) is committed with them."""
        cursor = self.cursor if cursor is None else cursor
        if not changes and cursor == self.cursor and not self.tally.unsaved:
            return
        sequence = self.committed + 1
        if self.durable:
            for slot, record in changes.items():
                self._write(self._copy_offset(slot, 1 - self._current[slot]), pack(sequence, record))
            selector = self._map[SELECTOR_OFFSET] & 1
            # Every commit: the spare copy becomes the current one.
            self._write(TALLY_OFFSETS[1 - selector], self.tally.packed())
            self._write(ROOT_OFFSETS[1 - selector], ROOT.pack(sequence, cursor))
            self._write(SELECTOR_OFFSET, bytes([1 - selector]))  # the one-byte flip that commits
            for slot in changes:
                self._current[slot] ^= 1
        self.committed, self.cursor = sequence, cursor
        self.tally.saved()
        for slot, record in changes.items():
            was_taken = self._used[slot] or slot in self._allocated
            self._used[slot] = record is not None
            self._allocated.discard(slot)
            if record is None and was_taken:
                self._free.append(slot)
                self._release_rings(slot)

    def used(self) -> int:
        """How many slots have a record."""
        return self._used.count(1)

    def read(self, slot: int) -> Record | None:
        return unpack(self._map, self._copy_offset(slot, self._current[slot]))

    def records(self, known: "dict[int, tuple[bytes, Record]] | None" = None):
        """(slot, record) for every used slot whose record reads; one that does not (a
        damaged file) is logged and its slot taken as free: its socket, if it comes back,
        is closed as a stranger's, rather than every other client lost with the file.

        ``known``: records read before (a standby's, :class:`JournalReader`), by slot, with
        the bytes each was read from; one whose current copy has exactly those bytes is
        taken as it is, not parsed again (the caller owns it now)."""
        known = known or {}
        size = RECORD.size
        for slot in range(self.slots):
            if self._used[slot]:
                offset = self._copy_offset(slot, self._current[slot])
                seen = known.get(slot)
                if seen is not None and self._map[offset:offset + size] == seen[0]:
                    yield slot, seen[1]
                    continue
                try:
                    record = unpack(self._map, offset)
                except Error as exc:
                    log.warning("journal slot %d unreadable, its client is let go: %s", slot, exc.message)
                    self._used[slot] = 0
                    self._free.append(slot)
                    continue
                yield slot, record

    # -- rings ------------------------------------------------------------------------
    def _ring_offset(self, slot: int) -> int:
        return self._rings + slot * (self.in_size + self.out_size + self.box_size)

    def in_ring(self, slot: int) -> memoryview:
        start = self._ring_offset(slot)
        return self._view[start:start + self.in_size]

    def out_ring(self, slot: int) -> memoryview:
        start = self._ring_offset(slot) + self.in_size
        return self._view[start:start + self.out_size]

    def box_ring(self, slot: int) -> memoryview:
        """The slot's outbox (empty on one host)."""
        start = self._ring_offset(slot) + self.in_size + self.out_size
        return self._view[start:start + self.box_size]

    def _release_rings(self, slot: int) -> None:
        """A freed slot's ring pages go back to the system (the file stays as large), if
        they are memory; a file's disk blocks stay reserved for the next client."""
        if self.on_disk:
            return
        try:
            self._map.madvise(mmap.MADV_REMOVE, self._ring_offset(slot), self.in_size + self.out_size + self.box_size)
        except (AttributeError, OSError):
            pass

    # -- the handling marker ----------------------------------------------------------
    def mark_handling(self, slot: int, offset: int) -> None:
        """Say which command is being handled: written before the valid byte, which comes last."""
        self._map[MARKER_OFFSET] = 0
        MARKER.pack_into(self._map, MARKER_OFFSET, 0, slot, offset)
        self._map[MARKER_OFFSET] = 1

    def clear_handling(self) -> None:
        self._map[MARKER_OFFSET] = 0

    def handling(self) -> tuple[int, int] | None:
        """(slot, offset) of the command a predecessor died while handling, if it did."""
        valid, slot, offset = MARKER.unpack_from(self._map, MARKER_OFFSET)
        return (slot, offset) if valid == 1 and slot < self.slots else None

    # -- the owner ------------------------------------------------------------------
    def set_owner(self, pid: int, start_time: int) -> None:
        """Say which process serves from this journal (chatd.standby reads it): advisory,
        not a commit."""
        OWNER.pack_into(self._map, OWNER_OFFSET, pid, start_time)

    def owner(self) -> tuple[int, int] | None:
        pid, start_time = OWNER.unpack_from(self._map, OWNER_OFFSET)
        return (pid, start_time) if pid else None

    def close(self, close_fd: bool = True) -> None:
        """Unmap; and close the descriptor unless ``close_fd`` is False (its owner closes it)."""
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            pass  # a ring view is still referenced somewhere: unmapped when the last one goes
        if close_fd:
            os.close(self.fd)


#: The kernel's flag for a task inside exit() (include/linux/sched.h): it runs no more of its own code.
PF_EXITING = 0x4


def process_identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time in clock ticks since boot), which no later process can share; None if
    gone, dead, a zombie (not yet reaped by its parent, but serving nobody), or exiting (killed:
    closing its files, which is how holderd saw it go, and running none of its code again)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
        if fields[0] in (b"Z", b"X", b"x") or int(fields[6]) & PF_EXITING:
            return None
        return pid, int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def read_owner(fd: int) -> tuple[int, int] | None:
    """The owner a journal file names (:meth:`Journal.owner`), read without mapping it;
    None if nobody serves from it, or if it is not a journal this release reads."""
    try:
        header = os.pread(fd, OWNER_OFFSET + OWNER.size, 0)
    except OSError:
        return None
    if len(header) < OWNER_OFFSET + OWNER.size or HEADER.unpack_from(header)[:2] != (MAGIC, VERSION):
        return None
    pid, start_time = OWNER.unpack_from(header, OWNER_OFFSET)
    return (pid, start_time) if pid else None


class JournalReader:
    """A journal as a standby reads it while another chatd commits to it: never written.

    :meth:`records` reads each used slot's committed record, as :meth:`Journal.attach`
    would choose it, parsing only those whose bytes changed since the last read. A
    copy being written meanwhile may be read torn; that is harmless, since
    :meth:`Journal.records` takes a record read here only if its bytes are exactly
    those of the current copy once the standby holds the journal itself."""

    def __init__(self, fd: int):
        """``fd`` stays the caller's. Error if it is not a journal this release reads."""
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise state_error(f"state file is {size} bytes, too short for a header")
        self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        magic, version, self.slots, record_size, *_ = HEADER.unpack_from(self._map, 0)
        if (magic, version, record_size) != (MAGIC, VERSION, RECORD.size) or \
                size < HEADER_SIZE + self.slots * 2 * RECORD.size:
            self._map.close()
            raise format_error(magic, version)
        self.known: dict[int, tuple[bytes, Record]] = {}

    def records(self) -> dict[int, tuple[bytes, Record]]:
        """Every used slot's committed record, and the bytes it was read from."""
        mapping, size = self._map, RECORD.size
        committed, _ = ROOT.unpack_from(mapping, ROOT_OFFSETS[mapping[SELECTOR_OFFSET] & 1])
        area = memoryview(mapping)[HEADER_SIZE:HEADER_SIZE + self.slots * 2 * size]
        try:
            tags = area.cast("Q")[::size // SEQ.size].tolist()
        finally:
            area.release()
        known, fresh = self.known, {}
        for slot in range(self.slots):
            first, second = tags[2 * slot], tags[2 * slot + 1]
            if first > committed:  # a copy a commit is writing: not current
                first = 0
            if second > committed:
                second = 0
            if not first and not second:
                continue
            offset = HEADER_SIZE + (2 * slot + (second > first)) * size
            raw = mapping[offset:offset + size]
            if raw[8] != 1:
                continue  # a free slot
            seen = known.get(slot)
            if seen is not None and seen[0] == raw:
                fresh[slot] = seen
                continue
            try:
                fresh[slot] = (raw, unpack(raw, 0))
            except Error:
                continue  # torn, or damaged: the takeover reads it itself
        self.known = fresh
        return fresh

    def close(self) -> None:
        try:
            self._map.close()
        except BufferError:
            pass
