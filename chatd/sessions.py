"""Sessions: a client's nick, pairing and messages outlive its connection, exactly once both ways.

Theory of operation
-------------------
A client asks for a session (``SESSION``) and gets a *token*: 128 random bits, a
secret. chatd keeps only its hash (:func:`digest`), in the member's journal record,
so the session survives whatever the journal survives (chatd's crash; with
``--state-dir``, everything on the host killed). Tokens are found by their hash
and compared in constant time; a log shows the first characters only (:func:`shown`).

What a session promises, and how:

- **Messages to the client, exactly once.** Written is not received: what the
  kernel sent may die with the connection. So a session's output ring keeps what
  was sent (:meth:`chatd.rings.OutRing.retain`) until the client says which
  messages it has: ``ACK <n>`` gives up the room of every ``FROM`` up to ``n``.
  ``RESUME <token> <n>`` on a new connection sends again every ``FROM`` above ``n``
  that the session kept, with its own ``n`` (a session's ``n`` counts all its
  messages, never restarting: :class:`chatd.room.Member`), found in the old
  output by its codec (:func:`chatd.protocols.froms_in`) and encoded for the new
  connection, so a line session may come back on the web. The other events in
  flight (replies, notices) are not sent again: ``RESUMED`` says the state they
  told (nick, peer).
- **Commands from the client, exactly once.** The room counts a session's chat
  commands handled (``handled``), committed with their effects; ``RESUMED`` and
  ``HANDLED`` (the answer to ``ACK``) say it, and the client resends only the
  commands after that count. Input the old connection had read and not handled
  is dropped with it: the count says it was not handled.
- **A detached session waits.** A connection that ends without ``QUIT`` (a
  WebSocket's close frame too: a page being reloaded sends one) leaves
  its session :class:`Detached` for the *grace* (``--session-grace``): the member
  stays in the room with its nick and pairing, what its peer sends goes into its
  output ring (when that has no room, the peer is held back, as by a slow reader),
  and its record stays in the journal (inode 0: no socket). When the grace runs
  out, the member leaves as ``QUIT`` would have it (its peer gets ``UNPAIRED``).
  After a crash, every session whose socket did not come back is detached anew,
  with a whole grace (:meth:`Sessions.detach_restored`).
- **A resume replaces.** The connection holding the session (if still open) is
  closed, the session's member moves to the resuming connection's slot
  (:meth:`chatd.room.Room.resume`: its peer sees nothing), and the old slot is
  freed, all in one commit.
- **A crowd is admitted at a rate.** Resumes take a token from a bucket
  (:class:`ResumeGate`); when it is empty the client hears ``ERR busy <seconds>``
  (on the web ``retry_after``) and tries again then: its session waits meanwhile.

Across hosts (``--cluster``) a session is kept in the cluster too, and a resume
on any host takes it back (:mod:`chatd.keeper`: the cluster's side of the
commands above). On its own host, what a session sent that the stream has not
acknowledged yet moves with it to its new connection's outbox
(:meth:`chatd.forwards.Publisher.moved`), ahead of anything it sends there, so
that its receivers take every message once, in order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from typing import TYPE_CHECKING, Protocol

from fdkeep.loop import Loop

from .protocols import HEALTH_ASKED, Codec, codec_for, froms_in

#: A web codec's state with its WebSocket open (chatd.protocols.web): a detached page's own
#: codec may have closed, and what waits for it must still be encoded.
OPEN_WEBSOCKET = b"W"
from .records import Record
from .rings import InRing, OutRing, Outbox
from .room import Ack, Busy, Failed, Handled, Outcome, Resume, StartSession

if TYPE_CHECKING:
    from .across import AcrossHosts
    from .connection import Connection
    from .journal import Journal
    from .room import Room

log = logging.getLogger("chatd")

#: How long a detached session waits for its client (``--session-grace``): long enough for a
#: phone to change networks, a laptop to wake, a proxy to restart and a client's backoff (capped
#: at 15 s) to try several times; short enough that the nick of a tab closed for good is free
#: again within minutes, and that its peer is not held back for long by messages nobody reads.
GRACE = 120.0
#: Resumes admitted per second, and at once (``--resume-rate``): a resume costs a scan of the
#: session's kept output (at most an output ring, 256 KiB) and its messages encoded again.
RESUME_RATE = 500.0
RESUME_BURST = 200
TOKEN_BYTES = 16


def new_token() -> tuple[str, bytes]:
    """A new session token (hex) and the hash chatd keeps of it."""
    token = secrets.token_hex(TOKEN_BYTES)
    return token, digest(token)


def digest(token: str) -> bytes:
    """What chatd keeps of a token: 128 bits of its SHA-256 (never the token itself)."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()[:TOKEN_BYTES]


def shown(token: str) -> str:
    """A token as a log may show it: never whole."""
    return f"{token[:4]}…" if token else "(none)"


