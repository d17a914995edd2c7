"""Sessions kept in the cluster: a session's client resumes on any host, exactly once both ways.

Theory of operation
-------------------
On one host a session lives in the journal (:mod:`chatd.sessions`). Across hosts
(``--cluster``) a host can be lost whole, journal and all, so what a client must
get back is kept in the cluster too: one entry per session in the sessions
bucket (key: the hex of its token's hash, which reveals nothing of the token),
:data:`ENTRY_FIELDS`: the host holding it, its nick and target, ``handled``
(its chat commands handled), its nick's incarnation and ``sent`` (the ``k`` of
its last forward), and a *checkpoint* of what it received: ``n``, and the stream
sequence, sender incarnation and ``k`` of the message numbered ``n``.

**Told only what the cluster holds.** A client hears a handled count (``SESSION``'s,
``HANDLED``, ``RESUMED``) only once the bucket holds one at least as high, with the
state those commands made. An ``ACK`` is *parked* (its client's commands wait, as a
``NICK`` claim's do) until its member's outbox is empty, every forward acknowledged
by the stream (nothing new joins it: the client is parked), then the entry is
written, compare-and-set on the revision this host holds, and only then is the ACK
answered (:meth:`chatd.sessions.Sessions.handle`). The checkpoint written is the
one of the message the client acknowledged (this host marks each message it gives
a session with its sequence, :meth:`Keeper.taken`); a host restarted after a crash
has no marks and keeps the entry's checkpoint, which is older: safe, only longer to
read again.

**``n`` follows from the stream.** A session takes every message the stream holds
for its nick, whatever its target at that moment (:meth:`chatd.room.Room.receive`),
dropping a repeat by its sender's incarnation and ``k``. So the numbering is a
function of the stream alone from a checkpoint, and any host reading the stream from
there numbers as the lost host did.

**A resume elsewhere** (``RESUME`` of a session this host does not hold) is parked
and goes through :class:`Step`: the entry is read (none, or ended: ``ERR
unknown-session``); written back naming this host, compare-and-set on the revision
read (*the fence*: a host that held it fails its next write on it, and learns it lost
the session); its nick is taken in the directory, whoever holds it; then the stream's
messages for the nick from the checkpoint's sequence to what this host has read are
read again (:meth:`chatd.bus.Bus.replay`) while newer ones wait
(:meth:`chatd.inbound.Inbound.reserve`). Then, in one commit, the session's member is
made from the entry (:meth:`chatd.room.Room.adopt_session`), the messages read again
are numbered by the room's rule, and the client is told ``RESUMED`` and every
``FROM`` above the ``n`` it gave. It resends the commands above ``handled``: they
get the ``k`` they had, and receivers drop what they have.

**Fencing.** A host that learns it lost a session (its write fails on the
revision, or the directory shows the session's nick on another host) tells the
client ``ERR moved`` and closes it: the client resumes wherever the load balancer
sends it. What the old host still delivers meanwhile, from messages it had read,
carries the ``n`` any host would give; what it handled but did not make durable
was never counted to the client.

Limits, honestly: the single sender incarnation a receiver remembers
(:class:`chatd.room.Member`) drops a repeat only if no other sender's message came
between (a session receiving from two senders around a re-pairing, with a crash of
one's host, may see one message twice); a session not resumed before its lost
host's lease lapses is shown gone to its peers meanwhile (``UNPAIRED``, then
``PAIRED`` when it is back); entries of sessions whose host was lost and whose
client never came back are removed only by the bucket's age (a day).
"""

from __future__ import annotations

import enum
import json
import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from .bus import Bus, Claimed, Replayed, SessionRead, SessionWritten
from .bus.payloads import MAX_REPLAY, NO_END, BusPayloadError, Complaints, read_session
from .forwards import Incoming, chat_forwards
from .room import Ack, Busy, Failed, From, Outcome, Resume, Room, StartSession
from .sessions import digest, new_token, shown

if TYPE_CHECKING:
    from fdkeep.loop import Loop

    from .across import ServedMembers
    from .connection import Connection
    from .directory import DirectoryView
    from .inbound import Inbound
    from .room import Member

