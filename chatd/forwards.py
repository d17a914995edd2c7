"""Messages to members of other hosts: their wire form, and publishing them in order.

Theory of operation
-------------------
A :class:`~chatd.room.Forward` travels in the stream as :func:`encode_forward`
writes it: a JSON header line (sender, receiver, the sender's incarnation and
``k``, the receiving host, the text's length) and the text as it is. A stream
message carries one or more, one after the other (:func:`decode_forwards`);
A header's version is :data:`FORWARD_VERSION` (docs/formats.md): a ``"v"`` field,
absent for 1 (what every release so far writes); one of another version is
refused, not misread. For any other bytes :func:`decode_forwards` raises
:class:`~chatd.bus.payloads.BusPayloadError` and nothing else (property-tested);
:func:`chat_forwards`, what the receiving host reads with, also refuses a text
no client could have sent. Its message id, the stream's dedupe key, names the first and last
(:func:`message_id`).

:class:`Publisher` publishes what each sender's outbox (:class:`chatd.rings.Outbox`)
holds once it is committed: **one publish in flight per sender**, so that a
retry can never land behind a later message, carrying every forward waiting
by then (up to :data:`MAX_BATCH`). When the stream acknowledges a batch, its
entries leave the outbox and the next batch goes. A member closed with
forwards not yet acknowledged leaves them to the publisher, which publishes
them from memory (*orphans*). The publisher holds nothing else: the outboxes
are the journal's, so after a crash it publishes again what they still hold.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass

from .across import ServedMembers
from .bus import Bus, Published
from .bus.payloads import TOKEN, BusPayloadError, count, json_object, name, version
from .rings import Outbox
from .room import Forward, has_control

log = logging.getLogger("chatd")

#: The header's version: its "v" field, absent for 1.
FORWARD_VERSION = 1
#: The largest forward: a whole 64 KiB line and its header.
MAX_FORWARD = 64 * 1024 + 512
#: The longest text a forward carries: a whole line (chatd.protocols.line.MAX_LINE).
MAX_TEXT = 64 * 1024
#: The longest header line (an honest one is under 200 bytes).
MAX_HEADER = 512
#: What the journal keeps an incarnation or a k in: 8 bytes, unsigned.
MAX_COUNT = 2 ** 64 - 1
#: A header's fields besides "v" (all of them, and no others).
HEADER_FIELDS = ("from", "to", "inc", "k", "host", "len")
#: The most of a sender's forwards put in one stream message (NATS's max_payload is 1 MiB).
MAX_BATCH = 256 * 1024


@dataclass(frozen=True)
class Header:
    """What a forward's header line says, its text aside."""

    sender: str
    receiver: str
    incarnation: int
    k: int
    host: str

    @classmethod
    def of(cls, forward: Forward) -> "Header":
        return cls(forward.sender_nick, forward.receiver, forward.incarnation, forward.k, forward.host)


@dataclass
class Incoming:
    """A forward as the receiving host reads it from the stream message at ``seq``."""

    seq: int
    sender: str
    receiver: str
    incarnation: int
    k: int
    text: str


def encode_forward(forward: Forward) -> bytes:
    """A forward as the stream carries it: a JSON header line (with the text's length), then
    the text as it is (no escaping to grow it)."""
    text = forward.text.encode()
    header = {"from": forward.sender_nick, "to": forward.receiver, "inc": forward.incarnation, "k": forward.k,
              "host": forward.host, "len": len(text)}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + text