class ResumeGate:
    """A token bucket: ``rate`` resumes a second, ``burst`` at once."""

    def __init__(self, rate: float = RESUME_RATE, burst: int = RESUME_BURST, clock=time.monotonic):
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens, self._at = float(burst), clock()

    def admit(self) -> int:
        """0 if a resume may go now (and it is counted), else the seconds to wait."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return 0
        # Those turned away come back after the wait, spread over it by their own jitter.
        return max(1, math.ceil((1 - self._tokens) / self.rate + self.burst / self.rate))


class Served(Protocol):
    """What sessions use of the server that owns the connections (chatd.server.ChatServer is
    one): its loop, room, journal and other hosts, and the one way each kind of change is made."""

    loop: Loop
    room: "Room"
    journal: "Journal"
    cluster: "AcrossHosts"

    def connection(self, member_id: int) -> "Connection | None": ...
    def changed(self, *member_ids: int) -> None: ...
    def free_slot(self, member_id: int) -> None: ...
    def leave_room(self, member_id: int) -> None: ...
    def drop_connection(self, member_id: int, reason: str, quiet: bool = False) -> "Connection | None": ...


class Detached:
    """A session's member without a connection: its rings and codec, until it is resumed or
    its grace runs out. What a record keeps of it is what it keeps of a connection, inode 0."""

    inode = 0
    finishing = False
    closed = True  # no socket: a commit sends it nothing
    poison_offset = poison_count = 0

    def __init__(self, member_id: int, inbox: InRing, outbox: OutRing, codec: Codec, forwards=None):
        self.member_id = member_id
        self.inbox = inbox
        self.outbox = outbox
        self.codec = codec
        self.forwards = forwards
        self.expiry = None  # the grace's timer

    def send(self, event) -> None:
        """What is for it waits in its output ring (the peer is held back when that is full)."""
        self.outbox.append(self.codec.encode(event))


class Sessions:
    """The server's sessions: carries out ``SESSION``, ``RESUME`` and ``ACK``, and owns the
    detached ones. The room keeps each session's state; the server its connections."""

    def __init__(self, server: Served, grace: float = GRACE, gate: ResumeGate | None = None):
        self.server = server
        self.grace = grace
        self.gate = gate or ResumeGate()
        self.detached: dict[int, Detached] = {}

    @property
    def loop(self) -> Loop:
        return self.server.loop

    def __len__(self) -> int:
        return len(self.detached)

    # -- the session's commands -----------------------------------------------------------
    def handle(self, connection: "Connection", command, started: tuple[str, bytes] | None = None) -> Outcome:
        """Carry out a session's command (``started``: the token and hash a SESSION gets, if
        the cluster made them first: chatd.keeper)."""
        member_id = connection.member_id
        room = self.server.room
        if isinstance(command, StartSession):
            if not self.server.cluster.keeps_sessions:
                return Outcome().tell(member_id, Failed("sessions-off"))
            connection.outbox.retain()
            token, hashed = started or new_token()
            log.debug("member %d: session %s begins", member_id, shown(token))
            return room.start_session(member_id, token, hashed)
        member = room.members[member_id]
        if isinstance(command, Ack):
            if not member.token:
                return Outcome().tell(member_id, Failed("no-session"))
            self._release(connection, command.n)
            return Outcome().tell(member_id, Handled(member.handled))
        assert isinstance(command, Resume), command
        return self._resume(connection, command)

    def release_ahead(self, connection: "Connection") -> None:
        """The client's commands wait for room (chatd.server), perhaps in its peer's output ring,
        kept full by what this client has and says so in an ACK behind the waiting command; while
        the peer's ACK waits the same way for room in this client's ring. So the ACKs already read
        are looked for ahead (by a codec of their own, from where the client's stands) and what
        they release is released now; each is still answered in its turn."""
        member = self.server.room.members.get(connection.member_id)
        if member is None or not member.token:
            return
        codec, inbox = connection.codec, connection.inbox
        if inbox.received == codec.consumed:
            return
        ahead = codec_for(codec.protocol, codec.consumed, codec.state)
        ahead.feed(inbox.bytes(codec.consumed, inbox.received))
        acked = None
        while (command := ahead.next_command()) is not None and command is not HEALTH_ASKED:
            if isinstance(command, Ack):
                acked = command.n if acked is None else max(acked, command.n)
        if acked is not None:
            self._release(connection, acked)

    def _release(self, connection: "Connection", n: int) -> None:
        """The client has every FROM up to ``n``: the kept output up to the last of them is given up."""
        outbox = connection.outbox
        sent = outbox.sent - outbox.kept
        # Up to the end of the last whole message it has that was sent whole (never into one it
        # lacks, or one half sent): what is between them stays kept, and is small.
        ends = [end for _, end, event in froms_in(connection.codec.protocol, outbox.kept_bytes())
                if event.n <= n and end <= sent]
        if ends and outbox.kept + ends[-1] > outbox.kept:
            outbox.release_to(outbox.kept + ends[-1])
            self.server.changed(connection.member_id)  # the room is free once committed (chatd.server wakes)

    def _resume(self, connection: "Connection", command: Resume) -> Outcome:
        member_id = connection.member_id
        room = self.server.room
        session = room.session(digest(command.token)) if command.token else None
        if session is None or not hmac.compare_digest(session.token, digest(command.token)):
            log.debug("member %d: RESUME with an unknown session %s", member_id, shown(command.token))
            return Outcome().tell(member_id, Failed("unknown-session"))
        wait = self.gate.admit()
        if wait:
            return Outcome().tell(member_id, Busy(wait))
        if session.id == member_id:
            return room.resume(member_id, member_id)
        holder = self._holder(session.id)
        replay = [event for _, _, event in froms_in(holder.codec.protocol, holder.outbox.kept_bytes())
                  if event.n > command.n]
        # Measured before anything moves: another protocol's encoding may be larger.
        needed = sum(len(connection.codec.encode(event)) for event in replay)
        if needed + 1024 > connection.outbox.free:
            log.warning("member %d: resuming session %s needs %d bytes of output ring, %d are free: busy",
                        member_id, shown(command.token), needed, connection.outbox.free)
            return Outcome().tell(member_id, Busy(1))
        if holder.forwards is not None and connection.forwards is not None \
                and holder.forwards.end - holder.forwards.published > connection.forwards.free:
            log.warning("member %d: resuming session %s needs its forwards' room in the new outbox: busy",
                        member_id, shown(command.token))
            return Outcome().tell(member_id, Busy(1))
        old = session.id
        self._let_go_of(old)
        # Its forwards not yet in the stream go on from the new connection's outbox, in this commit.
        self.server.cluster.session_moved(old, holder.forwards, connection)
        outcome = room.resume(member_id, old)
        connection.outbox.retain()
        log.debug("member %d resumed the session of member %d (%s): %d messages sent again from n %d",
                  member_id, old, shown(command.token), len(replay), command.n)
        for event in replay:  # after RESUMED, in order, each with its own n
            outcome.tell(member_id, event)
        return outcome

    def _holder(self, member_id: int):
        """The session's connection (served now if a restore left it waiting) or its Detached."""
        return self.detached.get(member_id) or self.server.connection(member_id)

    def _let_go_of(self, member_id: int) -> None:
        """The old holder of a session that moves: its connection closed, its slot freed; the
        member itself goes on under its new id."""
        detached = self.detached.pop(member_id, None)
        if detached is not None:
            if detached.expiry is not None:
                detached.expiry.cancel()
            self.server.free_slot(member_id)
        else:
            self.server.drop_connection(member_id, "its session was resumed on another connection")
            self.server.free_slot(member_id)

    # -- detached sessions ------------------------------------------------------------------
    def detach(self, connection: "Connection", reason: str) -> None:
        """The session's connection ended without QUIT: it waits for its client, for the grace."""
        member_id = connection.member_id
        # At debug level, as a client's coming and going: a proxy's reload detaches thousands at once.
        log.debug("member %d detached (%s): its session waits %g s for its client", member_id, reason, self.grace)
        inbox = connection.inbox
        inbox.consume(inbox.received)  # read and not handled: dropped; the handled count says so
        codec = connection.codec
        if codec.finished:  # a WebSocket closed by its page: what waits is still encoded, for the resume
            codec = codec_for(codec.protocol, codec.consumed, OPEN_WEBSOCKET)
        self._wait(Detached(member_id, inbox, connection.outbox, codec, connection.forwards))

    def detach_restored(self, slot: int, record: Record) -> None:
        """After a crash: a session whose socket did not come back waits for its client anew."""
        journal = self.server.journal
        inbox = InRing(journal.in_ring(slot), record.in_handled, record.in_handled)
        outbox = OutRing(journal.out_ring(slot), record.out_end, record.out_end, kept=record.out_start)
        codec = codec_for(record.protocol, record.in_handled, record.codec)
        # Across hosts, what its outbox holds was handled: published from memory once the cluster
        # starts (chatd.cluster), and moved to the connection that resumes it.
        forwards = Outbox(journal.box_ring(slot), record.box_start, record.box_end) if journal.box_size else None
        self._wait(Detached(slot, inbox, outbox, codec, forwards))

    def _wait(self, detached: Detached) -> None:
        detached.expiry = self.loop.call_later(self.grace, lambda: self._expire(detached.member_id))
        self.detached[detached.member_id] = detached
        self.server.changed(detached.member_id)

    def _expire(self, member_id: int) -> None:
        detached = self.detached.pop(member_id, None)
        if detached is None:
            return
        log.info("member %d: its session ended, its client did not come back within %g s", member_id, self.grace)
        self.server.free_slot(member_id)
        self.server.leave_room(member_id)

    def end_all(self, why: str) -> None:
        """Every detached session ends now (a drain)."""
        for member_id in list(self.detached):
            log.info("member %d: its detached session ends: %s", member_id, why)
            detached = self.detached.pop(member_id)
            detached.expiry.cancel()
            self.server.free_slot(member_id)
            self.server.leave_room(member_id)
