"""The chat room: names, pairs and message numbering. Pure logic, no I/O, no wire text.

Theory of operation
-------------------
Every connected client is a :class:`Member` with an id chosen by the server.
A member may take a *nick* and name a *target*. Two members are *paired* when
each one's target is the other's nick; pairing is never stored, only derived,
so a crash can never leave one side paired and the other not.

The room takes one *command* at a time (:meth:`Room.handle`: :class:`Nick`,
:class:`Pair`, :class:`Msg`, :class:`Who`, :class:`Ping`, :class:`Quit`, or :class:`Invalid`
for what a codec could not make sense of) and answers with an :class:`Outcome`:
the *events* to deliver, each addressed to a member id (:class:`Ok`,
:class:`Paired`, :class:`Unpaired`, :class:`From`, :class:`Users`,
:class:`Pong`, :class:`Bye`, :class:`Failed`), the members to close, and the members whose
crash-surviving fields (nick, target, ``received``) ``changed``. The room keeps
no record of what changed between calls: each outcome says it, and the caller
commits it.

Across hosts (:mod:`chatd.cluster`), the room also knows *remote* members: the
nick, host and target of every member of another chatd host, from the
cluster's directory (:meth:`Room.remote_changed`, :meth:`Room.remote_gone`).
A local member pairs with a remote one by the same rule, mutual targets. A
message to a remote peer is not delivered but *forwarded*: the outcome lists a
:class:`Forward`, numbered ``k`` by the sender (``k`` counts every message the
member has sent under its nick's *incarnation*, a random id drawn when it took
the nick), which the server publishes. The other host hands it to its room
(:meth:`Room.receive`), which drops what it has seen (``k`` at or below the last
``k`` of that incarnation) and numbers the rest ``n`` like a local message. The
room only ever tells its own members: the other host tells its own.

Commands and events are protocol-free. A codec per protocol
(:mod:`chatd.protocols`) turns a client's bytes into commands and events into
its bytes, so a line client and a browser chat in the same room.

The rules:

- ``Nick(name)`` → ``Ok("NICK", name)``; ``Failed("nick-taken")``, ``Failed("bad-name")``
  (no name, or not :data:`NAME_RE`)
- ``Pair(name)`` → ``Ok("PAIR", name)``, then ``Paired`` to both once mutual;
  the peer of a pairing this replaces gets ``Unpaired``; ``Failed("bad-name")``;
  ``Failed("self-pair")`` for one's own nick (a pairing with oneself could never
  be mutual, and the PAIR would silently end the pairing one has): nothing changes
- ``Msg(text)`` → the peer gets ``From(sender, n, text)``, ``n`` counting from 1
  what this receiver got on this pairing; ``Failed("not-paired")``;
  ``Failed("bad-text")`` for text with control characters (tab aside): they
  could garble a peer's terminal, and no protocol here needs them;
  ``Failed("empty-message")`` for no text at all (a slip, such as an Enter on an
  empty line, not something to number and show the peer); text of white space
  alone is text, and goes as sent
- ``Who()`` → ``Users``: every named member and its peer (the first :data:`MAX_USERS`)
- ``Ping()`` → ``Pong``: nothing else; a client learns that chatd is handling its
  commands again (the web page tells its user when chatd does not answer)
- ``Quit()`` → ``Bye``, then the member is closed; its peer gets ``Unpaired``
- ``Invalid(code)`` → ``Failed(code)``

Sessions (:mod:`chatd.sessions` carries out their commands; the room keeps their state):
a member with a session has its token's hash (``token``) and counts its chat commands
handled (``handled``, every command above but the session's own); its ``n`` counts the
whole session's messages, not one pairing's. :meth:`Room.resume` moves a session's member
to a new member id (a new connection's), so its peer sees nothing at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

#: What a nick (and so a PAIR target) may be.
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
#: A WHO answer lists at most this many members (so that one answer stays small).
MAX_USERS = 1000
#: What message text may not contain: C0 controls but tab, DEL, C1 controls.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
#: CONTROL's characters in ASCII, for bytes.translate to delete.
CONTROL_ASCII = bytes([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def has_control(text: str) -> bool:
    """Whether ``text`` has a CONTROL character. ASCII text (most) is checked by deleting them
    from its bytes, 5x faster than the regex at 16 KiB, where the regex was a third of the
    relay's CPU time (bench/web_rates.py --py-spy)."""
    if text.isascii():
        data = text.encode("ascii")
        return len(data.translate(None, CONTROL_ASCII)) != len(data)
    return CONTROL.search(text) is not None
