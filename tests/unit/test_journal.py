"""The state journal: several records committed in one crash-atomic step, shared through a descriptor."""

import os

import pytest

from chatd.journal import HEADER_SIZE, PAGE, UNKNOWN_FORMAT, VERSION, Journal
from chatd.records import Record
from fdkeep.errors import Error
from recording_journal import Recording


def test_records_survive_through_another_descriptor():
    journal = Journal.create(8)
    slot = journal.allocate()
    journal.commit({slot: Record(1234, "line", "alice", "bob", 17)})
    copy = Journal.attach(os.dup(journal.fd))
    journal.close()
    assert list(copy.records()) == [(slot, Record(1234, "line", "alice", "bob", 17))]
    assert copy.allocate() != slot
    copy.close()


def test_one_commit_covers_several_records():
    journal = Journal.create(4)
    journal.commit({0: Record(1, "line", "a", "b", 0), 1: Record(2, "line", "b", "a", 0)})
    journal.commit({0: Record(1, "line", "a", "b", 5), 1: None, 3: Record(3, "websocket", None, None, 0)})
    copy = Journal.attach(os.dup(journal.fd))
    assert dict(copy.records()) == {0: Record(1, "line", "a", "b", 5), 3: Record(3, "websocket", None, None, 0)}
    copy.close()
    journal.close()


def test_freeing_a_slot_returns_it():
    journal = Journal.create(1)
    slot = journal.allocate()
    assert journal.allocate() is None
    journal.commit({slot: Record(1, "line", None, None, 0)})
    journal.commit({slot: None})
    assert journal.read(slot) is None
    assert journal.allocate() == slot
    journal.commit({slot: None})  # handed out, then given back unused
    assert journal.allocate() == slot
    journal.close()


def test_attach_refuses_a_foreign_file():
    fd = os.memfd_create("junk")
    os.write(fd, b"x" * (HEADER_SIZE + 4096))
    with pytest.raises(Error) as caught:
        Journal.attach(fd)
    assert caught.value.code == UNKNOWN_FORMAT
    assert "not a chatd journal" in caught.value.message and "`chatd --fresh`" in caught.value.message
    os.close(fd)


def with_header(journal: Journal, magic: bytes, version: int) -> int:
    """A copy of ``journal``'s file whose header names another magic and version."""
    data = bytearray(os.pread(journal.fd, os.fstat(journal.fd).st_size, 0))
    data[:12] = magic + version.to_bytes(4, "little")
    fd = os.memfd_create("other")
    os.write(fd, data)
    return fd


@pytest.mark.parametrize("magic, version, written_by", [
    (b"CHATDJ04", 4, "a release newer than this one"),
    (b"CHATDJ03", 4, "a release newer than this one"),
    (b"CHATDJ02", 2, "a development build before release 0.1.0"),
])
def test_a_journal_of_another_version_is_refused_not_taken_for_damage(magic, version, written_by):
    journal = Journal.create(2)
    journal.commit({0: Record(7, "line", "ann", "bob", 3)})
    fd = with_header(journal, magic, version)
    before = os.pread(fd, os.fstat(fd).st_size, 0)
    with pytest.raises(Error) as caught:
        Journal.attach(fd)
    error = caught.value
    assert error.code == UNKNOWN_FORMAT, "not bad-state: chatd must not start a new journal over it"
    assert f"version {version}" in error.message and written_by in error.message
    assert f"reads journal version {VERSION} only" in error.message and "`chatd --fresh`" in error.message
    assert os.pread(fd, len(before), 0) == before, "nothing touched"
    os.close(fd)
    journal.close()


def test_a_damaged_journal_of_this_version_is_damage_not_another_format():
    journal = Journal.create(2)
    data = bytearray(os.pread(journal.fd, os.fstat(journal.fd).st_size, 0))
    journal.close()
    data[20:24] = (4096).to_bytes(4, "little")  # the header's input ring size, no longer the file's
    fd = os.memfd_create("damaged")
    os.write(fd, data)
    with pytest.raises(Error) as caught:
        Journal.attach(fd)
    assert caught.value.code == "bad-state" and "damaged" in caught.value.message
    os.close(fd)


def image(journal) -> bytes:
    return os.pread(journal.fd, os.fstat(journal.fd).st_size, 0)


def state_of(data: bytes) -> dict:
    fd = os.memfd_create("replay")
    os.write(fd, data)
    journal = Journal.attach(fd)
    try:
        return {**dict(journal.records()), "cursor": journal.cursor}
    finally:
        journal.close()


BEFORE = {0: Record(10, "line", "ann", "bob", 3, 100, 40, 70), 1: Record(11, "line", "bob", "ann", 4, 9, 0, 12),
          2: Record(12, "line", "cid", None, 0, codec=b"\x01")}
AFTER_CHANGES = {0: Record(10, "line", "ann", "cid", 0, 130, 70, 95), 1: Record(11, "line", "bob", "ann", 0, 9, 5, 40),
                 2: Record(12, "line", "cid", "ann", 0, 77, poison_offset=77, poison_count=1),
                 3: Record(13, "websocket", "dan", None, 0, flags=3, incarnation=2**63 + 5, sent=7,
                           peer_incarnation=99, last_k=6, box_start=100, box_end=350)}
BEFORE_CURSOR, AFTER_CURSOR = 5, 42


