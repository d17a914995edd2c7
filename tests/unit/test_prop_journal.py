"""Properties of the state journal's reader (chatd.journal): records round-trip, and a journal
file with any corruption is read or refused, never an unexpected exception.

What "read" may mean for corrupted bytes: the journal has no checksum, so a
changed byte inside a record copy or the committed numbers is read as what it
now says (a record with another count, the previous commit). What the format
does promise, and these tests hold it to:

- a file that is not a journal of this version and geometry is refused with
  ``Error("bad-state")`` (what chatd.restore catches, to start afresh);
- whatever is accepted can be used: every record read is well formed and can be
  committed again, and a new commit is read back by the next reader (a restore
  commits what it read: a record chatd cannot write back would crash every chatd
  that restores from the file);
- bytes the format does not use (padding, reserved, the rings) change nothing.
"""

from __future__ import annotations

import os
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.journal import (HEADER, HEADER_SIZE, MARKER_OFFSET, OWNER_OFFSET, PAGE, ROOT_OFFSETS,
                           SELECTOR_OFFSET, UNKNOWN_FORMAT, Journal)
from chatd.records import PROTOCOLS, RECORD, Record
from fdkeep.errors import Error
from proptools import examples, open_fds

U64 = st.integers(0, 2 ** 64 - 1)
nicks = st.none() | st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=32)
records = st.builds(
    Record, inode=U64, protocol=st.sampled_from(PROTOCOLS), nick=nicks, target=nicks, received=U64,
    in_handled=U64, out_start=U64, out_end=U64, flags=st.integers(0, 255),
    codec=st.sampled_from([b"", b"\x01", b"W", b"C"]) | st.binary(max_size=16).map(lambda b: b.rstrip(b"\0")),
    poison_offset=U64, poison_count=st.integers(0, 255),
)
SLOTS = 4


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("journal-prop")
    os.write(fd, data)
    return fd


def image(journal: Journal) -> bytes:
    return os.pread(journal.fd, os.fstat(journal.fd).st_size, 0)


@examples(100)
@given(commits=st.lists(st.dictionaries(st.integers(0, SLOTS - 1), st.none() | records, min_size=1), max_size=6))
def test_committed_records_come_back_through_another_descriptor(commits):
    before = open_fds()
    journal = Journal.create(SLOTS, PAGE, PAGE)
    model: dict[int, Record] = {}
    for changes in commits:
        journal.commit(changes)
        for slot, record in changes.items():
            if record is None:
                model.pop(slot, None)
            else:
                model[slot] = record
        again = Journal.attach(os.dup(journal.fd))
        assert dict(again.records()) == model
        again.close()
    journal.close()
    assert open_fds() == before


# -- corruption --------------------------------------------------------------------------------
def unused_offsets(slots: int) -> list[range]:
    """Byte ranges the format does not read: header gaps, record padding and reserved bytes."""
    header = [range(HEADER.size, SELECTOR_OFFSET), range(SELECTOR_OFFSET + 1, ROOT_OFFSETS[0]),
              range(ROOT_OFFSETS[1] + 8, MARKER_OFFSET), range(MARKER_OFFSET + 1, MARKER_OFFSET + 4),
              range(MARKER_OFFSET + 16, OWNER_OFFSET), range(OWNER_OFFSET + 4, OWNER_OFFSET + 8),
              range(OWNER_OFFSET + 16, HEADER_SIZE)]
    records_area = []
    for index in range(2 * slots):
        start = HEADER_SIZE + index * RECORD.size
        records_area += [range(start + 12, start + 16), range(start + RECORD.size - 16, start + RECORD.size)]
    return header + records_area


commit_lists = st.lists(st.dictionaries(st.integers(0, SLOTS - 1), st.none() | records, min_size=1),
                        min_size=1, max_size=4)


def journal_image(commits) -> bytes:
    """The bytes of a journal after these commits, with something in every ring."""
    journal = Journal.create(SLOTS, PAGE, PAGE)
    for changes in commits:
        journal.commit(changes)
    for slot in range(SLOTS):
        journal.in_ring(slot)[:8] = b"in-ring!"
        journal.out_ring(slot)[-8:] = b"outring!"
    data = image(journal)
    journal.close()
    return data


