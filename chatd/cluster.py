"""chatd across hosts: pairs whose members are on different chatd hosts, exactly once.

Theory of operation
-------------------
Sockets cannot cross machines, so a busy site runs several chatd hosts behind
a TCP load balancer, each with its own holderd, systemd and journal, and the
hosts share two things through NATS JetStream (:mod:`chatd.bus` speaks to it):

- the **directory**, a key-value bucket: one entry per nick, ``{"host", "target"}``,
  so that every host sees every member's nick and whom it names, and derives
  pairs across hosts by the room's one rule (mutual targets); and a bucket of
  *host leases*, refreshed while a host lives, so that a dead host's nicks come
  free and its members leave the other hosts' rooms;
- the **stream** of messages, subject ``chat.<host>.<nick>``: what a member
  sends a member of another host.

Nicks are unique across hosts: a NICK is *parked* (its input stays unhandled)
while the directory entry is created, compare-and-set, and handled when the
answer comes; a crash meanwhile handles it again, and finds the entry its own
(same host, no live member holding it), which it takes back.

**Exactly once.** A message to a remote peer is a :class:`~chatd.room.Forward`:

1. *the sender's host* numbers it ``k`` (per nick incarnation) and appends it
   to the sender's outbox in the journal (:class:`chatd.rings.Outbox`), in the
   same commit as the MSG's input and the sender's count. Only then is it
   published: one publish in flight per sender (so that a retry can never
   land behind a later message), carrying every forward of the outbox
   waiting by then (up to :data:`chatd.forwards.MAX_BATCH`), with the message id
   ``<sender>><receiver>:<incarnation>:<first k>-<last k>``; entries are given
   up when JetStream acknowledges them. After a crash every entry still in the
   outbox is published again: JetStream's duplicate window drops a batch it
   already has, and a batch grouped otherwise is dropped k by k by the
   receiving room.
2. *the receiver's host* reads its subject from the journal's **cursor** on:
   the stream sequence up to which every message for this host is handled,
   committed with what handling them changed. Not the consumer's position:
   a consumer restarted there gets new messages before the dead one's unacked
   ones, and loses them. Each message is handed to the room
   (:meth:`~chatd.room.Room.receive`), which drops a ``k`` it has seen (a
   repeat, after a crash before the commit moved the cursor), numbers the
   rest ``n`` and queues it for its client; the commit covers the output, the
   receiver's counts and the cursor together. A message the room cannot take
   yet (its receiver's output ring is full, or the directory has not shown
   the pairing the sender saw) waits in memory, *stashed*; the cursor stays below
   the first one stashed, so a crash reads it again.

The zero-loss work does the rest: the kernel's byte counts finish a line half
written to the receiver when chatd died.

**Durable before delivered, on this host too.** A message between two members
of this host takes the same way: a forward to this very host
(:attr:`chatd.room.Room.durable_host`), told to its receiver only once the
stream (R3) has it and this host reads it back. It costs a round trip through
NATS (bench/cluster.py: "same host, durable" against "same host, direct"), and
it is the first step to a host's loss costing nothing (docs/host-loss.md):
what a lost host had delivered is in the stream. ``--direct-same-host``
tells such a message at once, as one host does (for benchmarks, and tests that
must show loss).

Limits, honestly: one publish in flight per sender (a sender's forwards wait
for the last batch's acknowledgment, a JetStream round trip, and then go
together; many senders go in parallel); no
backpressure across hosts (a receiver that takes nothing has its messages
stashed in its host's memory, and is closed past :data:`chatd.inbound.STASH_LIMIT`); a
member that leaves with forwards not yet acknowledged has them published from
memory (a crash of its host in that moment loses them); a host lost with its
machine loses its clients' TCP connections: a client with a session resumes it on
another host (:mod:`chatd.keeper`), one without comes back as a new client.

Who does what. :class:`Cluster` is the server's :class:`~chatd.across.AcrossHosts`
with ``--cluster``: it takes the bus's results off the loop and hands each to
its owner, and answers the server's hooks. The owners know nothing of the
server but :class:`~chatd.across.ServedMembers` (here :class:`ServerMembers`):
:class:`chatd.directory.DirectoryView` (claims, releases, everyone's entries and
hosts), :class:`chatd.inbound.Inbound` (held and stashed messages, the cursor)
and :class:`chatd.forwards.Publisher` (the outboxes published in order, and the
forwards' wire form), :class:`chatd.keeper.Keeper` (sessions kept in the cluster: their
entries, takeovers, fencing) and :class:`chatd.fencing.Fence` (a lease that may have lapsed). The cluster itself holds only the members whose commands
wait for the directory, and whether the bus is connected.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fdkeep.errors import Error
from fdkeep.loop import IN, Loop

from .bus import (Bus, BusError, Claimed, Connected, Delivered, DirectoryComplete, Disconnected, HostChanged,
                  LeaseLapsed, LeaseRenewed, NickChanged, Published, Released, Replayed, SessionRead,
                  SessionWritten, Updated)
from .directory import DirectoryView
from .fencing import Fence
from .forwards import MAX_FORWARD, Publisher
from .inbound import Inbound
from .keeper import Keeper
from .sessions import GRACE
from .room import NAME_RE, SESSION_COMMANDS, Command, Forward, Member, Nick, Outcome, Pair, Room

if TYPE_CHECKING:
    from .connection import Connection
    from .journal import Journal
    from .rings import Outbox
    from .server import ChatServer

log = logging.getLogger("chatd")

#: What a host id may be (it is part of the stream's subjects): a nick's rule.
HOST_ID_RE = NAME_RE


class Cluster:
    """The server's hooks across hosts (:class:`~chatd.across.AcrossHosts`), and the bus's results."""

    keeps_sessions = True

    def __init__(self, bus: Bus, host_id: str, room: Room, members: "ServerMembers", loop: Loop, *,
                 outbox: bool = True, cursor: bool = True, durable_same_host: bool = True,
                 session_grace: float = GRACE):
        self.bus = bus
        self.host_id = host_id
        self.room = room
        if durable_same_host:
            room.durable_host = host_id
        self.members = members
        self.loop = loop
        #: Off only in tests that must show loss: the stream read from the consumer's own
        #: position instead of the journal's cursor (and see Publisher.use_outbox).
        self.use_cursor = cursor
        self.directory = DirectoryView(bus, host_id, room, members)
        self.inbound = Inbound(room, members)
        self.publisher = Publisher(bus, members, use_outbox=outbox)
        self.fence = Fence(room, members)  # its lease lapsed: its clients move (chatd.fencing)
        self.keeper = Keeper(bus, host_id, room, members, self.inbound, self.directory, loop,
                             pending=self.publisher.pending)
        self.inbound.taken = self.keeper.taken
        self.publisher.drained = self.keeper.outbox_drained
        self.directory.lost = self.keeper.lost_nick
        self.directory.session_nick = self.keeper.answer_when_kept
        self.directory.later = lambda call: loop.call_later(session_grace, call)
        #: Members whose commands wait for the directory (restored paired across hosts).
        self._held_back: set[int] = set()
        self.connected = False

    # -- starting ------------------------------------------------------------------------
    def start(self, journal: "Journal") -> None:
        """Once serving (restored or fresh): connect, read the directory, publish what the
        outboxes hold, read the stream from the journal's cursor. Made before, the cluster
        already holds back what restored members say until the directory is read."""
        if not journal.box_size:
            raise Error("single-host-journal", "the journal kept for chatd is a single host's (no outboxes): "
                                               "it cannot join a cluster; start once with --fresh (ends the "
                                               "connections it keeps) to join")
        self.inbound.start(journal.cursor)
        self.loop.add(self.bus.fileno(), IN, lambda mask: self._on_results())
        cursor = journal.cursor if self.use_cursor else None
        self.bus.start(cursor)
        for member_id in self.members.connected_ids():
            self.publisher.publish_next(member_id)
        for member_id, outbox in self.members.detached_outboxes():
            self.publisher.closed(member_id, outbox)
        log.info("cluster: host %s, reading the stream after sequence %s", self.host_id,
                 cursor if cursor is not None else "the consumer's own position (--no-cursor)")

    @property
    def cursor(self) -> int | None:
        return self.inbound.cursor

    # -- the server's hooks --------------------------------------------------------------
    def parks(self, connection: "Connection", end: int, command: Command) -> bool:
        """Whether ``command`` waits for the cluster: a NICK to claim, or a session's command
        (and a session's PAIR) answered once its entry in the cluster says so (chatd.keeper); the
        server then keeps its input unhandled and stops taking this client's commands until then."""
        if isinstance(command, SESSION_COMMANDS):
            return self.keeper.parks(connection, end, command)
        member = self.room.members[connection.member_id]
        if isinstance(command, Pair) and member.token:
            # A session's PAIR is answered once its entry has the target: a resume elsewhere gives
            # its peers the target it had, not an older one (they would hear UNPAIRED, PAIRED).
            connection.park()
            self.keeper.answer_when_kept(member, end, self.room.handle(member.id, command))
            return True
        if not isinstance(command, Nick):
            return False
        if not self.directory.claim(self.room.members[connection.member_id], end, command.name):
            return False
        connection.park()
        return True

    def holds_back(self, connection: "Connection") -> bool:
        """Whether the client's commands wait (it is parked) until the directory is read: a
        member restored paired across hosts, whose peer the directory has not shown again."""
        if self.directory.complete or not self.room.awaiting(connection.member_id):
            return False
        connection.park()
        self._held_back.add(connection.member_id)
        return True

    def has_room(self, connection: "Connection", member: Member) -> bool:
        return connection.forwards is None or connection.forwards.free >= MAX_FORWARD + 4

    def forward(self, forward: Forward) -> None:
        self.publisher.forward(forward)

    def committed(self, connections: list["Connection"]) -> None:
        """After a commit: publish what the outboxes now hold, and tell the directory of
        nicks and targets that changed."""
        for connection in connections:
            self.publisher.publish_next(connection.member_id)
            member = self.room.members.get(connection.member_id)
            if member is not None and member.nick is not None:
                self.directory.sync(member)
                self.inbound.wake(member.nick)  # a pairing made here may be what its waiting messages wait for

    def nick_left(self, nick: str) -> None:
        """A member leaves the room (QUIT, or closed): its nick leaves the directory."""
        self.directory.release(nick)

    def closed(self, connection: "Connection") -> None:
        """A client is closed: its NICK in flight is forgotten; forwards it left go on from memory."""
        self.directory.forget_claim(connection.member_id)
        self.publisher.closed(connection.member_id, connection.forwards)

    def session_moved(self, old_id: int, old_outbox: "Outbox | None", connection: "Connection") -> None:
        self.publisher.moved(old_id, old_outbox, connection.forwards)

    def session_ended(self, hashed: bytes) -> None:
        self.keeper.ended(hashed)

    def wake(self, nick: str | None) -> None:
        """Room in a receiver's output ring: messages from other hosts may wait for it."""
        self.inbound.wake(nick)

    # -- the bus's results ---------------------------------------------------------------
    def _on_results(self) -> None:
        for result in self.bus.results():
            if isinstance(result, Delivered):
                self.inbound.delivered(result)
            elif isinstance(result, Published):
                self.publisher.published(result)
            elif isinstance(result, NickChanged):
                self.inbound.wake(self.directory.nick_changed(result))
            elif isinstance(result, HostChanged):
                self.directory.host_changed(result)
            elif isinstance(result, DirectoryComplete):
                self._directory_read()
            elif isinstance(result, Claimed):
                if isinstance(result.token, tuple) and result.token[0] == "takeover":
                    self.keeper.claimed(result)
                else:
                    self.directory.claimed(result)
            elif isinstance(result, SessionRead):
                self.keeper.read(result)
            elif isinstance(result, SessionWritten):
                self.keeper.written(result)
            elif isinstance(result, Replayed):
                self.keeper.replayed(result)
            elif isinstance(result, Updated):
                self.directory.updated(result)
            elif isinstance(result, Released):
                self.directory.released(result)
            elif isinstance(result, Connected):
                self.connected = True
                log.info("cluster: connected to %s", result.server)
            elif isinstance(result, Disconnected):
                self.connected = False
                log.warning("cluster: disconnected from NATS; reconnecting (messages wait in the outboxes)")
            elif isinstance(result, LeaseLapsed):
                self.fence.lapsed(result.seconds)
            elif isinstance(result, LeaseRenewed):
                self.fence.renewed()
            elif isinstance(result, BusError):
                log.warning("cluster: %s", result.message)

    def _directory_read(self) -> None:
        """Everything waiting for the directory goes: messages held, then members held back."""
        if not self.directory.read():
            return
        self.inbound.directory_read()
        for member_id in sorted(self._held_back):
            if self.members.is_connected(member_id):
                self.members.resume(member_id)
        self._held_back.clear()

    # -- reports -------------------------------------------------------------------------
    def unhealthy(self) -> str | None:
        return self.fence.why(self.host_id)

    def status(self) -> dict:
        return {
            "host": self.host_id,
            "connected": self.connected,
            "fenced": self.fence.fenced,
            "moved": self.fence.moved,
            "hosts_alive": sorted(self.directory.alive_hosts),
            "nicks_held_here": len(self.directory.own),
            "members_elsewhere": len(self.directory.entries),
            "cursor": self.cursor,
            "forwards_in_flight": len(self.publisher.in_flight),
            "stashed": self.inbound.stashed,
            **self.keeper.status(),
            "bus": self.bus.status(),
        }

    def close(self) -> None:
        self.bus.close()


class ServerMembers:
    """:class:`~chatd.across.ServedMembers` over a :class:`~chatd.server.ChatServer`: the one
    place the cluster's side meets the server's connections."""

    def __init__(self, server: "ChatServer"):
        self.server = server

    def is_connected(self, member_id: int) -> bool:
        return member_id in self.server.connections

    def holds(self, member_id: int) -> bool:
        return member_id in self.server.connections or member_id in self.server.sessions.detached

    def connected_ids(self) -> list[int]:
        return list(self.server.connections)

    def detached_outboxes(self) -> "list[tuple[int, Outbox]]":
        return [(member_id, detached.forwards) for member_id, detached in self.server.sessions.detached.items()
                if detached.forwards is not None]

    def outbox(self, member_id: int) -> "Outbox | None":
        connection = self.server.connections.get(member_id)
        return connection.forwards if connection is not None else None

    def output_has_room(self, member_id: int) -> bool:
        output = self.server.output(member_id)
        return output is None or self.server.output_has_room(output)

    def apply(self, outcome: Outcome) -> None:
        self.server.apply(outcome)

    def resume_parked(self, member_id: int, end: int, outcome: Outcome) -> None:
        self.server.resume_parked(self.server.connections[member_id], end, outcome)

    def answer_parked(self, member_id: int, end: int, command, started=None) -> None:
        connection = self.server.connections[member_id]
        self.server.resume_parked(connection, end, self.server.sessions.handle(connection, command, started))

    def resume_taken_over(self, member_id: int, end: int, outcome: Outcome) -> None:
        connection = self.server.connections[member_id]
        connection.outbox.retain()  # what it is sent from now on is kept until ACKed, as a session's
        self.server.resume_parked(connection, end, outcome)

    def admit_resume(self) -> int:
        return self.server.sessions.gate.admit()

    def moved(self, member_id: int, why: str, host: str | None = None) -> None:
        self.server.session_moved_away(member_id, why, host)

    def resume(self, member_id: int) -> None:
        connection = self.server.connections[member_id]
        if connection.finishing:  # its session moved to another host meanwhile (chatd.keeper)
            return
        connection.open()
        self.server.take_input(connection)

    def outbox_freed(self, member_id: int) -> None:
        self.server.changed(member_id)
        self.server.wake(member_id)  # its commands may wait for room in its outbox

    def close(self, member_id: int, reason: str) -> None:
        self.server.close_client(member_id, reason)
