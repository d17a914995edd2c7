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
from typing import Callable

from fdkeep.text import plural

from .across import ServedMembers
from .bus import Delivered
from .bus.payloads import BusPayloadError, Complaints
from .forwards import Incoming, chat_forwards
from .room import From, Outcome, Room

log = logging.getLogger("chatd")

#: Messages from other hosts waiting for one receiver, in bytes, before it is closed.
STASH_LIMIT = 4 << 20
#: What a stashed message counts for beyond its text.
STASH_OVERHEAD = 64


class Inbound:
    """The stream's side of one host: hold, stash, hand over, and the cursor."""

    def __init__(self, room: Room, members: ServedMembers, *, stash_limit: int = STASH_LIMIT,
                 taken: Callable[[Incoming, Outcome], None] = lambda incoming, outcome: None):
        self.room = room
        self.members = members
        self.stash_limit = stash_limit
        #: Told of each message the room took, with what it made of it (chatd.keeper marks a
        #: session's messages by their stream sequence).
        self.taken = taken
        #: Receivers whose messages wait, whatever comes, until released: a session being taken
        #: over by this host (chatd.keeper), whose messages before these are read again.
        self._reserved: set[str] = set()
        #: A receiver taken over: its messages read again up to this sequence (later copies are
        #: dropped), and the n up to which what it is given is not sent (its client has it).
        self._floor: dict[str, int] = {}
        self._quiet: dict[str, int] = {}
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
        # Every host reads every host's subjects (chatd.bus.engine): what is for no one here is
        # handled unread. The subject names the receiver (chat.<host>.<receiver>), the forwards
        # inside say it again and are checked when read.
        receiver = result.subject.rpartition(".")[2]
        if self.room.member_by_nick(receiver) is None and receiver not in self._reserved \
                and not self._stash.get(receiver) and self._held is None:
            self._handled_to = max(self._handled_to, result.seq)
            return
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

    @property
    def handled_to(self) -> int | None:
        """The highest stream sequence handed over (or skipped): what a reserve's replay ends at."""
        return self._handled_to

    def reserve(self, nick: str) -> None:
        """Messages for ``nick`` wait from now on, until :meth:`release`."""
        self._reserved.add(nick)

    def release(self, nick: str, replayed: list[Incoming] = (), floor: int = 0, quiet: int = 0) -> None:
        """What waited for ``nick`` goes to the room now: first ``replayed`` (its messages read again
        from the stream, up to sequence ``floor``: one that comes again at or below it is dropped),
        then what came meanwhile; its messages numbered ``quiet`` or less are not sent (its client
        has them: it said so resuming)."""
        self._reserved.discard(nick)
        if floor:
            self._floor[nick] = floor
        if quiet:
            self._quiet[nick] = quiet
        queue = self._stash.get(nick)
        waiting = [incoming for incoming in queue if incoming.seq > floor] if queue else []
        self._stash.pop(nick, None)
        self._stash_bytes.pop(nick, None)
        for incoming in [*replayed, *waiting]:
            self._stash_one(incoming)
        self.wake(nick)

    def wake(self, nick: str | None) -> None:
        """Room in a receiver's output ring, or a change in the directory: try its stash."""
        if nick is not None and self._stash.get(nick):
            self._take_stash(nick)

    def _incoming(self, incoming: Incoming) -> None:
        if self._held is not None:
            self._held.append(incoming)
            return
        floor = self._floor.get(incoming.receiver)
        if floor is not None:
            if incoming.seq <= floor:  # read again when its receiver was taken over: handled
                self._handled_to = max(self._handled_to, incoming.seq)
                return
            del self._floor[incoming.receiver]
        if incoming.receiver in self._reserved or self._stash.get(incoming.receiver) or not self._take(incoming):
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
        if outcome.deliveries:
            self.taken(incoming, outcome)
            quiet = self._quiet.get(incoming.receiver)
            if quiet is not None:
                outcome.deliveries = [(member_id, event) for member_id, event in outcome.deliveries
                                      if type(event) is not From or event.n > quiet]
                if outcome.deliveries:
                    del self._quiet[incoming.receiver]
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
        if nick in self._reserved:
            return
        queue = self._stash[nick]
        while queue:
            incoming = queue[0]
            if not self._take(incoming):
                member = self.room.member_by_nick(nick)
                if member is not None and (member.token or member.target == incoming.sender):
                    return  # it waits for room, or for the directory to show the pairing
                # no one here takes it any more: dropped (handled), like the room would
            queue.popleft()
            self._stash_bytes[nick] -= len(incoming.text) + STASH_OVERHEAD
            self._handled_to = max(self._handled_to, incoming.seq)
        self._drop_stash(nick)