#: The file's identity (magic, version, geometry): a change there is refused, mostly.
IDENTITY_FIELDS = [(0, 8), (8, 4), (12, 4), (16, 4), (20, 4), (24, 4)]
#: The header's state: what a change there does is read.
STATE_FIELDS = [(SELECTOR_OFFSET, 1), (ROOT_OFFSETS[0], 8), (ROOT_OFFSETS[1], 8), (MARKER_OFFSET, 1), (MARKER_OFFSET + 4, 4), (MARKER_OFFSET + 8, 8),
                 (OWNER_OFFSET, 4), (OWNER_OFFSET + 8, 8)]
RECORD_FIELDS = [(0, 8), (8, 1), (9, 1), (10, 1), (11, 1), (16, 8), (24, 8), (32, 8), (40, 8), (48, 8), (56, 8),
                 (64, 32), (96, 32), (128, 16)]


@st.composite
def field_values(draw, width: int) -> bytes:
    """A value for a field of ``width`` bytes: an edge of its range, any number, or any bytes."""
    top = 2 ** (8 * width) - 1
    if width > 8:
        return draw(st.binary(min_size=1, max_size=width))
    value = draw(st.sampled_from([0, 1, 2, top // 2 + 1, top - 1, top]) | st.integers(0, top))
    return value.to_bytes(width, "little")


def corrupt(draw, data: bytes, where, words: bool = True, slots: int = SLOTS) -> bytes:
    """1 to 4 changes: a byte or a bit at an offset drawn from ``where``, or (``words``) a field
    of the header or of a record copy set to an edge value."""
    data = bytearray(data)
    record_fields = [(HEADER_SIZE + copy * RECORD.size + at, width) for copy in range(2 * slots)
                     for at, width in RECORD_FIELDS]
    fields = {"identity": IDENTITY_FIELDS, "state": STATE_FIELDS, "record": record_fields}
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["byte", "bit", "state", "state", "record", "record", "identity"] if words
                                   else ["byte", "bit"]))
        if how in fields:
            offset, width = draw(st.sampled_from(fields[how]))
            value = draw(field_values(width))
            data[offset:offset + len(value)] = value
            continue
        offset = draw(where)
        if how == "byte":
            data[offset] = draw(st.integers(0, 255))
        else:
            data[offset] ^= 1 << draw(st.integers(0, 7))
    return bytes(data)


def read_and_use(data: bytes) -> dict | None:
    """Attach a journal file; None if it is refused with Error. Otherwise check what was read
    is usable: commit it all back, plus a new record, and read that back; the records read."""
    fd = memfd_with(data)
    try:
        journal = Journal.attach(fd)
    except Error as exc:
        os.close(fd)
        # damage, or a magic or version damaged into another (refused as a format not ours)
        assert exc.code in ("bad-state", UNKNOWN_FORMAT) and exc.message
        return None
    try:
        read = dict(journal.records())
        for slot, record in read.items():
            assert isinstance(record, Record) and record.protocol in PROTOCOLS
            assert len(record.codec) <= 16
        journal.handling(), journal.owner()
        journal.commit(dict(read))  # what restore does with what it read: write it back
        free = journal.allocate()
        changes = {free: Record(99, "line", "new", None, 1)} if free is not None else {}
        journal.commit(changes)
        again = Journal.attach(os.dup(journal.fd))
        try:
            assert dict(again.records()) == {**read, **changes}
        finally:
            again.close()
        return read
    finally:
        journal.close()


@examples(200)
@given(data=st.data(), commits=commit_lists)
def test_any_corruption_is_read_and_usable_or_refused_with_an_error(data, commits):
    original = journal_image(commits)
    before = open_fds()
    size = len(original)
    # bytes anywhere, mostly in the header and the records, where they matter
    records_end = HEADER_SIZE + 2 * SLOTS * RECORD.size
    where = (st.integers(HEADER.size, OWNER_OFFSET + 16) | st.integers(HEADER_SIZE, records_end - 1)
             | st.integers(0, size - 1))
    damaged = corrupt(data.draw, original, where)
    if data.draw(st.integers(0, 9)) == 0:
        damaged = damaged[:data.draw(st.integers(0, size))]
    try:
        read_and_use(damaged)
    finally:
        assert open_fds() == before


@examples(100)
@given(data=st.data(), commits=commit_lists)
def test_bytes_the_format_does_not_use_change_nothing(data, commits):
    original = journal_image(commits)
    expected = read_and_use(original)
    unused = [offset for span in unused_offsets(SLOTS) for offset in span]
    rings = st.integers(Journal.rings_offset(SLOTS), len(original) - 1)
    damaged = corrupt(data.draw, original, st.sampled_from(unused) | rings, words=False)
    if data.draw(st.booleans()):  # the selector's other bits: only bit 0 selects
        damaged = bytearray(damaged)
        damaged[SELECTOR_OFFSET] ^= data.draw(st.integers(1, 127)) << 1
        damaged = bytes(damaged)
    assert read_and_use(damaged) == expected


# -- bugs found here, fixed ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field_offset", [64, 96], ids=["nick", "target"])
def test_a_name_byte_over_127_is_refused_or_read_as_a_writable_name(field_offset):
    """Found by fuzzing, fixed: chatd/journal.py Journal.read: _unpack_name decodes a record's
    nick/target with errors='replace', so a byte over 127 in the file reads as '\\ufffd', which
    _pack_name's encode('ascii') cannot write back: the next commit of that record (chatd.restore
    commits what it restores) raises UnicodeEncodeError, not Error, and every chatd restoring from
    the file dies. Fix: check names as the room does ([A-Za-z0-9_-]{1,32}) when reading, and refuse
    the record (or the file) as bad-state"""
    journal = Journal.create(SLOTS, PAGE, PAGE)
    journal.commit({0: Record(5, "line", "ann", "bob", 1)})
    data = bytearray(image(journal))
    journal.close()
    offset = HEADER_SIZE + journal._current[0] * RECORD.size + field_offset
    assert data[offset:offset + 3] in (b"ann", b"bob")
    data[offset] = 0xE9
    read_and_use(bytes(data))


def test_a_committed_sequence_at_the_top_of_its_range_is_refused_or_usable():
    """Found by fuzzing, fixed: chatd/journal.py Journal.attach accepts any committed sequence
    number; Journal.commit packs committed + 1 as a u64, so from 2**64 - 1 (one corrupted root
    word) it raises struct.error, not Error: every chatd restoring from the file dies at its first
    commit. Fix: refuse in attach a committed number (or a record tag) of 2**63 or more as
    bad-state (no real journal gets there)"""
    journal = Journal.create(SLOTS, PAGE, PAGE)
    journal.commit({0: Record(5, "line", "ann", None, 1)})
    data = bytearray(image(journal))
    journal.close()
    root = ROOT_OFFSETS[data[SELECTOR_OFFSET] & 1]
    data[root:root + 8] = (2 ** 64 - 1).to_bytes(8, "little")
    read_and_use(bytes(data))


@pytest.mark.parametrize("offset, value", [(12, 2), (12, 1)], ids=["slots-2", "slots-1"])
def test_a_header_whose_geometry_does_not_match_the_file_is_refused(offset, value):
    """Found by fuzzing, fixed: chatd/journal.py Journal.attach only checks that the file is at
    least size_for(slots, in_size, out_size): a header whose slot count (or ring sizes) was changed
    to a smaller geometry is accepted, and the records of the slots past it are silently lost
    (chatd.restore then closes their clients' sockets as strangers). Journal.create makes the file
    exactly size_for(...): Fix: refuse as bad-state a file whose size is not exactly that"""
    journal = Journal.create(SLOTS, PAGE, PAGE)
    journal.commit({3: Record(5, "line", "ann", None, 1)})
    data = bytearray(image(journal))
    journal.close()
    data[offset:offset + 4] = value.to_bytes(4, "little")
    assert read_and_use(bytes(data)) in (None, {3: Record(5, "line", "ann", None, 1)})