log = logging.getLogger("chatd")

#: A session entry's fields (chatd.bus.payloads.read_session reads them).
ENTRY_FIELDS = ("v", "host", "nick", "target", "handled", "inc", "sent", "n", "seq", "pinc", "pk")


#: Takeovers under way at once, at most; more are answered ``ERR busy 1`` (a lost host's herd
#: otherwise runs every admitted takeover at once, each waiting on all the others, and the
#: publishes of the clients chatting on wait behind them: bench/host_loss.py).
MAX_TAKEOVERS = 64


@dataclass(frozen=True)
class Checkpoint:
    """What a session had received at one message: its ``n``, the stream sequence it came in,
    and its sender's incarnation and ``k`` (the room's repeat check from there on)."""

    n: int
    seq: int
    inc: int
    k: int


def sid_of(hashed: bytes) -> str:
    """A session's key in the bucket: its token's hash, in hex."""
    return hashed.hex()


@dataclass
class Waiting:
    """A parked command of a session, answered once the session's entry is written: an ACK, a
    NICK or PAIR, or a RESUME of a session this host holds (whose count it tells)."""

    session_id: int  # the session's member: its state is what is written
    parked_id: int  # the connection whose command waits (the same member, but for a RESUME)
    n: int | None  # an ACK's n: the checkpoint moves up to it
    answer: Callable[[], None]
    #: A RESUME's: the session turned out to be another host's (the write failed on the fence).
    moved: Callable[[], None] | None = None


class Step(enum.Enum):
    """Where a resume of a session held elsewhere stands; each step waits for one bus answer."""

    READING = "reading its entry"
    FENCING = "writing its entry back, naming this host"
    TAKING_NICK = "taking its nick in the directory"
    REPLAYING = "reading its messages again"


@dataclass
class Takeover:
    member_id: int
    end: int  # the RESUME's input end
    command: Resume
    hashed: bytes
    step: Step = Step.READING
    entry: dict | None = None
    last: int = 0  # what this host had read when it reserved the nick
    messages: tuple = ()  # read again so far


