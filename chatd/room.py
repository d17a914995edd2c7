"""The chat room: names, pairs and message numbering. Pure logic, no I/O, no wire text.

Theory of operation
-------------------
Every connected client is a :class:`Member` with an id chosen by the server.
A member may take a *nick* and name a *target*. Two members are *paired* when
each one's target is the other's nick; pairing is never stored, only derived,
so a crash can never leave one side paired and the other not.

The room takes one *command* at a time (:meth:`Room.handle`: :class:`Nick`,
:class:`Pair`, :class:`Msg`, :class:`Who`, :class:`Quit`, or :class:`Invalid`
for what a codec could not make sense of) and answers with an :class:`Outcome`:
the *events* to deliver, each addressed to a member id (:class:`Ok`,
:class:`Paired`, :class:`Unpaired`, :class:`From`, :class:`Users`,
:class:`Bye`, :class:`Failed`), the members to close, and the members whose
crash-surviving fields (nick, target, ``received``) ``changed``. The room keeps
no record of what changed between calls: each outcome says it, and the caller
commits it.

Commands and events are protocol-free. A codec per protocol
(:mod:`chatd.protocols`) turns a client's bytes into commands and events into
its bytes, so a line client and a browser chat in the same room.

The rules:

- ``Nick(name)`` → ``Ok("NICK", name)``; ``Failed("nick-taken")``, ``Failed("bad-name")``
- ``Pair(name)`` → ``Ok("PAIR", name)``, then ``Paired`` to both once mutual;
  the peer of a pairing this replaces gets ``Unpaired``
- ``Msg(text)`` → the peer gets ``From(sender, n, text)``, ``n`` counting from 1
  what this receiver got on this pairing; ``Failed("not-paired")``;
  ``Failed("bad-text")`` for text with control characters (tab aside): they
  could garble a peer's terminal, and no protocol here needs them
- ``Who()`` → ``Users``: every named member and its peer (the first :data:`MAX_USERS`)
- ``Quit()`` → ``Bye``, then the member is closed; its peer gets ``Unpaired``
- ``Invalid(code)`` → ``Failed(code)``
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
class Quit:
    pass


@dataclass(frozen=True)
class Invalid:
    """What a codec could not turn into a command; ``code`` names why (``unknown-command``…)."""

    code: str


Command = Nick | Pair | Msg | Who | Quit | Invalid


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
class Bye:
    pass


@dataclass(frozen=True)
class Failed:
    code: str


Event = Ok | Paired | Unpaired | From | Users | Bye | Failed


@dataclass
class Member:
    id: int
    protocol: str = "line"
    nick: str | None = None
    target: str | None = None
    #: Messages received on the current pairing; the n of the next From is this + 1.
    received: int = 0
    peer: "Member | None" = None


@dataclass
class Outcome:
    """What one call changed: events to deliver in order, members to close, members changed."""

    deliveries: list[tuple[int, Event]] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    changed: set[int] = field(default_factory=set)

    def tell(self, member_id: int, event: Event) -> "Outcome":
        self.deliveries.append((member_id, event))
        return self

    def merge(self, other: "Outcome") -> None:
        self.deliveries += other.deliveries
        self.closes += other.closes
        self.changed |= other.changed


class Room:
    def __init__(self):
        self.members: dict[int, Member] = {}
        self._by_nick: dict[str, Member] = {}

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
        for member in members:
            if member.peer is None:
                peer = self._mutual_target(member)
                if peer is not None:
                    member.peer, peer.peer = peer, member

    def leave(self, member_id: int) -> Outcome:
        outcome = Outcome()
        member = self.members.pop(member_id, None)
        if member is None:
            return outcome
        if member.peer:
            self._unpair(member, outcome)
        if member.nick is not None:
            del self._by_nick[member.nick]
        outcome.changed.discard(member_id)
        return outcome

    def pairs(self) -> list[tuple[Member, Member]]:
        return [(m, m.peer) for m in self.members.values() if m.peer is not None and m.id < m.peer.id]

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
        elif isinstance(command, Quit):
            outcome.tell(member.id, Bye()).closes.append(member.id)
        elif isinstance(command, Invalid):
            outcome.tell(member.id, Failed(command.code))
        else:
            raise TypeError(f"not a command: {command!r}")
        return outcome

    def users(self) -> Users:
        named = (m for m in self.members.values() if m.nick is not None)
        return Users(tuple((m.nick, m.peer.nick if m.peer else None) for m, _ in zip(named, range(MAX_USERS))))

    def _nick(self, member: Member, name, outcome: Outcome) -> None:
        if name is None or not NAME_RE.match(name):
            outcome.tell(member.id, Failed("bad-name"))
            return
        holder = self._by_nick.get(name)
        if holder is member:
            outcome.tell(member.id, Ok("NICK", name))
            return
        if holder is not None:
            outcome.tell(member.id, Failed("nick-taken"))
            return
        if member.peer:
            self._unpair(member, outcome)
        if member.nick is not None:
            del self._by_nick[member.nick]
        member.nick = name
        self._by_nick[name] = member
        outcome.changed.add(member.id)
        outcome.tell(member.id, Ok("NICK", name))
        self._pair_if_mutual(member, outcome)

    def _pair(self, member: Member, name, outcome: Outcome) -> None:
        if name is None or not NAME_RE.match(name):
            outcome.tell(member.id, Failed("bad-name"))
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
        if CONTROL.search(text):
            outcome.tell(member.id, Failed("bad-text"))
            return
        peer = member.peer
        if peer is None:
            outcome.tell(member.id, Failed("not-paired"))
            return
        peer.received += 1
        outcome.changed.add(peer.id)
        outcome.tell(peer.id, From(member.nick, peer.received, text))

    # -- pairing ------------------------------------------------------------------------
    def _mutual_target(self, member: Member) -> Member | None:
        if member.nick is None or member.target is None:
            return None
        other = self._by_nick.get(member.target)
        if other is None or other is member or other.target != member.nick:
            return None
        return other

    def _pair_if_mutual(self, member: Member, outcome: Outcome) -> None:
        other = self._mutual_target(member)
        if other is None:
            return
        if other.peer:
            self._unpair(other, outcome)
        member.peer, other.peer = other, member
        member.received = other.received = 0
        outcome.changed.update((member.id, other.id))
        outcome.tell(member.id, Paired(other.nick)).tell(other.id, Paired(member.nick))

    def _unpair(self, member: Member, outcome: Outcome) -> None:
        """Break ``member``'s pairing; only the other side is told."""
        other = member.peer
        member.peer = other.peer = None
        member.received = other.received = 0
        outcome.changed.update((member.id, other.id))
        outcome.tell(other.id, Unpaired(member.nick))