#: Every error code chatd sends a client: the line protocol's ``ERR <code>``, the web
#: chat's ``{"type": "error", "code": <code>}``, and the refusal of a connection (``ERR``,
#: or an HTTP 503 naming it). The room, the codecs and the server send these and no
#: others, and README.md's protocol section explains each (tests/unit/test_error_codes.py).
ERROR_CODES = (
    "bad-name", "nick-taken", "self-pair",  # NICK, PAIR
    "not-paired", "empty-message", "bad-text",  # MSG
    "unknown-command", "line-too-long", "bad-encoding",  # what a codec cannot parse
    "crashed-server", "internal-error",  # chatd itself, not what the command said
    "server-full", "too-many-connections",  # a connection refused
    "unknown-session", "no-session", "sessions-off", "busy",  # SESSION, RESUME, ACK
    "moved",  # across hosts: the nick or session is another host's now (chatd.keeper, chatd.fencing)
)


# -- commands: what a member asks ---------------------------------------------------------
@dataclass(frozen=True)
class Nick:
    name: str | None


@dataclass(frozen=True)
class Pair:
    name: str | None


@dataclass(frozen=True)
class Msg:
    text: str


@dataclass(frozen=True)
class Who:
    pass


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Quit:
    pass


@dataclass(frozen=True)
class StartSession:
    """``SESSION``: make this member's state a session its client can take back (chatd.sessions)."""


@dataclass(frozen=True)
class Resume:
    """``RESUME <token> <n>``: take back the session ``token`` names; ``n`` is the last FROM seen."""

    token: str
    n: int


@dataclass(frozen=True)
class Ack:
    """``ACK <n>``: the client has every FROM up to ``n``; it asks how many commands were handled."""

    n: int


@dataclass(frozen=True)
class Invalid:
    """What a codec could not turn into a command; ``code`` names why (``unknown-command``…)."""

    code: str


Command = Nick | Pair | Msg | Who | Ping | Quit | Invalid | StartSession | Resume | Ack
#: The commands about the session itself, which chatd.sessions carries out (the rest are the chat's,
#: and a session counts them: ``Member.handled``).
SESSION_COMMANDS = (StartSession, Resume, Ack)


# -- events: what a member is told --------------------------------------------------------
@dataclass(frozen=True)
class Ok:
    verb: str  # "NICK" or "PAIR"
    name: str


@dataclass(frozen=True)
class Paired:
    peer: str


@dataclass(frozen=True)
class Unpaired:
    peer: str


@dataclass(frozen=True)
class From:
    sender: str
    n: int
    text: str


@dataclass(frozen=True)
class Users:
    #: (nick, the nick of its peer or None) for every named member.
    entries: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Pong:
    pass


@dataclass(frozen=True)
class Bye:
    pass


@dataclass(frozen=True)
class Failed:
    code: str


@dataclass(frozen=True)
class SessionStarted:
    token: str
    handled: int


@dataclass(frozen=True)
class Resumed:
    nick: str | None
    peer: str | None
    handled: int


@dataclass(frozen=True)
class Handled:
    count: int


@dataclass(frozen=True)
class Busy:
    """A resume refused for now (too many at once): try again after ``seconds``."""

    seconds: int


