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
   waiting by then (up to :data:`MAX_BATCH`), with the message id
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
   the pairing the sender saw) waits here, *stashed*; the cursor stays below
   the first one stashed, so a crash reads it again.

The zero-loss work does the rest: the kernel's byte counts finish a line half
written to the receiver when chatd died.

Limits, honestly: one publish in flight per sender (a sender's forwards wait
for the last batch's acknowledgment, a JetStream round trip, and then go
together; many senders go in parallel); no
backpressure across hosts (a receiver that takes nothing has its messages
stashed in its host's memory, and is closed past :data:`STASH_LIMIT`); a
member that leaves with forwards not yet acknowledged has them published from
memory (a crash of its host in that moment loses them); a host lost with its
machine loses its clients' TCP connections, while their messages stay in the
stream (README).
"""

from __future__ import annotations

import json
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fdkeep.loop import IN
from fdkeep.text import plural

from .bus import (Bus, BusError, Claimed, Connected, Delivered, DirectoryComplete, Disconnected, HostChanged,
                  NickChanged, Published, Released, Updated)
from .room import NAME_RE, Failed, Forward, Member, Nick, Outcome

if TYPE_CHECKING:
    from .connection import Connection
    from .server import ChatServer

log = logging.getLogger("chatd")

#: What a host id may be (it is part of the stream's subjects): a nick's rule.
HOST_ID_RE = NAME_RE
#: The largest forward: a whole 64 KiB line and its header.
MAX_FORWARD = 64 * 1024 + 512
#: The most of a sender's forwards put in one stream message (NATS's max_payload is 1 MiB).
MAX_BATCH = 256 * 1024
#: Messages from other hosts waiting for one receiver, in bytes, before it is closed.
STASH_LIMIT = 4 << 20


@dataclass
class Incoming:
    seq: int
    sender: str
    receiver: str
    incarnation: int
    k: int
    text: str


def encode_forward(forward: Forward) -> bytes:
    """A forward as the stream carries it: a JSON header line (with the text's length), then
    the text as it is (no escaping to grow it). A stream message holds one or more, one
    after the other: a sender's forwards waiting together go in one publish."""
    text = forward.text.encode()
    header = {"from": forward.sender_nick, "to": forward.receiver, "inc": forward.incarnation, "k": forward.k,
              "host": forward.host, "len": len(text)}
    return json.dumps(header, separators=(",", ":")).encode() + b"\n" + text


def decode_forwards(seq: int, payload: bytes) -> list[Incoming]:
    """Every forward in one stream message (raises ValueError, KeyError... if it is not ours)."""
    found, offset = [], 0
    while offset < len(payload):
        end = payload.index(b"\n", offset)
        header = json.loads(payload[offset:end])
        length = int(header["len"])
        text = payload[end + 1:end + 1 + length]
        if length < 0 or len(text) != length:
            raise ValueError(f"a forward's text is cut short ({len(text)} of {length} bytes)")
        found.append(Incoming(seq, str(header["from"]), str(header["to"]), int(header["inc"]), int(header["k"]),
                              text.decode()))
        offset = end + 1 + length
    if not found:
        raise ValueError("no forward in it")
    return found


def message_id(first: Incoming, last: Incoming) -> str:
    """The stream's dedupe key: a publish retried with the same forwards is stored once. After
    a crash the forwards may be grouped otherwise, and stored again: the receiving room drops
    each k it has seen."""
    return f"{first.sender}>{first.receiver}:{first.incarnation:x}:{first.k}-{last.k}"


class Cluster:
    """The glue between a :class:`~chatd.server.ChatServer` and the :class:`~chatd.bus.Bus`."""

    def __init__(self, server: "ChatServer", bus: Bus, host_id: str, *, outbox: bool = True, cursor: bool = True):
        self.server = server
        self.bus = bus
        self.host_id = host_id
        #: Off only in tests that must show loss: forwards published without the outbox,
        #: the stream read from the consumer's own position instead of the journal's cursor.
        self.use_outbox = outbox
        self.use_cursor = cursor
        self.room = server.room
        #: Nick -> (host, target) of every remote entry, whether its host lives or not.
        self.directory: dict[str, tuple[str, str | None]] = {}
        self.alive_hosts: set[str] = set()
        #: Our own entries: nick -> (target, revision) as the bucket has them.
        self.own: dict[str, tuple[str | None, int]] = {}
        #: Nicks with a directory call in flight, and the target it sends (one call a nick at a time).
        self._busy: dict[str, str | None] = {}
        self._to_release: set[str] = set()  # left while busy
        self.directory_complete = False
        #: Parked NICKs: member id -> (input offset after the command, the name).
        self._claims: dict[int, tuple[int, str]] = {}
        #: Forwards: member id -> the publish in flight (one a sender).
        self._in_flight: dict[int, tuple[int, int]] = {}  # (its end offset, how many forwards)
        #: Forwards of members that left before the cluster had them all: published from here.
        self._orphans: dict[int, deque[tuple[int, int, bytes]]] = {}
        #: Messages from other hosts that wait, by receiver nick, in stream order.
        self._stash: dict[str, deque[Incoming]] = {}
        self._stash_bytes: dict[str, int] = {}
        self._held: list[Incoming] = []  # arrived before the directory was complete
        self._held_back: set[int] = set()  # members whose commands wait for the directory
        #: The highest stream sequence handled; None until started (the journal's is it then).
        self._handled_to: int | None = None
        self.connected = False

    # -- starting ------------------------------------------------------------------------
    def start(self) -> None:
        """Once serving (restored or fresh): connect, read the directory, publish what the
        outboxes hold, read the stream from the journal's cursor. Made before, the cluster
        already holds back what restored members say until the directory is read."""
        self._handled_to = self.server.journal.cursor
        self.server.loop.add(self.bus.fileno(), IN, lambda mask: self._on_results())
        cursor = self.server.journal.cursor if self.use_cursor else None
        self.bus.start(cursor)
        for connection in self.server.connections.values():
            self._publish_next(connection.member_id)
        log.info("cluster: host %s, reading the stream after sequence %s", self.host_id,
                 cursor if cursor is not None else "the consumer's own position (--no-cursor)")

    @property
    def cursor(self) -> int:
        """Every message up to here is handled: the lowest stashed one, less one."""
        if self._handled_to is None:
            return self.server.journal.cursor
        waiting = [queue[0].seq for queue in self._stash.values() if queue] + [m.seq for m in self._held[:1]]
        return min(waiting) - 1 if waiting else self._handled_to

    # -- the server's hooks --------------------------------------------------------------
    def parks(self, connection: "Connection", end: int, command) -> bool:
        """Whether ``command`` waits for the cluster (a NICK to claim); the server then keeps
        its input unhandled and stops taking this client's commands until :meth:`_claimed`."""
        if not isinstance(command, Nick):
            return False
        member = self.room.members[connection.member_id]
        name = command.name
        if name == member.nick or not self.room.nick_free(member.id, name) or self._claiming(name):
            return False  # the room answers: OK again, bad-name or nick-taken
        self._claims[member.id] = (end, name)
        connection.park()
        self._busy[name] = member.target
        self.bus.claim(member.id, name, self._entry(name, member.target))
        return True

    def holds_back(self, connection: "Connection") -> bool:
        """Whether the client's commands wait (it is parked) until the directory is read: a
        member restored paired across hosts, whose peer the directory has not shown again."""
        if self.directory_complete or not self.room.awaiting(connection.member_id):
            return False
        connection.park()
        self._held_back.add(connection.member_id)
        return True

    def _claiming(self, name: str) -> bool:
        return any(claimed == name for _, claimed in self._claims.values())

    def has_room(self, connection: "Connection", member: Member | None) -> bool:
        return connection.forwards is None or connection.forwards.free >= MAX_FORWARD + 4

    def forward(self, forward: Forward) -> None:
        connection = self.server.connections.get(forward.sender)
        payload = encode_forward(forward)
        if not self.use_outbox:
            [incoming] = decode_forwards(0, payload)
            self.bus.publish(("bare", forward.sender), forward.host, forward.receiver,
                             message_id(incoming, incoming), payload)
            return
        connection.forwards.append(payload)

    def committed(self, connections) -> None:
        """After a commit: publish what the outboxes now hold, and tell the directory of
        nicks and targets that changed."""
        for connection in connections:
            self._publish_next(connection.member_id)
            member = self.room.members.get(connection.member_id)
            if member is not None and member.nick is not None:
                self._sync_entry(member)

    def nick_left(self, nick: str) -> None:
        """A member leaves the room (QUIT, or closed): its nick leaves the directory."""
        self._release(nick)

    def closed(self, connection: "Connection") -> None:
        """A client is closed: forwards it left go on from memory."""
        self._claims.pop(connection.member_id, None)
        forwards = connection.forwards
        if forwards is not None and forwards:
            # All not acknowledged, the batch in flight first: its ack takes it off.
            self._orphans[connection.member_id] = deque(forwards.entries())
            if connection.member_id not in self._in_flight:
                self._publish_next(connection.member_id)

    def wake(self, nick: str | None) -> None:
        """Room in a receiver's output ring, or a change in the directory: try its stash."""
        if nick is not None and self._stash.get(nick):
            self._take_stash(nick)

    # -- publishing forwards -------------------------------------------------------------
    def _publish_next(self, member_id: int) -> None:
        if member_id in self._in_flight:
            return
        orphans = self._orphans.get(member_id)
        if orphans is not None:
            if not orphans:
                del self._orphans[member_id]
                return
            entries = list(orphans)
        else:
            connection = self.server.connections.get(member_id)
            if connection is None or connection.forwards is None or not connection.forwards:
                return
            entries = connection.forwards.entries()
        # Everything waiting, up to MAX_BATCH, in one publish: one in flight per sender keeps
        # them in order, and a batch makes that one round trip carry many.
        batch, size = [], 0
        for start, end, payload in entries:
            if batch and size + len(payload) > MAX_BATCH:
                break
            batch.append((start, end, payload))
            size += len(payload)
        payload = b"".join(entry[2] for entry in batch)
        forwards = decode_forwards(0, payload)
        end = batch[-1][1]
        log.debug("cluster: publishing %s>%s k=%d..%d (outbox %d..%d)", forwards[0].sender, forwards[0].receiver,
                  forwards[0].k, forwards[-1].k, batch[0][0], end)
        self._in_flight[member_id] = (end, len(batch))
        self.bus.publish((member_id, end), json.loads(payload.partition(b"\n")[0])["host"], forwards[0].receiver,
                         message_id(forwards[0], forwards[-1]), payload)

    def _published(self, result: Published) -> None:
        if result.token[0] == "bare":
            return
        member_id, end = result.token
        log.debug("cluster: published member %d to %d at seq %d%s (in flight: %s)", member_id, end, result.seq,
                  " (duplicate)" if result.duplicate else "", self._in_flight.get(member_id))
        in_flight = self._in_flight.get(member_id)
        if in_flight is None or in_flight[0] != end:
            return
        del self._in_flight[member_id]
        orphans = self._orphans.get(member_id)
        if orphans is not None:
            for _ in range(in_flight[1]):
                orphans.popleft()
        else:
            connection = self.server.connections.get(member_id)
            if connection is not None and connection.forwards is not None:
                connection.forwards.published_to(end)
                self.server.changed(member_id)
                self.server.wake(member_id)  # it may wait for room in its outbox
        self._publish_next(member_id)

    # -- the directory: our own entries --------------------------------------------------
    def _entry(self, nick: str, target: str | None) -> bytes:
        return json.dumps({"host": self.host_id, "target": target}, separators=(",", ":")).encode()

    def _sync_entry(self, member: Member) -> None:
        nick = member.nick
        if nick in self._busy or not self.directory_complete:
            return
        known = self.own.get(nick)
        if known is None:
            self._busy[nick] = member.target
            self.bus.claim(("sync", member.id), nick, self._entry(nick, member.target))
        elif known[0] != member.target:
            self._busy[nick] = member.target
            self.bus.update(member.id, nick, self._entry(nick, member.target), known[1])

    def _release(self, nick: str) -> None:
        if nick in self._busy:
            self._to_release.add(nick)
            return
        known = self.own.pop(nick, None)
        if known is not None:
            self._busy[nick] = None
            self.bus.release(nick, known[1])

    def _answered(self, nick: str, ok: bool, revision: int) -> None:
        """A claim or update of our own entry came back: remember what the bucket now has."""
        target = self._busy.pop(nick, None)
        if ok and revision > self.own.get(nick, (None, 0))[1]:
            self.own[nick] = (target, revision)

    def _claimed(self, result: Claimed) -> None:
        self._answered(result.nick, result.ok, result.revision)
        if isinstance(result.token, tuple):  # ("sync", member id): an entry put back, not a NICK
            self._after_directory_call(result.nick)
            return
        member_id = result.token
        parked = self._claims.pop(member_id, None)
        connection = self.server.connections.get(member_id)
        if parked is None or connection is None:
            if result.ok and not self._holds(result.nick):
                self._release(result.nick)
            return
        end, name = parked
        if result.ok:
            member = self.room.members[member_id]
            old = member.nick
            outcome = self.room.handle(member_id, Nick(name))
            member.incarnation, member.sent = random.getrandbits(63) or 1, 0
            outcome.changed.add(member_id)
            if old is not None and old != name:
                self._release(old)
        else:
            outcome = Outcome().tell(member_id, Failed("nick-taken"))
        self.server.resume_parked(connection, end, outcome)
        self._after_directory_call(result.nick)

    def _after_directory_call(self, nick: str) -> None:
        """One call per nick at a time: what waited for this one goes now."""
        if nick in self._to_release:
            self._to_release.discard(nick)
            if not self._holds(nick):
                self._release(nick)
                return
        member = self._holder(nick)
        if member is not None:
            self._sync_entry(member)

    def _holder(self, nick: str) -> Member | None:
        member = self.room._by_nick.get(nick)
        return member if member is not None and member.id in self.server.connections else None

    def _holds(self, nick: str) -> bool:
        return self._holder(nick) is not None

    # -- the directory: everyone's entries -----------------------------------------------
    @staticmethod
    def _decoded(value: bytes) -> tuple[str, str | None]:
        entry = json.loads(value)
        return str(entry["host"]), entry.get("target")

    def _nick_changed(self, change: NickChanged) -> None:
        if change.value is None:
            self.directory.pop(change.nick, None)
            if self.own.get(change.nick, (None, -1))[1] <= change.revision:
                self.own.pop(change.nick, None)
            self._apply(self.room.remote_gone(change.nick))
            return
        try:
            host, target = self._decoded(change.value)
        except (ValueError, KeyError, TypeError):
            log.warning("cluster: the directory entry of %r is not chatd's (%r): ignored", change.nick, change.value)
            return
        if host == self.host_id:
            if change.revision > self.own.get(change.nick, (None, 0))[1]:
                self.own[change.nick] = (target, change.revision)
            if self.directory_complete and not self._holds(change.nick) and not self._claiming(change.nick):
                self._release(change.nick)
            return
        self.directory[change.nick] = (host, target)
        if host in self.alive_hosts:
            self._apply(self.room.remote_changed(change.nick, host, target))
            self.wake(target)

    def _host_changed(self, change: HostChanged) -> None:
        if change.alive == (change.host_id in self.alive_hosts) or change.host_id == self.host_id:
            return
        if change.alive:
            self.alive_hosts.add(change.host_id)
            log.info("cluster: host %s is up", change.host_id)
        else:
            self.alive_hosts.discard(change.host_id)
            log.warning("cluster: host %s is gone: its members leave the room here", change.host_id)
        for nick, (host, target) in list(self.directory.items()):
            if host == change.host_id:
                outcome = self.room.remote_changed(nick, host, target) if change.alive else self.room.remote_gone(nick)
                self._apply(outcome)

    def _directory_done(self) -> None:
        if self.directory_complete:
            return
        self.directory_complete = True
        self._apply(self.room.directory_complete())
        for nick in [nick for nick in self.own if not self._holds(nick) and not self._claiming(nick)]:
            self._release(nick)  # ours from an earlier life, its member gone
        for member in list(self.room.members.values()):
            if member.nick is not None and member.id in self.server.connections:
                self._sync_entry(member)
        held, self._held = self._held, []
        for incoming in held:
            self._incoming(incoming)
        for member_id in sorted(self._held_back):
            connection = self.server.connections.get(member_id)
            if connection is not None:
                connection.open()
                self.server.take_input(connection)
        self._held_back.clear()
        log.info("cluster: directory read (%s on other hosts, %s alive)", plural(len(self.directory), "member"),
                 plural(len(self.alive_hosts), "other host"))

    # -- messages from other hosts -------------------------------------------------------
    def _incoming(self, incoming: Incoming) -> None:
        if not self.directory_complete:
            self._held.append(incoming)
            return
        queue = self._stash.get(incoming.receiver)
        if queue:
            self._stash_one(incoming)
            return
        if not self._take(incoming):
            self._stash_one(incoming)
            return
        self._handled_to = max(self._handled_to, incoming.seq)

    def _take(self, incoming: Incoming) -> bool:
        """Hand one message to the room; False if it must wait."""
        member = self.room._by_nick.get(incoming.receiver)
        connection = self.server.connections.get(member.id) if member is not None else None
        if connection is not None and not self.server.output_has_room(connection):
            return False
        outcome = self.room.receive(incoming.receiver, incoming.sender, incoming.incarnation, incoming.k,
                                    incoming.text)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("cluster: seq %d %s>%s k=%d: %s", incoming.seq, incoming.sender, incoming.receiver, incoming.k,
                      "waits" if outcome is None else "delivered" if outcome.deliveries else "dropped")
        if outcome is None:
            return False
        self._apply(outcome)
        return True

    def _stash_one(self, incoming: Incoming) -> None:
        queue = self._stash.setdefault(incoming.receiver, deque())
        queue.append(incoming)
        size = self._stash_bytes.get(incoming.receiver, 0) + len(incoming.text) + 64
        self._stash_bytes[incoming.receiver] = size
        if size > STASH_LIMIT:
            member = self.room._by_nick.get(incoming.receiver)
            if member is not None and member.id in self.server.connections:
                self.server.close_client(member.id, f"took none of {plural(len(queue), 'message')} from other "
                                                    f"hosts ({size} bytes)")
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
                member = self.room._by_nick.get(nick)
                if member is None or member.target != incoming.sender:
                    queue.popleft()  # no one here takes it any more: dropped, like the room would
                    continue
                return
            queue.popleft()
            self._stash_bytes[nick] -= len(incoming.text) + 64
            self._handled_to = max(self._handled_to, incoming.seq)
        self._drop_stash(nick)

    # -- results -------------------------------------------------------------------------
    def _apply(self, outcome: Outcome) -> None:
        if outcome.deliveries or outcome.changed or outcome.closes or outcome.forwards:
            self.server.apply(outcome)
            self.server.changed(*outcome.changed)

    def _on_results(self) -> None:
        for result in self.bus.results():
            if isinstance(result, Delivered):
                try:
                    forwards = decode_forwards(result.seq, result.payload)
                except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
                    log.warning("cluster: stream message %d is not chatd's forwards (%s): skipped", result.seq, exc)
                    self._handled_to = max(self._handled_to, result.seq)
                    continue
                for incoming in forwards:
                    self._incoming(incoming)
            elif isinstance(result, Published):
                self._published(result)
            elif isinstance(result, NickChanged):
                self._nick_changed(result)
            elif isinstance(result, HostChanged):
                self._host_changed(result)
            elif isinstance(result, DirectoryComplete):
                self._directory_done()
            elif isinstance(result, Claimed):
                self._claimed(result)
            elif isinstance(result, Updated):
                self._answered(result.nick, result.ok, result.revision)
                if not result.ok:
                    self.own.pop(result.nick, None)  # someone else's now, or gone: claim it again
                self._after_directory_call(result.nick)
            elif isinstance(result, Released):
                self._busy.pop(result.nick, None)
                self._after_directory_call(result.nick)
            elif isinstance(result, Connected):
                self.connected = True
                log.info("cluster: connected to %s", result.server)
            elif isinstance(result, Disconnected):
                self.connected = False
                log.warning("cluster: disconnected from NATS; reconnecting (messages wait in the outboxes)")
            elif isinstance(result, BusError):
                log.warning("cluster: %s", result.message)

    # -- reports -------------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "host": self.host_id,
            "connected": self.connected,
            "hosts_alive": sorted(self.alive_hosts),
            "nicks_held_here": len(self.own),
            "members_elsewhere": len(self.directory),
            "cursor": self.cursor,
            "forwards_in_flight": len(self._in_flight),
            "stashed": sum(len(queue) for queue in self._stash.values()),
            "bus": self.bus.status(),
        }

    def close(self) -> None:
        self.bus.close()
