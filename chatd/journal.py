"""chatd's crash-surviving state: a journal of per-connection records in a shared memfd.

Theory of operation
-------------------
The state lives in a ``memfd`` that chatd maps, and whose descriptor it hands
to its holders (holderd and systemd's fd store) like any socket. Every holder
keeps the same file, so whichever copy survives a crash shows the state as the
dead process last committed it: writes to a shared mapping are in the file the
moment they are made, no flush needed.

The file is a header and a fixed array of *slots*, one per connection. A slot
keeps two copies of its :class:`Record`, each tagged with the sequence number
of the commit that wrote it. The header keeps the *committed* sequence number,
itself twice, with a one-byte selector saying which copy is current.

:meth:`Journal.commit` makes several records current in one atomic step:

1. every record goes into its slot's spare copy (the one that is not current),
   tagged with the next sequence number ``c + 1``;
2. ``c + 1`` goes into the spare copy of the committed number;
3. the selector byte flips. That one-byte store is the commit.

A process can die between any two instructions, but a one-byte store is
indivisible: a reader (:meth:`Journal.attach`) takes the committed number ``c``
the selector points at and, in each slot, the copy with the highest tag not
above ``c``. Before the flip it finds every record as it was; after it, every
record as committed. Copies tagged above ``c`` are what a crash cut short;
:meth:`~Journal.attach` erases their tags so that no later commit can revive
them. Nothing is ever written over a current copy, so there is nothing to undo.

Layout (little-endian)::

    header (4096 bytes): magic "CHATDJ01", version u32, slot count u32,
                         record size u32, then at 64: selector u8,
                         at 72 and 80: committed sequence u64 (copies 0 and 1)
    slot (2 records):    record copy 0, record copy 1
    record (128 bytes):  seq u64, used u8, protocol u8, 6 padding, socket inode u64,
                         received u64, nick 32s, target 32s, 32 reserved

Records hold what the room needs to resume (see :class:`chatd.room.Member`) and
the socket's inode, which ties a record to whichever duplicate of the socket
comes back. Names are ASCII of at most 32 bytes, NUL-padded.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

from fdkeep.errors import Error

MAGIC = b"CHATDJ01"
VERSION = 1
HEADER = struct.Struct("<8sIII")
HEADER_SIZE = 4096
SELECTOR_OFFSET = 64
ROOT_OFFSETS = (72, 80)
SEQ = struct.Struct("<Q")
RECORD = struct.Struct("<QBB6xQQ32s32s32x")
PROTOCOLS = ("line", "websocket")

assert RECORD.size == 128


@dataclass
class Record:
    inode: int
    protocol: str
    nick: str | None
    target: str | None
    received: int


def _pack_name(name: str | None) -> bytes:
    return (name or "").encode("ascii")


def _unpack_name(raw: bytes) -> str | None:
    return raw.rstrip(b"\0").decode("ascii", "replace") or None


def state_error(message: str) -> Error:
    return Error("bad-state", message)


class Journal:
    def __init__(self, fd: int, slots: int, mapping: mmap.mmap):
        self.fd = fd
        self.slots = slots
        self._map = mapping
        self.committed = SEQ.unpack_from(mapping, ROOT_OFFSETS[mapping[SELECTOR_OFFSET] & 1])[0]
        #: Which copy of each slot is current.
        self._current = bytearray(slots)
        #: Slots neither used nor handed out by allocate(); popped from the end.
        self._free: list[int] = []
        for slot in range(slots - 1, -1, -1):
            self._current[slot] = self._pick_current(slot)
            if self.read(slot) is None:
                self._free.append(slot)
        self._allocated: set[int] = set()

    # -- making and finding the file ----------------------------------------------------
    @staticmethod
    def size_for(slots: int) -> int:
        return HEADER_SIZE + slots * 2 * RECORD.size

    @classmethod
    def create(cls, slots: int) -> "Journal":
        fd = os.memfd_create("chatd-journal", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, cls.size_for(slots))
            mapping = mmap.mmap(fd, cls.size_for(slots))
        except OSError:
            os.close(fd)
            raise
        HEADER.pack_into(mapping, 0, MAGIC, VERSION, slots, RECORD.size)
        return cls(fd, slots, mapping)

    @classmethod
    def attach(cls, fd: int) -> "Journal":
        """Map a journal that survived a crash; ``fd`` becomes this object's (on success)."""
        size = os.fstat(fd).st_size
        if size < HEADER_SIZE:
            raise state_error(f"state file is {size} bytes, too short for a header")
        mapping = mmap.mmap(fd, size)
        magic, version, slots, record_size = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION or record_size != RECORD.size:
            mapping.close()
            raise state_error(f"not a chatd journal of version {VERSION} (magic {magic!r}, version {version})")
        if size < cls.size_for(slots):
            mapping.close()
            raise state_error(f"state file of {size} bytes cannot hold its {slots} slots")
        return cls(fd, slots, mapping)

    # -- the two copies ---------------------------------------------------------------
    def _copy_offset(self, slot: int, copy: int) -> int:
        return HEADER_SIZE + (2 * slot + copy) * RECORD.size

    def _tag(self, slot: int, copy: int) -> int:
        return SEQ.unpack_from(self._map, self._copy_offset(slot, copy))[0]

    def _pick_current(self, slot: int) -> int:
        """The copy with the highest tag a commit made; erase a tag no commit made."""
        tags = [self._tag(slot, copy) for copy in (0, 1)]
        for copy, tag in enumerate(tags):
            if tag > self.committed:
                self._write(self._copy_offset(slot, copy), SEQ.pack(0))
                tags[copy] = 0
        return 0 if tags[0] >= tags[1] else 1

    def _write(self, offset: int, data: bytes) -> None:
        """Every byte the journal writes goes through here (a test replays them)."""
        self._map[offset:offset + len(data)] = data

    # -- records -----------------------------------------------------------------------
    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken; commit a record to it, or None to give it back."""
        if not self._free:
            return None
        slot = self._free.pop()
        self._allocated.add(slot)
        return slot

    def commit(self, changes: dict[int, Record | None]) -> None:
        """Make every record in ``changes`` current at once, crash-atomically; None frees a slot."""
        if not changes:
            return
        sequence = self.committed + 1
        for slot, record in changes.items():
            if record is None:
                packed = RECORD.pack(sequence, 0, 0, 0, 0, b"", b"")
            else:
                packed = RECORD.pack(
                    sequence, 1, PROTOCOLS.index(record.protocol), record.inode, record.received,
                    _pack_name(record.nick), _pack_name(record.target),
                )
            self._write(self._copy_offset(slot, 1 - self._current[slot]), packed)
        selector = self._map[SELECTOR_OFFSET] & 1
        self._write(ROOT_OFFSETS[1 - selector], SEQ.pack(sequence))
        self._write(SELECTOR_OFFSET, bytes([1 - selector]))  # the one-byte flip that commits
        self.committed = sequence
        for slot, record in changes.items():
            was_taken = self.read(slot) is not None or slot in self._allocated
            self._current[slot] ^= 1
            self._allocated.discard(slot)
            if record is None and was_taken:
                self._free.append(slot)

    def read(self, slot: int) -> Record | None:
        _, used, protocol, inode, received, nick, target = RECORD.unpack_from(
            self._map, self._copy_offset(slot, self._current[slot]))
        if used != 1:
            return None
        return Record(inode, PROTOCOLS[protocol] if protocol < len(PROTOCOLS) else "line",
                      _unpack_name(nick), _unpack_name(target), received)

    def records(self):
        """(slot, record) for every used slot."""
        for slot in range(self.slots):
            record = self.read(slot)
            if record is not None:
                yield slot, record

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
