"""chatd's crash-surviving state: one record per connection in a shared memfd.

Theory of operation
-------------------
The state lives in a ``memfd`` that chatd maps, and whose descriptor it hands
to its holders (holderd and systemd's fd store) like any socket. Every holder
keeps the same file, so whichever copy survives a crash shows the state as the
dead process last committed it: memory writes to a shared mapping are in the
file the moment they are made, no flush needed.

The file is a header and a fixed array of *slots*, one per connection. A slot
keeps two copies of its record and a one-byte selector saying which copy is
current. :meth:`StateFile.commit` writes the record into the copy that is *not*
current, then flips the selector. A process can die between any two
instructions, but a one-byte store is indivisible, so a reader finds either
the old record whole or the new one whole, never a mix.

Layout (little-endian)::

    header (64 bytes): magic "CHATDST1", version u32, slot count u32
    slot (192 bytes):  selector u8, 7 bytes padding, record copy 0, record copy 1
    record (88 bytes): used u8, protocol u8, 2 bytes padding, reserved u32,
                       socket inode u64, received u64, nick 32s, target 32s

Records hold what the room needs to resume (see :class:`chatd.room.Member`) and
the socket's inode, which ties a record to whichever duplicate of the socket
comes back. Names are ASCII of at most 32 bytes, NUL-padded.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass

MAGIC = b"CHATDST1"
VERSION = 1
HEADER = struct.Struct("<8sII48x")
RECORD = struct.Struct("<BBxxIQQ32s32s")
SLOT_SIZE = 192
RECORD_OFFSETS = (8, 8 + RECORD.size)
PROTOCOLS = ("line", "websocket")

assert HEADER.size == 64 and 8 + 2 * RECORD.size <= SLOT_SIZE


class StateError(Exception):
    pass


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
    return raw.rstrip(b"\0").decode("ascii") or None


class StateFile:
    def __init__(self, fd: int, slots: int, mapping: mmap.mmap):
        self.fd = fd
        self.slots = slots
        self._map = mapping
        self._free = [slot for slot in range(slots - 1, -1, -1) if not self._used(slot)]

    @classmethod
    def create(cls, slots: int) -> "StateFile":
        fd = os.memfd_create("chatd-state", os.MFD_CLOEXEC)
        size = HEADER.size + slots * SLOT_SIZE
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size)
        HEADER.pack_into(mapping, 0, MAGIC, VERSION, slots)
        return cls(fd, slots, mapping)

    @classmethod
    def attach(cls, fd: int) -> "StateFile":
        """Map a state file that survived a crash; ``fd`` becomes this object's."""
        size = os.fstat(fd).st_size
        if size < HEADER.size:
            raise StateError(f"state file is {size} bytes, too short for a header")
        mapping = mmap.mmap(fd, size)
        magic, version, slots = HEADER.unpack_from(mapping, 0)
        if magic != MAGIC or version != VERSION:
            mapping.close()
            raise StateError(f"not a chatd state file of version {VERSION} (magic {magic!r}, version {version})")
        if size < HEADER.size + slots * SLOT_SIZE:
            mapping.close()
            raise StateError(f"state file of {size} bytes cannot hold its {slots} slots")
        return cls(fd, slots, mapping)

    def _slot_offset(self, slot: int) -> int:
        return HEADER.size + slot * SLOT_SIZE

    def _current_offset(self, slot: int) -> int:
        base = self._slot_offset(slot)
        return base + RECORD_OFFSETS[self._map[base] & 1]

    def _used(self, slot: int) -> bool:
        return self._map[self._current_offset(slot)] == 1

    def allocate(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def commit(self, slot: int, record: Record | None) -> None:
        """Make ``record`` the slot's current record, crash-atomically; None frees the slot."""
        base = self._slot_offset(slot)
        spare = 1 - (self._map[base] & 1)
        if record is None:
            packed = RECORD.pack(0, 0, 0, 0, 0, b"", b"")
        else:
            packed = RECORD.pack(
                1,
                PROTOCOLS.index(record.protocol),
                0,
                record.inode,
                record.received,
                _pack_name(record.nick),
                _pack_name(record.target),
            )
        offset = base + RECORD_OFFSETS[spare]
        self._map[offset:offset + RECORD.size] = packed
        self._map[base] = spare  # the one-byte flip that commits
        if record is None:
            self._free.append(slot)

    def read(self, slot: int) -> Record | None:
        used, protocol, _, inode, received, nick, target = RECORD.unpack_from(self._map, self._current_offset(slot))
        if used != 1:
            return None
        return Record(inode, PROTOCOLS[protocol], _unpack_name(nick), _unpack_name(target), received)

    def records(self):
        """(slot, record) for every used slot."""
        for slot in range(self.slots):
            record = self.read(slot)
            if record is not None:
                yield slot, record

    def claim(self, slot: int) -> None:
        """Mark a slot taken that :meth:`attach` found free (restoring without a record)."""
        self._free.remove(slot)

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)
