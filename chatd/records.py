"""What survives a crash of one client, in one place: its journal record, its layout, its conversions.

Theory of operation
-------------------
While chatd runs, a client's state lives in two objects with one owner each: its
*member* in the room (nick, target, counts: :class:`chatd.room.Member`, the room's)
and its *connection* (how far its input is handled, its output sent, its codec's
state, its outbox: :class:`chatd.connection.Connection`, the server's). A crash
keeps neither; the journal keeps a :class:`Record` of both, committed with the
effects of every command (:mod:`chatd.server`).

This module is the one place that converts between them (:func:`record_of`,
:func:`member_of`) and the one place that lays a record out in bytes:
:data:`FIELDS` names each field once, in the order of the bytes, with its struct
code and how it is written and read. The record's struct, the journal's packing
and reading (:func:`pack`, :func:`unpack`) follow from it. A new field is a line
in :data:`FIELDS` and :class:`Record` and its owner's attribute; the member's
fields go by the same names in :class:`~chatd.room.Member` and :class:`Record`
(:data:`MEMBER_FIELDS`), so a field the room keeps cannot be forgotten on the way
to the journal and back.

The layout is the journal's format: :data:`LAYOUT_V3` is frozen, and a change of
:data:`FIELDS` that changes the bytes fails at import until the journal's version
says so (:mod:`chatd.journal`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import Any, Callable, Protocol

from fdkeep.errors import Error

from .room import NAME_RE, Member

#: The protocols a record can name, by their index in it.
PROTOCOLS = ("line", "websocket")

#: Record flags.
CLOSING = 1  # said its last word (BYE); to be closed once its output is sent
REMOTE_PAIRED = 2  # paired with a member of another host (chatd.room.Member.remote_paired)


@dataclass
class Record:
    inode: int
    protocol: str = "line"
    nick: str | None = None
    target: str | None = None
    #: Messages received on the current pairing (the n of the last From).
    received: int = 0
    #: Stream offset up to which the client's input is handled.
    in_handled: int = 0
    #: Stream offsets of the output committed to send: [out_start, out_end).
    out_start: int = 0
    out_end: int = 0
    flags: int = 0
    #: The codec's parse state at ``in_handled`` (see chatd.protocols).
    codec: bytes = b""
    #: The input offset a predecessor crashed handling, and how many times (chatd.lastwords).
    poison_offset: int = 0
    poison_count: int = 0
    #: Across hosts (see chatd.room.Member): the nick's incarnation and the k of the last
    #: forward; the incarnation and k of the last forward received.
    incarnation: int = 0
    sent: int = 0
    peer_incarnation: int = 0
    last_k: int = 0
    #: Stream offsets of the outbox's forwards not yet acknowledged: [box_start, box_end).
    box_start: int = 0
    box_end: int = 0
    #: A session (chatd.sessions): its token's hash (b"": none), and the client's chat
    #: commands handled since it began.
    token: bytes = b""
    handled: int = 0


def state_error(message: str) -> Error:
    return Error("bad-state", message)


def _pack_name(name: str | None) -> bytes:
    return (name or "").encode("ascii")


def _unpack_name(raw: bytes) -> str | None:
    """A nick as written (:data:`chatd.room.NAME_RE`); anything else is a damaged file."""
    name = raw.rstrip(b"\0")
    text = name.decode("ascii", "replace")
    if name and not NAME_RE.match(text):
        raise state_error(f"a record names {name[:40]!r}, not a nick: the state file is damaged; "
                          "`chatd --fresh` starts anew")
    return text or None


def _same(value):
    return value


@dataclass(frozen=True)
class Field:
    """One field of a record in the bytes: its name in :class:`Record` (None: padding), its
    struct code, and how it is written (``put``) and read (``get``)."""

    name: str | None
    code: str
    put: Callable = _same
    get: Callable = _same


#: A record's bytes after its sequence number and its used-byte, in order: the one list of them.
FIELDS = (
    Field("protocol", "B", PROTOCOLS.index, lambda index: PROTOCOLS[index] if index < len(PROTOCOLS) else "line"),
    Field("flags", "B"),
    Field("poison_count", "B", lambda count: min(count, 255)),
    Field("handled", "I", lambda count: count & 0xFFFFFFFF),
    Field("inode", "Q"),
    Field("received", "Q"),
    Field("in_handled", "Q"),
    Field("out_start", "Q"),
    Field("out_end", "Q"),
    Field("poison_offset", "Q"),
    Field("nick", "32s", _pack_name, _unpack_name),
    Field("target", "32s", _pack_name, _unpack_name),
    Field("codec", "16s", bytes, lambda raw: raw.rstrip(b"\0")),
    Field("incarnation", "Q"),
    Field("sent", "Q"),
    Field("peer_incarnation", "Q"),
    Field("last_k", "Q"),
    Field("box_start", "Q"),
    Field("box_end", "Q"),
    Field("token", "16s", bytes, lambda raw: raw if any(raw) else b""),
)
_VALUES = tuple(field for field in FIELDS if field.name is not None)

#: The record's struct: its sequence number (u64), a used-byte, then :data:`FIELDS`.
RECORD = struct.Struct("<QB" + "".join(field.code for field in FIELDS))
#: The layout journal version 3 was written with; a change here is a new journal version.
LAYOUT_V3 = "<QBBBB4xQQQQQQ32s32s16sQQQQQQ16x"
#: Version 3 with a session's two fields in what was padding (``handled`` in the 4 bytes, ``token``
#: in the 16): the same bytes where every field of version 3 is, and zero where a release that
#: knows no sessions wrote padding, which reads as "no session". So each release reads what the
#: other wrote (an older one drops the sessions, nothing else), and the version stays 3.
LAYOUT_V3_SESSIONS = "<QBBBBIQQQQQQ32s32s16sQQQQQQ16s"
assert RECORD.format == LAYOUT_V3_SESSIONS and RECORD.size == struct.calcsize(LAYOUT_V3) == 208, \
    "a record's layout changed: raise the journal's VERSION and read the old one (chatd.journal)"
assert {field.name for field in _VALUES} == {field.name for field in fields(Record)}, \
    "every field of Record has its place in FIELDS, and nothing else does"
#: A free slot: not used, every field zero.
_FREE_VALUES = (0, *(b"" if field.code.endswith("s") else 0 for field in _VALUES))


def pack(sequence: int, record: Record | None) -> bytes:
    """A record's bytes under ``sequence``; a free slot's for None."""
    if record is None:
        return RECORD.pack(sequence, *_FREE_VALUES)
    return RECORD.pack(sequence, 1, *(field.put(getattr(record, field.name)) for field in _VALUES))


def unpack(buffer, offset: int) -> Record | None:
    """The record at ``offset``, None for a free slot; Error ``bad-state`` if it is damaged."""
    sequence, used, *values = RECORD.unpack_from(buffer, offset)
    if used != 1:
        return None
    return Record(**{field.name: field.get(value) for field, value in zip(_VALUES, values)})


#: The fields a member and its record share, by the same names.
MEMBER_FIELDS = ("protocol", "nick", "target", "received", "incarnation", "sent", "peer_incarnation", "last_k",
                 "token", "handled")


class Kept(Protocol):
    """What a record keeps of a connection (chatd.connection.Connection is one)."""

    inode: int
    inbox: Any  # chatd.rings.InRing
    outbox: Any  # chatd.rings.OutRing
    forwards: Any  # chatd.rings.Outbox, or None on one host
    codec: Any  # chatd.protocols.Codec
    finishing: bool
    poison_offset: int
    poison_count: int


def record_of(member: Member, connection: Kept) -> Record:
    """The record of a member and its connection, as the next commit writes it."""
    forwards = connection.forwards
    return Record(
        **{name: getattr(member, name) for name in MEMBER_FIELDS},
        inode=connection.inode,
        in_handled=connection.inbox.handled,
        out_start=connection.outbox.kept,
        out_end=connection.outbox.end,
        flags=(CLOSING if connection.finishing else 0) | (REMOTE_PAIRED if member.remote_paired else 0),
        codec=connection.codec.state,
        poison_offset=connection.poison_offset,
        poison_count=connection.poison_count,
        box_start=forwards.published if forwards is not None else 0,  # not `if forwards`: an empty one is false
        box_end=forwards.end if forwards is not None else 0,
    )


def member_of(slot: int, record: Record) -> Member:
    """The member a record keeps, as the room takes it back after a crash."""
    return Member(slot, **{name: getattr(record, name) for name in MEMBER_FIELDS},
                  remote_paired=bool(record.flags & REMOTE_PAIRED))