@pytest.mark.parametrize("commits_before", [1, 2, 3], ids=["copy-1-spare", "copy-0-spare", "mixed"])
def test_every_prefix_of_a_commit_is_all_or_nothing(commits_before):
    """Replay a commit's writes one byte at a time onto the image before it: a reader
    of any prefix finds every record as before or every record as after, never a mix."""
    journal = Journal.create(5, PAGE, PAGE, PAGE)
    for index in range(commits_before):  # so that spares sit in different copies per slot
        journal.commit({slot: BEFORE[slot] for slot in list(BEFORE)[index % 3:]})
    journal.commit(BEFORE, cursor=BEFORE_CURSOR)
    before_image = image(journal)
    recorder = Recording(os.dup(journal.fd), journal.slots, PAGE, PAGE, journal.box_size, journal._map)
    recorder.writes.clear()
    recorder.commit(AFTER_CHANGES, cursor=AFTER_CURSOR)
    after = state_of(image(journal))
    assert after == {**AFTER_CHANGES, "cursor": AFTER_CURSOR}
    assert state_of(before_image) == {**BEFORE, "cursor": BEFORE_CURSOR}
    byte_writes = [(offset + i, data[i:i + 1]) for offset, data in recorder.writes for i in range(len(data))]
    seen = set()
    replayed = bytearray(before_image)
    for count in range(len(byte_writes) + 1):
        if count:
            offset, byte = byte_writes[count - 1]
            replayed[offset:offset + 1] = byte
        state = state_of(bytes(replayed))
        assert state in ({**BEFORE, "cursor": BEFORE_CURSOR}, after), \
            f"a reader after {count} of {len(byte_writes)} bytes saw a mix"
        seen.add("after" if state == after else "before")
    assert seen == {"before", "after"}
    os.close(recorder.fd)
    journal.close()


def test_a_commit_cut_short_cannot_be_revived_by_the_next_one():
    """The dead process wrote slot 0's spare for commit c+1 but never flipped; the next
    process's commit c+1 touches only slot 1. Slot 0 must keep its committed record."""
    journal = Journal.create(2, PAGE, PAGE)
    journal.commit({0: Record(1, "line", "old", None, 0), 1: Record(2, "line", None, None, 0)})

    class Dies(Exception):
        pass

    class CutShort(Journal):
        def _write(self, offset, data):
            if offset < HEADER_SIZE:
                raise Dies()  # the root is never written: a crash before the flip
            super()._write(offset, data)

    dying = CutShort(os.dup(journal.fd), 2, PAGE, PAGE, 0, journal._map)
    with pytest.raises(Dies):
        dying.commit({0: Record(1, "line", "torn", None, 9)})
    survivor = Journal.attach(os.dup(journal.fd))
    survivor.commit({1: Record(2, "line", "next", None, 0)})
    again = Journal.attach(os.dup(journal.fd))
    assert again.read(0) == Record(1, "line", "old", None, 0)
    assert again.read(1) == Record(2, "line", "next", None, 0)
    for j in (again, survivor):
        j.close()
    os.close(dying.fd)
    journal.close()


def test_rings_are_views_of_the_file_and_survive_through_another_descriptor():
    journal = Journal.create(3, PAGE, 2 * PAGE)
    journal.in_ring(1)[:5] = b"hello"
    journal.out_ring(1)[-3:] = b"end"
    assert len(journal.in_ring(2)) == PAGE and len(journal.out_ring(2)) == 2 * PAGE
    copy = Journal.attach(os.dup(journal.fd))
    assert bytes(copy.in_ring(1)[:5]) == b"hello" and bytes(copy.out_ring(1)[-3:]) == b"end"
    assert bytes(copy.in_ring(0)[:5]) == bytes(5) and bytes(copy.in_ring(2)[:5]) == bytes(5)
    copy.close()
    journal.close()


def test_a_freed_slot_gives_its_ring_pages_back():
    journal = Journal.create(2, PAGE, PAGE)
    slot = journal.allocate()
    journal.commit({slot: Record(1)})
    journal.out_ring(slot)[:4] = b"gone"
    journal.commit({slot: None})
    assert bytes(journal.out_ring(slot)[:4]) == bytes(4)
    journal.close()


def test_the_handling_marker_names_the_command_until_cleared():
    journal = Journal.create(4, PAGE, PAGE)
    assert journal.handling() is None
    journal.mark_handling(3, 123456789)
    assert Journal.attach(os.dup(journal.fd)).handling() == (3, 123456789)
    journal.clear_handling()
    assert journal.handling() is None
    journal.close()


def test_the_cursor_alone_is_committed_and_survives():
    journal = Journal.create(2, PAGE, PAGE, PAGE)
    journal.commit({}, cursor=7)
    again = Journal.attach(os.dup(journal.fd))
    assert (again.cursor, again.committed) == (7, 1) and again.box_size == PAGE
    assert len(again.box_ring(1)) == PAGE
    again.close()
    journal.close()


def test_a_reader_beside_the_writer_reads_what_attach_would_and_known_records_are_taken_only_unchanged():
    from chatd.journal import JournalReader

    journal = Journal.create(6, PAGE, PAGE)
    journal.commit({slot: Record(slot, "line", f"n{slot}", None, 0) for slot in range(5)})
    journal.commit({1: Record(1, "line", "one", None, 0), 3: None})
    reader = JournalReader(journal.fd)
    known = reader.records()
    assert {slot: record for slot, (_, record) in known.items()} == dict(Journal.attach(os.dup(journal.fd)).records())
    assert reader.records() == known and all(reader.records()[s][1] is known[s][1] for s in known), \
        "unchanged records are not parsed again"
    journal.commit({2: Record(2, "line", "two", None, 0)})  # after the reader's last look
    attached = Journal.attach(os.dup(journal.fd))
    taken = dict(attached.records(known))
    assert taken[2] == Record(2, "line", "two", None, 0), "a record that changed is read again"
    assert taken[0] is known[0][1] and taken[1] is known[1][1], "an unchanged one is taken as read"
    assert 3 not in taken
    reader.close()
    attached.close()
    journal.close()