@dataclass(frozen=True)
class Moved:
    """This host may have lost the member's nick to another (chatd.fencing): the member is closed,
    and of its messages since its NICK the first ``sent`` were handled (they will be delivered)."""

    sent: int


Event = Ok | Paired | Unpaired | From | Users | Pong | Bye | Failed | SessionStarted | Resumed | Handled | Busy | Moved


@dataclass
class Member:
    id: int
    protocol: str = "line"
    nick: str | None = None
    target: str | None = None
    #: Messages received on the current pairing; the n of the next From is this + 1.
    received: int = 0
    peer: "Member | Remote | None" = None
    #: Across hosts: the random id of this member's hold on its nick, and the k of the
    #: last message it forwarded under it.
    incarnation: int = 0
    sent: int = 0
    #: Across hosts: the incarnation and k of the last forwarded message it received.
    peer_incarnation: int = 0
    last_k: int = 0
    #: Paired with a remote member when last committed: a restore re-pairs it silently
    #: once the directory shows that member again (see Room.restore).
    remote_paired: bool = False
    #: A session (chatd.sessions): the hash of its token (b"": none), and how many of the
    #: client's chat commands were handled since it began. A member with a session counts
    #: ``received`` over the whole session: a new pairing does not start it again, so the
    #: ``n`` a client resumes from names one message.
    token: bytes = b""
    handled: int = 0


@dataclass
class Remote:
    """A member of another chatd host, as the cluster's directory shows it."""

    nick: str
    host: str
    target: str | None
    peer: Member | None = None


@dataclass(frozen=True)
class Forward:
    """A message for a member of another host: the server publishes it."""

    sender: int
    host: str
    receiver: str
    sender_nick: str
    incarnation: int
    k: int
    text: str


@dataclass
class Outcome:
    """What one call changed: events to deliver in order, members to close, members changed."""

    deliveries: list[tuple[int, Event]] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)
    forwards: list[Forward] = field(default_factory=list)

    def tell(self, member_id: int, event: Event) -> "Outcome":
        self.deliveries.append((member_id, event))
        return self

    def merge(self, other: "Outcome") -> None:
        self.deliveries += other.deliveries
        self.closes += other.closes
        self.changed |= other.changed
        self.forwards += other.forwards