def _read_header(payload: bytes, offset: int) -> tuple[Header, int, int]:
    """The header at ``offset``, where its text starts, and the text's length (BusPayloadError
    if it is not a header this release writes)."""
    end = payload.find(b"\n", offset, offset + MAX_HEADER + 1)
    if end < 0:
        raise BusPayloadError("header", f"no forward header line at byte {offset} (none ends within "
                                        f"{MAX_HEADER} bytes)")
    fields = json_object(payload[offset:end], "a forward's header", HEADER_FIELDS, ("v",))
    version(fields, "a forward", FORWARD_VERSION)
    header = Header(name(fields, "from", "a forward"), name(fields, "to", "a forward"),
                    count(fields, "inc", "a forward", 1, MAX_COUNT), count(fields, "k", "a forward", 0, MAX_COUNT),
                    name(fields, "host", "a forward", TOKEN))
    return header, end + 1, count(fields, "len", "a forward", 0, MAX_TEXT)


def read_header(payload: bytes) -> Header:
    """The header of the (first) forward in ``payload``, its text unread."""
    return _read_header(payload, 0)[0]


def decode_forwards(seq: int, payload: bytes) -> list[Incoming]:
    """Every forward in one stream message; for any other bytes, :class:`BusPayloadError` (and
    nothing else): the whole message is refused, not the part of it that reads."""
    found, offset = [], 0
    while offset < len(payload):
        header, start, length = _read_header(payload, offset)
        text = payload[start:start + length]
        if len(text) != length:
            raise BusPayloadError("length", f"a forward's text is cut short ({len(text)} of {length} bytes)")
        try:
            decoded = text.decode()
        except UnicodeDecodeError as exc:
            raise BusPayloadError("utf8", f"a forward's text is not UTF-8 ({exc.reason} at byte {exc.start})") \
                from None
        found.append(Incoming(seq, header.sender, header.receiver, header.incarnation, header.k, decoded))
        offset = start + length
    if not found:
        raise BusPayloadError("empty", "no forward in it")
    return found


def chat_forwards(seq: int, payload: bytes) -> list[Incoming]:
    """:func:`decode_forwards`, and every text one a client could have sent (the room refuses
    control characters in a MSG): a forward whose text holds a line break would write a line of
    its own choosing into its receiver's stream. The receiving host reads with this."""
    found = decode_forwards(seq, payload)
    for incoming in found:
        if has_control(incoming.text):
            raise BusPayloadError("text", f"a forward's text ({incoming.sender}>{incoming.receiver} "
                                          f"k={incoming.k}) holds control characters: no client sends them")
    return found


def message_id(first: Header, last: Header) -> str:
    """The stream's dedupe key: a publish retried with the same forwards is stored once. After
    a crash the forwards may be grouped otherwise, and stored again: the receiving room drops
    each k it has seen."""
    return f"{first.sender}>{first.receiver}:{first.incarnation:x}:{first.k}-{last.k}"