class Keeper:
    """This host's side of the sessions bucket: parked SESSION, ACK and RESUME commands,
    checkpoints, takeovers and fencing."""

    def __init__(self, bus: Bus, host_id: str, room: Room, members: "ServedMembers", inbound: "Inbound",
                 directory: "DirectoryView", loop: "Loop", pending=lambda member_id: False):
        self.bus = bus
        self.host_id = host_id
        self.room = room
        self.members = members
        self.inbound = inbound
        self.directory = directory
        self.loop = loop
        #: Whether a member's forwards are not all acknowledged yet (chatd.forwards.Publisher).
        self.pending = pending
        #: By token hash: the entry's revision this host wrote or read (its fence).
        self._revisions: dict[bytes, int] = {}
        #: By token hash: the checkpoint the entry holds, and the marks since (n -> checkpoint).
        self._checkpoints: dict[bytes, Checkpoint] = {}
        self._marks: dict[bytes, deque[Checkpoint]] = {}
        #: Parked: ACKs and NICKs by token hash (member id, input end, the ACK's n, or the NICK's
        #: outcome); SESSIONs by member id.
        self._acks: dict[bytes, dict[int, Waiting]] = {}  # by token hash, then the parked connection
        #: The parked connections a write in flight answers (those parked when it was made), and
        #: the handled count it writes.
        self._covering: dict[bytes, set[int]] = {}
        self._written: dict[bytes, int] = {}
        self._starts: dict[int, tuple[int, str, bytes, int]] = {}
        self._writing: set[bytes] = set()
        self._takeovers: dict[str, Takeover] = {}
        self.complaints = Complaints(lambda line: log.warning("cluster: %s", line))

    # -- parking the session's commands ---------------------------------------------------
    def parks(self, connection: "Connection", end: int, command) -> bool:
        member = self.room.members[connection.member_id]
        if isinstance(command, StartSession):
            return self._start(connection, member, end)
        if isinstance(command, Ack):
            if not member.token:
                return False  # answered ERR no-session
            self._wait(member.token, Waiting(member.id, member.id, command.n,
                                             lambda: self.members.answer_parked(member.id, end, command)))
            connection.park()
            self._checkpoint(member.token)
            return True
        if isinstance(command, Resume):
            return self._resume_elsewhere(connection, end, command)
        return False

    def _start(self, connection: "Connection", member: "Member", end: int) -> bool:
        token, hashed = new_token()
        cursor = self.inbound.handled_to or 0
        checkpoint = Checkpoint(member.received, cursor, member.peer_incarnation, member.last_k)
        self._checkpoints[hashed] = checkpoint
        handled = member.handled if member.token else 0
        self._starts[member.id] = (end, token, hashed, handled)
        connection.park()
        self.bus.session_put(("start", member.id), sid_of(hashed), self._entry(member, checkpoint, handled), 0)
        return True

    def _entry(self, member: "Member", checkpoint: Checkpoint, handled: int | None = None) -> bytes:
        return json.dumps({"v": 1, "host": self.host_id, "nick": member.nick, "target": member.target,
                           "handled": member.handled if handled is None else handled, "inc": member.incarnation,
                           "sent": member.sent, "n": checkpoint.n, "seq": checkpoint.seq, "pinc": checkpoint.inc,
                           "pk": checkpoint.k}, separators=(",", ":")).encode()

    # -- what the room gave sessions ---------------------------------------------------------
    def taken(self, incoming: Incoming, outcome: Outcome) -> None:
        """The room took a message from the stream: a session's is marked with its sequence."""
        for member_id, event in outcome.deliveries:
            if type(event) is From:
                member = self.room.members.get(member_id)
                if member is not None and member.token:
                    self._marks.setdefault(member.token, deque()).append(
                        Checkpoint(event.n, incoming.seq, incoming.incarnation, incoming.k))

    # -- ACK: the entry written, then answered ---------------------------------------------
    def outbox_drained(self, member_id: int) -> None:
        """The member's forwards are all acknowledged: a parked ACK of it may be written now."""
        member = self.room.members.get(member_id)
        if member is not None and member.token in self._acks:
            self._checkpoint(member.token)

    def answer_when_kept(self, member: "Member", end: int, outcome: Outcome) -> None:
        """A session's parked NICK was claimed (``outcome``: the room took it): written to its entry
        before it is answered, as an ACK is. A client resends what the entry does not count, and a
        NICK resent to another host before the entry had it would find its own nick taken."""
        self._wait(member.token, Waiting(member.id, member.id, None,
                                         lambda: self.members.resume_parked(member.id, end, outcome)))
        self._checkpoint(member.token)

    def _wait(self, hashed: bytes, waiting: Waiting) -> None:
        # More than one connection may wait on one session: a client that left one silently sends
        # RESUME on a new one while the old one's ACK, already read, waits too.
        self._acks.setdefault(hashed, {})[waiting.parked_id] = waiting

    def _checkpoint(self, hashed: bytes) -> None:
        waitings = self._acks.get(hashed, {})
        for parked_id, waiting in list(waitings.items()):
            member = self.room.members.get(waiting.session_id)
            if member is None or member.token != hashed or not self.members.is_connected(parked_id):
                del waitings[parked_id]
        if not waitings:
            self._acks.pop(hashed, None)
            return
        if hashed in self._writing:
            return  # again when the write in flight is answered
        session_id = next(iter(waitings.values())).session_id
        member = self.room.members[session_id]
        if self.pending(session_id):
            return  # again when its outbox is drained
        n = max((waiting.n for waiting in waitings.values() if waiting.n is not None), default=None)
        revision = self._revisions.get(hashed)
        if revision is None:  # restarted since it was written: read it first (its revision, its checkpoint)
            self._writing.add(hashed)
            self.bus.session_get(("ack", hashed), sid_of(hashed))
            return
        marks = self._marks.get(hashed)
        checkpoint = self._checkpoints.get(hashed)
        while marks and n is not None and marks[0].n <= n:
            checkpoint = marks.popleft()
        self._checkpoints[hashed] = checkpoint
        self._writing.add(hashed)
        self._covering[hashed] = set(waitings)
        self._written[hashed] = member.handled
        self.bus.session_put(("ack", hashed), sid_of(hashed), self._entry(member, checkpoint), revision)

    # -- RESUME of a session held elsewhere ------------------------------------------------
    def _resume_elsewhere(self, connection: "Connection", end: int, command: Resume) -> bool:
        if not command.token:
            return False
        hashed = digest(command.token)
        session = self.room.session(hashed)
        member_id = connection.member_id
        if session is not None and session.id == member_id:
            return False  # the connection that holds it: chatd.sessions answers
        connection.park()
        if session is not None:
            # This host holds it: chatd.sessions resumes it, once the entry says this host still
            # does and holds the count RESUMED tells (another host may have taken it over).
            self._wait(hashed, Waiting(session.id, member_id, None,
                                       lambda: self.members.answer_parked(member_id, end, command),
                                       lambda: self._take_over(member_id, end, command)))
            self._checkpoint(hashed)
            return True
        self._take_over(member_id, end, command)
        return True

    def _take_over(self, member_id: int, end: int, command: Resume) -> None:
        """The parked RESUME of a session another host holds (or held)."""
        hashed = digest(command.token)
        sid = sid_of(hashed)
        if sid in self._takeovers or not self.directory.complete or len(self._takeovers) >= MAX_TAKEOVERS:
            # Taken over before the directory is read, it could not see its peer: the client comes
            # back in a second (a host just started, or reconnecting to NATS). Past MAX_TAKEOVERS
            # at once, the same: a herd is taken over a bounded number at a time.
            self._answer_later(member_id, end, Outcome().tell(member_id, Busy(1)))
            return
        wait = self.members.admit_resume()
        if wait:
            self._answer_later(member_id, end, Outcome().tell(member_id, Busy(wait)))
            return
        self._takeovers[sid] = Takeover(member_id, end, command, hashed)
        log.debug("member %d: resuming session %s, held elsewhere: %s", member_id, shown(command.token),
                  Step.READING.value)
        self.bus.session_get(("takeover", sid), sid)

    def _answer_later(self, member_id: int, end: int, outcome: Outcome) -> None:
        """Answer a parked command from the loop (not from inside the server's reading of it)."""
        self.loop.call_later(0, lambda: self._answer(member_id, end, outcome))

    def _answer(self, member_id: int, end: int, outcome: Outcome) -> None:
        if self.members.is_connected(member_id):
            self.members.resume_parked(member_id, end, outcome)

    def _give_up(self, sid: str, outcome_event, why: str) -> None:
        takeover = self._takeovers.pop(sid)
        log.info("member %d: resuming session %s… failed at %s: %s", takeover.member_id, sid[:4],
                 takeover.step.value, why)
        if takeover.step in (Step.TAKING_NICK, Step.REPLAYING) and takeover.entry["nick"] is not None:
            self.inbound.release(takeover.entry["nick"])
            self.directory.adopted(takeover.entry["nick"])
        self._answer(takeover.member_id, takeover.end, Outcome().tell(takeover.member_id, outcome_event))

    # -- the bus's answers -----------------------------------------------------------------
    def read(self, result: SessionRead) -> None:
        kind, key = result.token
        if kind == "ack":
            self._writing.discard(key)
            self._ack_read(key, result)
            return
        if kind == "lost":
            self._ack_read(key, result)  # names another host now: moved there
            return
        takeover = self._takeovers.get(key)
        if takeover is None:
            return
        if not self.members.is_connected(takeover.member_id):
            self._takeovers.pop(key)
            return
        try:
            entry = read_session(result.value) if result.value is not None else None
        except BusPayloadError as exc:
            if exc.kind != "ended":
                self.complaints("session entry", exc, f"{key[:8]}…")
            entry = None
        if entry is None:
            self._give_up(key, Failed("unknown-session"), "no such session in the cluster")
            return
        takeover.entry = entry
        takeover.step = Step.FENCING
        fenced = dict(entry, host=self.host_id)
        self.bus.session_put(("takeover", key), key, json.dumps(fenced, separators=(",", ":")).encode(),
                             result.revision)

    def _ack_read(self, hashed: bytes, result: SessionRead) -> None:
        try:
            entry = read_session(result.value) if result.value is not None else None
        except BusPayloadError:
            entry = None
        if entry is None or entry["host"] != self.host_id:
            self._moved(hashed, "its entry in the cluster names another host" if entry else "its entry is gone",
                        entry["host"] if entry else None)
            return
        self._revisions[hashed] = result.revision
        self._checkpoints.setdefault(hashed, Checkpoint(entry["n"], entry["seq"], entry["pinc"], entry["pk"]))
        if hashed in self._acks:
            self._checkpoint(hashed)

    def written(self, result: SessionWritten) -> None:
        kind, key = result.token
        if kind == "start":
            self._started(key, result)
        elif kind == "ack":
            self._acked(key, result)
        elif kind == "takeover":
            self._fenced(key, result)
        # ("end", …): an ended session's entry emptied; nothing waits for it

    def _started(self, member_id: int, result: SessionWritten) -> None:
        end, token, hashed, _ = self._starts.pop(member_id)
        if not result.ok or not self.members.is_connected(member_id):
            self._checkpoints.pop(hashed, None)
            if self.members.is_connected(member_id):
                self._answer(member_id, end, Outcome().tell(member_id, Failed("internal-error")))
            return
        old = self.room.members[member_id].token
        if old:
            self._forget(old)
        self._revisions[hashed] = result.revision
        self.members.answer_parked(member_id, end, StartSession(), (token, hashed))

    def _acked(self, hashed: bytes, result: SessionWritten) -> None:
        self._writing.discard(hashed)
        if not result.ok:
            # Another host wrote it: it took the session over. Which one, the entry says: this
            # host's member becomes that host's remote member, its peers here none the wiser.
            self._revisions.pop(hashed, None)
            self.bus.session_get(("lost", hashed), sid_of(hashed))
            return
        self._revisions[hashed] = result.revision
        waitings = self._acks.get(hashed, {})
        written = self._written.pop(hashed, None)
        for parked_id in self._covering.pop(hashed, set()):
            waiting = waitings.get(parked_id)
            if waiting is None:
                continue
            member = self.room.members.get(waiting.session_id)
            if member is not None and member.token == hashed and member.handled != written:
                # A RESUME here, while the connection it replaces (not parked) handled more since:
                # RESUMED would tell a count the cluster does not hold yet. Written again first.
                continue
            del waitings[parked_id]
            if member is not None and member.token == hashed and self.members.is_connected(parked_id):
                waiting.answer()
        if waitings:
            self._checkpoint(hashed)  # parked since the write was made: a write of their own
        else:
            self._acks.pop(hashed, None)

    def _fenced(self, sid: str, result: SessionWritten) -> None:
        takeover = self._takeovers.get(sid)
        if takeover is None:
            return
        if not result.ok:
            self._give_up(sid, Busy(1), "another host wrote its entry meanwhile")
            return
        self._revisions[takeover.hashed] = result.revision
        entry = takeover.entry
        checkpoint = Checkpoint(entry["n"], entry["seq"], entry["pinc"], entry["pk"])
        self._checkpoints[takeover.hashed] = checkpoint
        self._marks.pop(takeover.hashed, None)
        if entry["nick"] is None:
            self._adopt(sid, ())
            return
        takeover.step = Step.TAKING_NICK
        self.inbound.reserve(entry["nick"])
        takeover.last = self.inbound.handled_to or 0  # what this host read for no member: read again
        self.directory.take_over(("takeover", sid), entry["nick"], entry["target"])

    def claimed(self, result: Claimed) -> None:
        sid = result.token[1]
        takeover = self._takeovers.get(sid)
        self.directory.took(result)
        if takeover is None:
            self.directory.adopted(result.nick)
            return
        takeover.step = Step.REPLAYING
        checkpoint = self._checkpoints[takeover.hashed]
        # To the stream's end, not only to what this host has read: a host behind (one started
        # afresh reads the stream from its start) would otherwise number later messages for it
        # again as they come, from an n its client already has.
        self.bus.replay(("takeover", sid), result.nick, checkpoint.seq, NO_END)

    def replayed(self, result: Replayed) -> None:
        sid = result.token[1]
        takeover = self._takeovers.get(sid)
        if takeover is None:
            return
        takeover.messages += result.messages
        if len(result.messages) >= MAX_REPLAY:  # more than one answer holds: the next part
            self.bus.replay(("takeover", sid), result.receiver, result.messages[-1][0] + 1, NO_END)
            return
        self._adopt(sid, takeover.messages)

    def _adopt(self, sid: str, messages) -> None:
        takeover = self._takeovers.pop(sid)
        entry, member_id = takeover.entry, takeover.member_id
        nick = entry["nick"]
        floor = max([takeover.last, *(seq for seq, _, _ in messages)])
        if not self.members.is_connected(member_id):
            # Its client is gone: the entry names this host, with no member here; the next
            # RESUME anywhere takes it from the same checkpoint.
            if nick is not None:
                self.inbound.release(nick, floor=floor)
                self.directory.adopted(nick)
            return
        replayed = []
        for seq, _, payload in messages:
            try:
                replayed += [incoming for incoming in chat_forwards(seq, payload) if incoming.receiver == nick]
            except BusPayloadError:
                continue  # refused when first read too (chatd.inbound): handled, skipped
        outcome = self.room.adopt_session(
            member_id, takeover.hashed, nick, entry["target"], handled=entry["handled"], received=entry["n"],
            incarnation=entry["inc"], sent=entry["sent"], peer_incarnation=entry["pinc"], last_k=entry["pk"])
        log.info("member %d took session %s… over from host %s: %d messages read again from sequence %d, "
                 "its client has up to n %d", member_id, sid[:4], entry["host"], len(replayed),
                 self._checkpoints[takeover.hashed].seq, takeover.command.n)
        self.members.resume_taken_over(member_id, takeover.end, outcome)
        if nick is not None:
            self.directory.adopted(nick)
            # Numbered by the room's rule, as the lost host did; sent from the client's n on.
            self.inbound.release(nick, replayed, floor=floor, quiet=takeover.command.n)

    # -- fencing and endings ---------------------------------------------------------------
    def _moved(self, hashed: bytes, why: str, host: str | None = None) -> None:
        waitings = self._acks.pop(hashed, {})
        self._covering.pop(hashed, None)
        self._written.pop(hashed, None)
        self._forget(hashed, end=False)
        member = self.room.session(hashed)
        if member is not None:
            self.members.moved(member.id, why, host)
        for parked_id, waiting in waitings.items():
            if waiting.moved is not None and self.members.is_connected(parked_id):
                waiting.moved()  # a RESUME here of what another host holds now: taken over from it

    def lost_nick(self, member: "Member", host: str) -> None:
        """The directory shows this member's nick on ``host``: its session moved there (or this
        host was cut off long enough for its lease to lapse, and the nick was taken)."""
        why = f"the directory shows its nick {member.nick} on host {host}"
        if member.token:
            self._moved(member.token, why, host)
        else:
            self.members.moved(member.id, why, host)

    def ended(self, hashed: bytes) -> None:
        """A session ended here (QUIT, or its grace ran out): its entry is emptied."""
        self._forget(hashed)

    def _forget(self, hashed: bytes, end: bool = True) -> None:
        revision = self._revisions.pop(hashed, None)
        self._checkpoints.pop(hashed, None)
        self._marks.pop(hashed, None)
        if end and revision is not None:
            self.bus.session_put(("end", hashed), sid_of(hashed), b"", revision)

    def status(self) -> dict:
        return {"sessions_kept": len(self._revisions), "takeovers": {sid[:8]: t.step.value
                                                                    for sid, t in self._takeovers.items()}}