class Room:
    def __init__(self):
        self.members: dict[int, Member] = {}
        self._by_nick: dict[str, Member] = {}
        #: Members of other hosts, by nick (empty on one host).
        self.remote: dict[str, Remote] = {}
        #: Restored members paired with a remote one, until the directory shows it again.
        self._awaiting: dict[str, Member] = {}
        #: Members with a session, by the hash of its token.
        self._by_token: dict[bytes, Member] = {}
        #: Across hosts, this host's id: a message to a member of this host goes through the
        #: stream too, as a :class:`Forward` to here, so that it is stored in the cluster before
        #: it is delivered (None: on one host, or with ``--direct-same-host``, it is told at once).
        self.durable_host: str | None = None

    # -- membership ---------------------------------------------------------------------
    def join(self, member_id: int, protocol: str = "line") -> Outcome:
        self.members[member_id] = Member(member_id, protocol)
        return Outcome(changed={member_id})

    def restore(self, members: list[Member]) -> None:
        """Put back members saved before a crash, and re-derive their pairs silently."""
        for member in members:
            member.peer = None
            if member.nick is not None:
                if member.nick in self._by_nick:
                    member.nick = None  # two saved members with one nick: keep the first
                else:
                    self._by_nick[member.nick] = member
            self.members[member.id] = member
            if member.token:
                self._by_token[member.token] = member
        for member in members:
            if member.peer is None:
                peer = self._mutual_target(member)
                if isinstance(peer, Member):
                    member.peer, peer.peer = peer, member
                elif member.remote_paired and member.nick is not None:
                    self._awaiting[member.nick] = member

    def leave(self, member_id: int) -> Outcome:
        outcome = Outcome()
        member = self.members.pop(member_id, None)
        if member is None:
            return outcome
        if member.peer:
            self._unpair(member, outcome)
        if member.nick is not None:
            del self._by_nick[member.nick]
            self._awaiting.pop(member.nick, None)
        if member.token:
            del self._by_token[member.token]
        outcome.changed.discard(member_id)
        return outcome

    def pairs(self) -> list[tuple[Member, Member | Remote]]:
        """Every pair once: local pairs, and local members paired with a remote one."""
        return [(m, m.peer) for m in self.members.values()
                if m.peer is not None and (isinstance(m.peer, Remote) or m.id < m.peer.id)]

    def awaiting(self, member_id: int) -> bool:
        """Whether this restored member was paired across hosts and the directory has not
        shown its peer yet: what it says must wait, or it would be refused as unpaired."""
        member = self.members.get(member_id)
        return member is not None and member.nick is not None and self._awaiting.get(member.nick) is member

    def member_by_nick(self, nick: str) -> Member | None:
        """The local member holding ``nick``, if any."""
        return self._by_nick.get(nick)

    def take_nick(self, member_id: int, name: str, incarnation: int) -> Outcome:
        """``Nick(name)`` once the cluster made ``name`` this host's: handled like the command,
        and if the member takes it, it holds it under ``incarnation`` (a new random id: what it
        forwards is numbered ``k`` from 1 again, and no receiver mistakes it for a repeat)."""
        outcome = self.handle(member_id, Nick(name))
        member = self.members[member_id]
        if member.nick == name:
            member.incarnation, member.sent = incarnation, 0
            outcome.changed.add(member_id)
        return outcome

    def nick_free(self, member_id: int, name) -> bool:
        """Whether ``member_id`` may try to take ``name``: valid, and neither a local member
        nor a remote one (as far as the directory shows) holds it. The cluster decides."""
        if name is None or not NAME_RE.match(name):
            return False
        holder = self._by_nick.get(name)
        return (holder is None or holder.id == member_id) and name not in self.remote

    # -- the other hosts --------------------------------------------------------------------
    def remote_changed(self, nick: str, host: str, target: str | None) -> Outcome:
        """The directory shows ``nick`` on ``host`` with ``target``: re-derive its pairing."""
        outcome = Outcome()
        if nick in self._by_nick:
            return outcome  # ours: the directory echoes our own members
        remote = self.remote.get(nick)
        if remote is None:
            remote = self.remote[nick] = Remote(nick, host, target)
        else:
            remote.host = host
            if remote.target == target:
                return outcome
            remote.target = target
            if remote.peer is not None and remote.peer.nick != target:
                self._remote_left(remote, outcome)
        local = self._by_nick.get(target) if target is not None else None
        if local is None or local.target != nick or local.peer is remote:
            return outcome
        awaited = self._awaiting.pop(local.nick, None) is local
        if awaited and local.peer is None:
            local.peer, remote.peer = remote, local  # as it was before the crash: silently
            return outcome
        self._pair_if_mutual(local, outcome)
        return outcome

    def remote_gone(self, nick: str) -> Outcome:
        """``nick`` left the directory (its member left, or its host is gone)."""
        outcome = Outcome()
        remote = self.remote.pop(nick, None)
        if remote is not None and remote.peer is not None:
            self._remote_left(remote, outcome)
        return outcome

    def directory_complete(self) -> Outcome:
        """The directory has shown everything it holds: members that were paired with a
        remote member no longer there learn they are not."""
        outcome = Outcome()
        for member in self._awaiting.values():
            member.remote_paired = False
            self._count_anew(member)
            outcome.changed.add(member.id)
            if member.target is not None:
                outcome.tell(member.id, Unpaired(member.target))
        self._awaiting.clear()
        return outcome

    def _remote_left(self, remote: Remote, outcome: Outcome) -> None:
        member = remote.peer
        remote.peer = member.peer = None
        self._count_anew(member)
        member.remote_paired = False
        outcome.changed.add(member.id)
        outcome.tell(member.id, Unpaired(remote.nick))

    def through_stream(self, peer: "Member | Remote") -> bool:
        """Whether a message to ``peer`` is forwarded (:class:`Forward`) rather than told."""
        return isinstance(peer, Remote) or self.durable_host is not None

    def receive(self, receiver: str, sender: str, incarnation: int, k: int, text: str) -> Outcome | None:
        """A message forwarded to ``receiver`` through the stream (from another host, or from
        this one: :attr:`durable_host`). The outcome is empty when it is not for anyone here
        any more or was seen already; None when its receiver names the sender but is not
        paired with it (yet: the directory has not shown the pairing the sender's host saw):
        the caller keeps it and asks again later."""
        outcome = Outcome()
        member = self._by_nick.get(receiver)
        if member is None:
            return outcome
        if not member.token and member.target != sender:
            return outcome
        if incarnation == member.peer_incarnation and k <= member.last_k:
            return outcome
        # A session takes what the stream holds for it, whatever its target now: its host may be
        # lost, and the host that takes it over must number the stream's messages as this one
        # did, from the stream alone (chatd.keeper). The sender's host forwarded it paired.
        if not member.token and (member.peer is None or member.peer.nick != sender):
            return None
        member.peer_incarnation, member.last_k = incarnation, k
        member.received += 1
        outcome.changed.add(member.id)
        return outcome.tell(member.id, From(sender, member.received, text))

    # -- commands -----------------------------------------------------------------------
    def handle(self, member_id: int, command: Command) -> Outcome:
        member = self.members[member_id]
        outcome = Outcome()
        if isinstance(command, Nick):
            self._nick(member, command.name, outcome)
        elif isinstance(command, Pair):
            self._pair(member, command.name, outcome)
        elif isinstance(command, Msg):
            self._msg(member, command.text, outcome)
        elif isinstance(command, Who):
            outcome.tell(member.id, self.users())
        elif isinstance(command, Ping):
            outcome.tell(member.id, Pong())
        elif isinstance(command, Quit):
            outcome.tell(member.id, Bye()).closes.append(member.id)
        elif isinstance(command, Invalid):
            outcome.tell(member.id, Failed(command.code))
        else:
            raise TypeError(f"not a command: {command!r}")
        self.count_handled(member_id, outcome)
        return outcome

    # -- sessions (chatd.sessions carries out the commands; the room keeps the state) -------
    def count_handled(self, member_id: int, outcome: Outcome) -> None:
        """One more of this member's chat commands is handled (a session counts them)."""
        member = self.members.get(member_id)
        if member is not None and member.token:
            member.handled += 1
            outcome.changed.add(member_id)

    def start_session(self, member_id: int, token: str, digest: bytes) -> Outcome:
        """The member's state becomes a session its token (whose hash is ``digest``) takes
        back; a session it had is now named by the new token only."""
        member = self.members[member_id]
        if member.token:
            del self._by_token[member.token]
        else:
            member.handled = 0
        member.token = digest
        self._by_token[digest] = member
        return Outcome(changed={member_id}).tell(member_id, SessionStarted(token, member.handled))

    def session(self, digest: bytes) -> Member | None:
        """The member whose session's token hashes to ``digest``."""
        return self._by_token.get(digest)

    def resume(self, member_id: int, session_id: int) -> Outcome:
        """Member ``member_id`` (a new connection's) takes back the session member ``session_id``
        holds: what ``member_id`` was leaves the room, and the session's member goes on under
        ``member_id``, with its nick, pairing and counts (its peer sees nothing)."""
        if session_id == member_id:  # it holds the session already
            member = self.members[member_id]
            return Outcome().tell(member_id, Resumed(member.nick, member.peer.nick if member.peer else None,
                                                     member.handled))
        outcome = self.leave(member_id)
        member = self.members.pop(session_id)
        member.id = member_id
        self.members[member_id] = member
        peer = member.peer
        outcome.changed.add(member_id)
        return outcome.tell(member_id, Resumed(member.nick, peer.nick if peer is not None else None,
                                               member.handled))

    def adopt_session(self, member_id: int, digest: bytes, nick: str | None, target: str | None, *,
                      handled: int, received: int, incarnation: int, sent: int, peer_incarnation: int,
                      last_k: int) -> Outcome:
        """Member ``member_id`` (a new connection's) takes back a session another host held, as
        the cluster kept it (chatd.keeper): its nick (the directory made it this host's), target,
        counts and ids. A remote member of that nick, as the directory showed it, is this one now:
        a peer of it here goes on with it silently; a peer that names it and was not paired is
        told ``Paired``. The member is told ``Resumed``."""
        member = self.members[member_id]
        outcome = Outcome(changed={member_id})
        if member.peer is not None:
            self._unpair(member, outcome)
        if member.nick is not None:
            del self._by_nick[member.nick]
        if member.token:
            del self._by_token[member.token]
        was_paired = None
        if nick is not None:
            remote = self.remote.pop(nick, None)
            if remote is not None and remote.peer is not None:
                was_paired, remote.peer.peer = remote.peer, None
            holder = self._by_nick.get(nick)
            if holder is not None and holder is not member:
                raise ValueError(f"nick {nick} is held here by member {holder.id}")
            self._by_nick[nick] = member
        member.nick, member.target, member.peer = nick, target, None
        member.token, member.handled, member.received = digest, handled, received
        member.incarnation, member.sent = incarnation, sent
        member.peer_incarnation, member.last_k = peer_incarnation, last_k
        member.remote_paired = False
        self._by_token[digest] = member
        peer = self._mutual_target(member)
        if peer is not None:
            if isinstance(peer, Remote):
                if peer.peer is not None:
                    self._remote_left(peer, outcome)
                member.remote_paired = True
            elif peer.peer is not None and peer.peer is not member:
                self._unpair(peer, outcome)
            member.peer, peer.peer = peer, member
            if isinstance(peer, Member):
                outcome.changed.add(peer.id)
                if peer is not was_paired:
                    outcome.tell(peer.id, Paired(nick))
        return outcome.tell(member_id, Resumed(nick, peer.nick if peer is not None else None, handled))

    def move_away(self, member_id: int, host: str) -> Outcome:
        """The member's session (and nick) is ``host``'s now (chatd.keeper): it leaves this room
        without a word, and is a remote member on ``host`` from here on, its pairing unbroken."""
        member = self.members.pop(member_id)
        outcome = Outcome()
        if member.token:
            del self._by_token[member.token]
        if member.nick is None:
            if member.peer is not None:
                self._unpair(member, outcome)
            return outcome
        del self._by_nick[member.nick]
        self._awaiting.pop(member.nick, None)
        remote = self.remote[member.nick] = Remote(member.nick, host, member.target)
        peer, member.peer = member.peer, None
        if isinstance(peer, Member):
            peer.peer, remote.peer = remote, peer
            peer.remote_paired = True
            outcome.changed.add(peer.id)
        elif isinstance(peer, Remote):
            peer.peer = None
        return outcome

    def users(self) -> Users:
        named = [m for m in self.members.values() if m.nick is not None] + list(self.remote.values())
        return Users(tuple((m.nick, self._peer_nick(m)) for m, _ in zip(named, range(MAX_USERS))))

    def _peer_nick(self, member: Member | Remote) -> str | None:
        if isinstance(member, Member):
            return member.peer.nick if member.peer else None
        other = self._by_nick.get(member.target) or self.remote.get(member.target) if member.target else None
        return member.target if other is not None and other.target == member.nick else None

    def _nick(self, member: Member, name, outcome: Outcome) -> None:
        if name is None or not NAME_RE.match(name):
            outcome.tell(member.id, Failed("bad-name"))
            return
        holder = self._by_nick.get(name)
        if holder is member:
            outcome.tell(member.id, Ok("NICK", name))
            return
        if holder is not None or name in self.remote:
            outcome.tell(member.id, Failed("nick-taken"))
            return
        if member.peer:
            self._unpair(member, outcome)
        if member.nick is not None:
            del self._by_nick[member.nick]
            self._awaiting.pop(member.nick, None)
        member.nick = name
        self._by_nick[name] = member
        outcome.changed.add(member.id)
        outcome.tell(member.id, Ok("NICK", name))
        self._pair_if_mutual(member, outcome)

    def _pair(self, member: Member, name, outcome: Outcome) -> None:
        if name is None or not NAME_RE.match(name):
            outcome.tell(member.id, Failed("bad-name"))
            return
        if name == member.nick:
            outcome.tell(member.id, Failed("self-pair"))
            return
        if member.peer is not None and member.peer.nick == name:
            outcome.tell(member.id, Ok("PAIR", name))
            return
        if member.peer:
            self._unpair(member, outcome)
        member.target = name
        outcome.changed.add(member.id)
        outcome.tell(member.id, Ok("PAIR", name))
        self._pair_if_mutual(member, outcome)

    def _msg(self, member: Member, text: str, outcome: Outcome) -> None:
        if not text:
            outcome.tell(member.id, Failed("empty-message"))
            return
        if has_control(text):
            outcome.tell(member.id, Failed("bad-text"))
            return
        peer = member.peer
        if peer is None:
            outcome.tell(member.id, Failed("not-paired"))
            return
        if self.through_stream(peer):
            member.sent += 1
            outcome.changed.add(member.id)
            host = peer.host if isinstance(peer, Remote) else self.durable_host
            outcome.forwards.append(Forward(member.id, host, peer.nick, member.nick, member.incarnation,
                                            member.sent, text))
            return
        peer.received += 1
        outcome.changed.add(peer.id)
        outcome.tell(peer.id, From(member.nick, peer.received, text))

    # -- pairing ------------------------------------------------------------------------
    @staticmethod
    def _count_anew(member: Member) -> None:
        """A pairing began or ended: ``n`` counts from 1 again, except over a session (whose
        client resumes from an ``n`` that must name one message)."""
        if not member.token:
            member.received = 0

    def _mutual_target(self, member: Member) -> Member | Remote | None:
        if member.nick is None or member.target is None:
            return None
        other = self._by_nick.get(member.target) or self.remote.get(member.target)
        if other is None or other is member or other.target != member.nick:
            return None
        return other

    def _pair_if_mutual(self, member: Member, outcome: Outcome) -> None:
        other = self._mutual_target(member)
        if other is None:
            return
        if isinstance(other, Remote):
            if other.peer is not None:
                self._remote_left(other, outcome)
            member.peer, other.peer = other, member
            self._count_anew(member)
            member.remote_paired = True
            outcome.changed.add(member.id)
            outcome.tell(member.id, Paired(other.nick))
            return
        if other.peer:
            self._unpair(other, outcome)
        member.peer, other.peer = other, member
        self._count_anew(member)
        self._count_anew(other)
        outcome.changed.update((member.id, other.id))
        outcome.tell(member.id, Paired(other.nick)).tell(other.id, Paired(member.nick))

    def _unpair(self, member: Member, outcome: Outcome) -> None:
        """Break ``member``'s pairing; only the other side is told (a remote one by its host,
        when the directory shows it what changed here)."""
        other = member.peer
        member.peer = other.peer = None
        self._count_anew(member)
        member.remote_paired = False
        outcome.changed.add(member.id)
        if isinstance(other, Member):
            self._count_anew(other)
            outcome.changed.add(other.id)
            outcome.tell(other.id, Unpaired(member.nick))