class Publisher:
    """Publishes each sender's forwards in order, one batch in flight per sender."""

    def __init__(self, bus: Bus, members: ServedMembers, *, use_outbox: bool = True):
        self.bus = bus
        self.members = members
        #: Off only in tests that must show loss: forwards published at once, kept nowhere.
        self.use_outbox = use_outbox
        #: Member id -> the publish in flight: (the outbox offset it ends at, how many forwards).
        self.in_flight: dict[int, tuple[int, int]] = {}
        #: Forwards of members closed before the stream had them all: published from here.
        self._orphans: dict[int, deque[tuple[int, int, bytes]]] = {}
        #: Told when a member's forwards are all acknowledged (chatd.keeper writes a parked ACK then).
        self.drained = lambda member_id: None

    def forward(self, forward: Forward) -> None:
        """A message for another host, from a command being handled: into the sender's outbox
        (published once committed, see :meth:`publish_next`)."""
        payload = encode_forward(forward)
        if not self.use_outbox:
            header = Header.of(forward)
            self.bus.publish(("bare", forward.sender), forward.host, forward.receiver,
                             message_id(header, header), payload)
            return
        self.members.outbox(forward.sender).append(payload)

    def publish_next(self, member_id: int) -> None:
        """Publish what waits in the member's outbox (or its orphans), unless a batch of it is
        in flight."""
        if member_id in self.in_flight:
            return
        orphans = self._orphans.get(member_id)
        if orphans is not None and not orphans:
            # The last of a closed member's forwards is in: a member served in its slot since
            # (a session resumed there, a new client) publishes its own now, not at its next commit
            # (a parked ACK waits for them, and commits nothing until answered).
            del self._orphans[member_id]
            orphans = None
        if orphans is not None:
            entries = list(orphans)
        else:
            outbox = self.members.outbox(member_id)
            if outbox is None or not outbox:
                return
            entries = outbox.entries()
        # Everything waiting, up to MAX_BATCH, in one publish: one in flight per sender keeps
        # them in order, and a batch makes that one round trip carry many.
        batch, size = [], 0
        for start, end, payload in entries:
            if batch and size + len(payload) > MAX_BATCH:
                break
            batch.append((start, end, payload))
            size += len(payload)
        first, last = read_header(batch[0][2]), read_header(batch[-1][2])
        end = batch[-1][1]
        log.debug("cluster: publishing %s>%s k=%d..%d (outbox %d..%d)", first.sender, first.receiver, first.k,
                  last.k, batch[0][0], end)
        self.in_flight[member_id] = (end, len(batch))
        self.bus.publish((member_id, end), first.host, first.receiver, message_id(first, last),
                         b"".join(entry[2] for entry in batch))

    def published(self, result: Published) -> None:
        """The stream acknowledged a batch: its forwards leave the outbox; the next goes."""
        if result.token[0] == "bare":
            return
        member_id, end = result.token
        in_flight = self.in_flight.get(member_id)
        log.debug("cluster: published member %d to %d at seq %d%s (in flight: %s)", member_id, end, result.seq,
                  " (duplicate)" if result.duplicate else "", in_flight)
        if in_flight is None or in_flight[0] != end:
            return
        del self.in_flight[member_id]
        orphans = self._orphans.get(member_id)
        if orphans is not None:
            for _ in range(in_flight[1]):
                orphans.popleft()
        else:
            outbox = self.members.outbox(member_id)
            if outbox is not None:
                outbox.published_to(end)
                self.members.outbox_freed(member_id)
        self.publish_next(member_id)
        if not self.pending(member_id):
            self.drained(member_id)

    def pending(self, member_id: int) -> bool:
        """Whether some of the member's forwards are not acknowledged yet (committed or not)."""
        if member_id in self.in_flight:
            return True
        outbox = self.members.outbox(member_id)
        return outbox is not None and outbox.end > outbox.published

    def moved(self, old_id: int, old_outbox: Outbox | None, new_outbox: Outbox) -> None:
        """A session went on from member ``old_id``'s connection to a new one (chatd.sessions):
        the forwards not yet acknowledged, published from memory or still in the old outbox, are
        the first of the new outbox, in order, in the commit that frees the old slot; the old
        member publishes nothing more. A batch of it in flight stays until its ack comes: the
        new outbox's first batch starts at that batch's first forward and follows it (the bus
        keeps one publish a subject in flight, in call order), so whichever of the two the
        stream stores first, the receiving room takes each k once, in order."""
        orphans = self._orphans.pop(old_id, None)
        if orphans is not None:
            entries = list(orphans)
        else:
            entries = old_outbox.entries(uncommitted=True) if old_outbox is not None else []
        in_flight = self.in_flight.get(old_id)
        if in_flight is not None:
            self._orphans[old_id] = deque(entries[:in_flight[1]])  # its ack takes them off
        for _, _, payload in entries:
            new_outbox.append(payload)

    def closed(self, member_id: int, outbox: Outbox | None) -> None:
        """The member's client is closed: what its outbox holds is published from memory (what
        it handled in this very turn too: its commit may come after the close)."""
        if outbox is not None and outbox.end > outbox.published:
            # All not acknowledged, the batch in flight first: its ack takes it off.
            self._orphans[member_id] = deque(outbox.entries(uncommitted=True))
            if member_id not in self.in_flight:
                self.publish_next(member_id)
