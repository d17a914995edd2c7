"""A client's record: every field the room keeps of a member goes to the journal and comes back,
and the bytes keep the layout journal version 3 was written with."""

import re
import struct
from dataclasses import fields

from chatd.records import (FIELDS, LAYOUT_V3, LAYOUT_V3_SESSIONS, MEMBER_FIELDS, RECORD, REMOTE_PAIRED, Record, member_of, pack,
                           unpack)
from chatd.room import Member


def test_every_field_of_a_member_that_survives_has_one_name_in_both():
    member_fields = {field.name for field in fields(Member)}
    record_fields = {field.name for field in fields(Record)}
    assert set(MEMBER_FIELDS) <= member_fields & record_fields
    # A member's field that is neither kept by name, nor derived (its id is the slot, its peer is
    # derived from targets, remote_paired is a flag), would be lost on restore without a word.
    assert member_fields - set(MEMBER_FIELDS) == {"id", "peer", "remote_paired"}


def test_a_record_through_its_bytes_and_back_to_a_member():
    record = Record(inode=77, protocol="websocket", nick="ann", target="bob", received=5, in_handled=10,
                    out_start=3, out_end=9, flags=REMOTE_PAIRED, codec=b"\x01\x02", poison_offset=4,
                    poison_count=1, incarnation=123, sent=6, peer_incarnation=456, last_k=2, box_start=1, box_end=8)
    buffer = bytearray(RECORD.size)
    buffer[:] = pack(42, record)
    assert unpack(buffer, 0) == record
    member = member_of(9, record)
    assert member == Member(9, "websocket", "ann", "bob", 5, incarnation=123, sent=6, peer_incarnation=456,
                            last_k=2, remote_paired=True)
    buffer[:] = pack(43, None)
    assert unpack(buffer, 0) is None


def test_the_layout_is_version_3s():
    assert RECORD.format == LAYOUT_V3_SESSIONS and RECORD.size == struct.calcsize(LAYOUT_V3) == 208
    # A session's fields are where version 3 had padding; every other field is where it was.
    v3 = re.findall(r"\d*[a-zA-Z]", LAYOUT_V3[1:])
    now = re.findall(r"\d*[a-zA-Z]", LAYOUT_V3_SESSIONS[1:])
    assert [(a, b) for a, b in zip(v3, now) if a != b] == [("4x", "I"), ("16x", "16s")]


def test_a_record_a_release_without_sessions_wrote_reads_as_one_without_a_session():
    record = Record(inode=7, nick="ann", received=3)
    written_by_0_1_0 = struct.pack(LAYOUT_V3, 5, 1, 0, 0, 0, 7, 3, 0, 0, 0, 0, b"ann", b"", b"", 0, 0, 0, 0, 0, 0)
    assert unpack(written_by_0_1_0, 0) == record
    # ... and the other way: a release without sessions reads one with a session as without it.
    with_session = pack(6, Record(inode=7, nick="ann", received=3, token=b"\x01" * 16, handled=9))
    assert struct.unpack(LAYOUT_V3, with_session) == struct.unpack(LAYOUT_V3, pack(6, record))
    assert [field.name for field in FIELDS if field.name][:3] == ["protocol", "flags", "poison_count"]
