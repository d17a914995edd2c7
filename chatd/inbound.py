"""Messages from other hosts: handed to the room in stream order, or kept until it can take them.

Theory of operation
-------------------
:class:`Inbound` takes the forwards this host's subject delivers (:class:`chatd.bus.Delivered`)
and hands each to the room (:meth:`chatd.room.Room.receive`). Until the
directory is read it only *holds* them: the room cannot tell yet whom they
are for. Then a message the room cannot take yet waits, *stashed* by its
receiver, in stream order: its receiver's output ring is full, or the
directory has not shown the pairing the sender saw. It is tried again when
the receiver's ring has room or the directory changes (:meth:`Inbound.wake`);
one that no one here takes any more is dropped, as the room would drop it. A
stream message that is not chatd's forwards (:func:`chatd.forwards.chat_forwards`
refuses it) is skipped, counted as handled, and said once per kind. A
receiver whose stash passes :data:`STASH_LIMIT` bytes is closed: it takes
nothing.

The **cursor** is the stream sequence up to which every message is handled:
the highest one handed over, or, while some wait, the first one waiting less
one. The server commits it with what handling them changed, so a crash reads
again from there and nothing waiting is lost.
"""

from __future__ import annotations

import logging
from collections import deque

from fdkeep.text import plural

from .across import ServedMembers
from .bus import Delivered
from .bus.payloads import BusPayloadError, Complaints
from .forwards import Incoming, chat_forwards
from .room import Room

log = logging.getLogger("chatd")

#: Messages from other hosts waiting for one receiver, in bytes, before it is closed.
STASH_LIMIT = 4 << 20
#: What a stashed message counts for beyond its text.
STASH_OVERHEAD = 64


class Inbound:
    """The stream's side of one host: hold, stash, hand over, and the cursor."""

    def __init__(self, room: Room, members: ServedMembers, *, stash_limit: int = STASH_LIMIT):
        self.room = room
        self.members = members
        self.stash_limit = stash_limit
        #: Messages that wait, by receiver nick, in stream order, and their size.
        self._stash: dict[str, deque[Incoming]] = {}
        self._stash_bytes: dict[str, int] = {}
        #: Arrived before the directory was read (None once it is: messages go to the room).
        self._held: list[Incoming] | None = []
        #: The highest stream sequence handled; None until started.
        self._handled_to: int | None = None
        #: Stream messages that are not chatd's forwards: skipped, and said once per kind.
        self.complaints = Complaints(lambda line: log.warning("cluster: %s", line))

    def start(self, cursor: int) -> None:
        """Going on from ``cursor``, the journal's: everything up to it is handled."""
        self._handled_to = cursor

    @property
    def cursor(self) -> int | None:
        """Every message up to here is handled: the lowest waiting one, less one (None
        before :meth:`start`)."""
        if self._handled_to is None:
            return None
        waiting = [queue[0].seq for queue in self._stash.values() if queue]
        if self._held:
            waiting.append(self._held[0].seq)
        return min(waiting) - 1 if waiting else self._handled_to

    @property
    def stashed(self) -> int:
        return sum(len(queue) for queue in self._stash.values())

    def delivered(self, result: Delivered) -> None:
        try:
            forwards = chat_forwards(result.seq, result.payload)
        except BusPayloadError as exc:
            # Handled: the cursor moves past it (nothing stashed waits behind it for ever).
            self.complaints("stream message", exc, f"{result.seq} on {result.subject[:80]!r}")
            self._handled_to = max(self._handled_to, result.seq)
            return
        for incoming in forwards:
            self._incoming(incoming)

    def directory_read(self) -> None:
        """The directory is read: what was held goes to the room now."""
        held, self._held = self._held or [], None
        for incoming in held:
            self._incoming(incoming)

    def wake(self, nick: str | None) -> None:
        """Room in a receiver's output ring, or a change in the directory: try its stash."""
        if nick is not None and self._stash.get(nick):
            self._take_stash(nick)

    def _incoming(self, incoming: Incoming) -> None:
        if self._held is not None:
            self._held.append(incoming)
            return
        if self._stash.get(incoming.receiver) or not self._take(incoming):
            self._stash_one(incoming)
            return
        self._handled_to = max(self._handled_to, incoming.seq)

    def _take(self, incoming: Incoming) -> bool:
        """Hand one message to the room; False if it must wait."""
        member = self.room.member_by_nick(incoming.receiver)
        if member is not None and not self.members.output_has_room(member.id):
            return False
        outcome = self.room.receive(incoming.receiver, incoming.sender, incoming.incarnation, incoming.k,
                                    incoming.text)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cluster: seq %d %s>%s k=%d: %s", incoming.seq, incoming.sender, incoming.receiver, incoming.k,
                      "waits" if outcome is None else "delivered" if outcome.deliveries else "dropped")
        if outcome is None:
            return False
        self.members.apply(outcome)
        return True

    def _stash_one(self, incoming: Incoming) -> None:
        queue = self._stash.setdefault(incoming.receiver, deque())
        queue.append(incoming)
        size = self._stash_bytes.get(incoming.receiver, 0) + len(incoming.text) + STASH_OVERHEAD
        self._stash_bytes[incoming.receiver] = size
        if size > self.stash_limit:
            member = self.room.member_by_nick(incoming.receiver)
            if member is not None and self.members.is_connected(member.id):
                self.members.close(member.id, f"took none of {plural(len(queue), 'message')} from other hosts "
                                              f"({size} bytes)")
            self._drop_stash(incoming.receiver)

    def _drop_stash(self, nick: str) -> None:
        queue = self._stash.pop(nick, deque())
        self._stash_bytes.pop(nick, None)
        if queue:
            self._handled_to = max(self._handled_to, queue[-1].seq)

    def _take_stash(self, nick: str) -> None:
        queue = self._stash[nick]
        while queue:
            incoming = queue[0]
            if not self._take(incoming):
                member = self.room.member_by_nick(nick)
                if member is not None and member.target == incoming.sender:
                    return  # it waits for room, or for the directory to show the pairing
                # no one here takes it any more: dropped (handled), like the room would
            queue.popleft()
            self._stash_bytes[nick] -= len(incoming.text) + STASH_OVERHEAD
            self._handled_to = max(self._handled_to, incoming.seq)
        self._drop_stash(nick)
