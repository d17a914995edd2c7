"""The chat room: names, pairs and message numbering. Pure logic, no I/O.

Theory of operation
-------------------
Every connected client is a :class:`Member` with an id chosen by the server.
A member may take a *nick* and name a *target*. Two members are *paired* when
each one's target is the other's nick; pairing is never stored, only derived,
so a crash can never leave one side paired and the other not.

The room takes one command at a time (:meth:`Room.handle`) and answers with
:class:`Send` and :class:`Close` actions addressed to member ids, which the
server turns into bytes on the right connections. Whatever must survive a
crash (nick, target, messages received on the current pairing) lives in the
member; the room marks every member whose persistent fields changed in
:attr:`Room.changed` and every member whose pairing changed in
:attr:`Room.repaired`, and the server drains both after each command.

Protocol (each reply is one line):

- ``NICK <name>`` → ``OK NICK <name>``; ``ERR nick-taken``; ``ERR bad-name``
- ``PAIR <name>`` → ``OK PAIR <name>``, then ``PAIRED <peer>`` to both once mutual;
  the peer of a pairing this replaces gets ``UNPAIRED <name>``
- ``MSG <text>`` → the peer gets ``FROM <sender> <n> <text>``; ``ERR not-paired``
- ``WHO`` → ``USER <name> <peer-or-->`` per named member, then ``END``
- ``QUIT`` → ``BYE``, then the connection is closed; the peer gets ``UNPAIRED <name>``
- anything else → ``ERR unknown-command``
"""

from __future__ import annotations

from dataclasses import dataclass

from .lines import LINE_TOO_LONG, NAME_RE, BadEncoding, parse_command


@dataclass
class Member:
    id: int
    protocol: str = "line"
    nick: str | None = None
    target: str | None = None
    #: Messages received on the current pairing; the n of the next FROM is this + 1.
    received: int = 0
    peer: "Member | None" = None


@dataclass(frozen=True)
class Send:
    member_id: int
    text: str


@dataclass(frozen=True)
class Close:
    member_id: int


class Room:
    def __init__(self):
        self.members: dict[int, Member] = {}
        self._by_nick: dict[str, Member] = {}
        self.changed: set[int] = set()
        self.repaired: set[int] = set()

    # -- membership ---------------------------------------------------------------------
    def join(self, member_id: int, protocol: str = "line") -> Member:
        member = Member(member_id, protocol)
        self.members[member_id] = member
        self.changed.add(member_id)
        return member

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

    def leave(self, member_id: int) -> list:
        member = self.members.pop(member_id, None)
        if member is None:
            return []
        actions = self._unpair(member) if member.peer else []
        if member.nick is not None:
            del self._by_nick[member.nick]
        self.changed.discard(member_id)
        self.repaired.discard(member_id)
        return actions

    def pairs(self) -> list[tuple[Member, Member]]:
        return [(m, m.peer) for m in self.members.values() if m.peer is not None and m.id < m.peer.id]

    # -- commands -----------------------------------------------------------------------
    def handle(self, member_id: int, line) -> list:
        """Actions for one framed line (bytes, or LINE_TOO_LONG) from a member."""
        member = self.members[member_id]
        if line is LINE_TOO_LONG:
            return [Send(member_id, "ERR line-too-long")]
        try:
            command = parse_command(line)
        except BadEncoding:
            return [Send(member_id, "ERR bad-encoding")]
        handler = getattr(self, "_cmd_" + command.verb.lower(), None) if command.verb.isalpha() else None
        if handler is None:
            return [Send(member_id, "ERR unknown-command")]
        return handler(member, command.argument)

    def _cmd_nick(self, member: Member, name) -> list:
        if name is None or not NAME_RE.match(name):
            return [Send(member.id, "ERR bad-name")]
        holder = self._by_nick.get(name)
        if holder is member:
            return [Send(member.id, f"OK NICK {name}")]
        if holder is not None:
            return [Send(member.id, "ERR nick-taken")]
        actions = self._unpair(member) if member.peer else []
        if member.nick is not None:
            del self._by_nick[member.nick]
        member.nick = name
        self._by_nick[name] = member
        self.changed.add(member.id)
        self.repaired.add(member.id)
        actions.append(Send(member.id, f"OK NICK {name}"))
        return actions + self._pair_if_mutual(member)

    def _cmd_pair(self, member: Member, name) -> list:
        if name is None or not NAME_RE.match(name):
            return [Send(member.id, "ERR bad-name")]
        if member.peer is not None and member.peer.nick == name:
            return [Send(member.id, f"OK PAIR {name}")]
        actions = self._unpair(member) if member.peer else []
        member.target = name
        self.changed.add(member.id)
        self.repaired.add(member.id)
        actions.append(Send(member.id, f"OK PAIR {name}"))
        return actions + self._pair_if_mutual(member)

    def _cmd_msg(self, member: Member, text) -> list:
        peer = member.peer
        if peer is None:
            return [Send(member.id, "ERR not-paired")]
        peer.received += 1
        self.changed.add(peer.id)
        return [Send(peer.id, f"FROM {member.nick} {peer.received} {text or ''}")]

    def _cmd_who(self, member: Member, argument) -> list:
        actions = [
            Send(member.id, f"USER {m.nick} {m.peer.nick if m.peer else '-'}")
            for m in self.members.values()
            if m.nick is not None
        ]
        return actions + [Send(member.id, "END")]

    def _cmd_quit(self, member: Member, argument) -> list:
        return [Send(member.id, "BYE"), Close(member.id)]

    # -- pairing ------------------------------------------------------------------------
    def _mutual_target(self, member: Member) -> Member | None:
        if member.nick is None or member.target is None:
            return None
        other = self._by_nick.get(member.target)
        if other is None or other is member or other.target != member.nick:
            return None
        return other

    def _pair_if_mutual(self, member: Member) -> list:
        other = self._mutual_target(member)
        if other is None:
            return []
        actions = self._unpair(other) if other.peer else []
        member.peer, other.peer = other, member
        member.received = other.received = 0
        self.changed.update((member.id, other.id))
        self.repaired.update((member.id, other.id))
        return actions + [Send(member.id, f"PAIRED {other.nick}"), Send(other.id, f"PAIRED {member.nick}")]

    def _unpair(self, member: Member) -> list:
        """Break ``member``'s pairing; only the other side is told."""
        other = member.peer
        member.peer = other.peer = None
        member.received = other.received = 0
        self.changed.update((member.id, other.id))
        self.repaired.update((member.id, other.id))
        return [Send(other.id, f"UNPAIRED {member.nick}")]
