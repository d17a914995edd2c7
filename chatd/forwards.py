"""Messages to members of other hosts: their wire form, and publishing them in order.

Theory of operation
-------------------
A :class:`~chatd.room.Forward` travels in the stream as :func:`encode_forward`
writes it: a JSON header line (sender, receiver, the sender's incarnation and
``k``, the receiving host, the text's length) and the text as it is. A stream
message carries one or more, one after the other (:func:`decode_forwards`);
A header's version is :data:`FORWARD_VERSION` (docs/formats.md): a ``"v"`` field,
absent for 1 (what every release so far writes); one of another version is
refused (ValueError), not misread. Its message id, the stream's dedupe key, names the first and last
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
from .rings import Outbox
from .room import Forward

log = logging.getLogger("chatd")

#: The header's version: its "v" field, absent for 1.
FORWARD_VERSION = 1
#: The largest forward: a whole 64 KiB line and its header.
MAX_FORWARD = 64 * 1024 + 512
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
    """The header at ``offset``, where its text starts, and the text's length."""
    end = payload.index(b"\n", offset)
    fields = json.loads(payload[offset:end])
    if fields.get("v", 1) != FORWARD_VERSION:
        raise ValueError(f"a forward of version {fields['v']!r}; this release reads version {FORWARD_VERSION}")
    header = Header(str(fields["from"]), str(fields["to"]), int(fields["inc"]), int(fields["k"]),
                    str(fields["host"]))
    return header, end + 1, int(fields["len"])


def read_header(payload: bytes) -> Header:
    """The header of the (first) forward in ``payload``, its text unread."""
    return _read_header(payload, 0)[0]


def decode_forwards(seq: int, payload: bytes) -> list[Incoming]:
    """Every forward in one stream message (raises ValueError, KeyError... if it is not ours)."""
    found, offset = [], 0
    while offset < len(payload):
        header, start, length = _read_header(payload, offset)
        text = payload[start:start + length]
        if length < 0 or len(text) != length:
            raise ValueError(f"a forward's text is cut short ({len(text)} of {length} bytes)")
        found.append(Incoming(seq, header.sender, header.receiver, header.incarnation, header.k, text.decode()))
        offset = start + length
    if not found:
        raise ValueError("no forward in it")
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
        if orphans is not None:
            if not orphans:
                del self._orphans[member_id]
                return
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

    def closed(self, member_id: int, outbox: Outbox | None) -> None:
        """The member's client is closed: what its outbox holds is published from memory."""
        if outbox is not None and outbox:
            # All not acknowledged, the batch in flight first: its ack takes it off.
            self._orphans[member_id] = deque(outbox.entries())
            if member_id not in self.in_flight:
                self.publish_next(member_id)
