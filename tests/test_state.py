"""The memfd state file: crash-atomic records shared through a descriptor."""

import os

from chatd.state import HEADER, RECORD, RECORD_OFFSETS, SLOT_SIZE, Record, StateFile


def test_records_survive_through_another_descriptor():
    state = StateFile.create(8)
    slot = state.allocate()
    state.commit(slot, Record(1234, "line", "alice", "bob", 17))
    copy = StateFile.attach(os.dup(state.fd))
    state.close()
    assert list(copy.records()) == [(slot, Record(1234, "line", "alice", "bob", 17))]
    assert copy.allocate() != slot
    copy.close()


def test_a_write_torn_before_the_flip_leaves_the_old_record():
    state = StateFile.create(2)
    state.commit(0, Record(1, "line", "a", None, 1))
    # A crash after writing the spare copy but before the flip: write the spare by hand.
    base = HEADER.size
    spare = 1 - state._map[base]
    offset = base + RECORD_OFFSETS[spare]
    state._map[offset:offset + RECORD.size] = RECORD.pack(1, 0, 0, 1, 99, b"zzz", b"")[: RECORD.size // 2] + bytes(
        RECORD.size - RECORD.size // 2
    )
    reread = StateFile.attach(os.dup(state.fd))
    assert reread.read(0) == Record(1, "line", "a", None, 1)
    reread.close()
    state.close()


def test_freeing_a_slot_returns_it():
    state = StateFile.create(1)
    slot = state.allocate()
    assert state.allocate() is None
    state.commit(slot, Record(1, "line", None, None, 0))
    state.commit(slot, None)
    assert state.read(slot) is None
    assert state.allocate() == slot
    state.close()


def test_attach_refuses_a_foreign_file():
    fd = os.memfd_create("junk")
    os.write(fd, b"x" * (HEADER.size + SLOT_SIZE))
    try:
        StateFile.attach(fd)
    except Exception as exc:
        assert "not a chatd state file" in str(exc)
    else:
        raise AssertionError("a foreign file was accepted")
    finally:
        os.close(fd)
