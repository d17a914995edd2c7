"""Where the server's work meets other chatd hosts': one declared interface each way.

Theory of operation
-------------------
The server knows of other hosts only through :class:`AcrossHosts`, its attribute
``cluster``, always set. Its hooks sit where a command, a commit or a member's
end may concern another host: before a command is handled (a NICK waits for
the directory, :meth:`~AcrossHosts.parks`; a member restored paired across
hosts waits for it, :meth:`~AcrossHosts.holds_back`), when a message goes to a
member of another host (:meth:`~AcrossHosts.has_room`,
:meth:`~AcrossHosts.forward`), at a commit (the stream :attr:`~AcrossHosts.cursor`
it carries, then :meth:`~AcrossHosts.committed`), when a member leaves or is
closed, and when a member's output ring has room again (:meth:`~AcrossHosts.wake`).

On one host every hook answers "nothing to do": :class:`SingleHost`. Across
hosts (``--cluster``) it is :class:`chatd.cluster.Cluster`, which in turn asks
the server only what :class:`ServedMembers` declares: whether a member is
connected, its outbox of forwards, room in its output ring, and to carry out
an outcome, take a member's commands again, or close it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .connection import Connection
    from .journal import Journal
    from .rings import Outbox
    from .room import Command, Forward, Member, Outcome

log = logging.getLogger("chatd")


class AcrossHosts(Protocol):
    """What the server asks of the other hosts (see the module's docstring)."""

    #: Whether clients may have sessions (chatd.sessions).
    keeps_sessions: bool

    @property
    def cursor(self) -> int | None:
        """The stream sequence up to which every message for this host is handled, for the
        journal to commit with what handling them changed (None: the journal's stays)."""

    def start(self, journal: "Journal") -> None:
        """Once serving: join the other hosts, going on from what ``journal`` keeps."""

    def holds_back(self, connection: "Connection") -> bool:
        """Whether the client's commands wait (it is parked) until the other hosts are known."""

    def parks(self, connection: "Connection", end: int, command: "Command") -> bool:
        """Whether ``command`` (its input ends at ``end``) waits for the other hosts' answer;
        the client is parked then, and resumed through :meth:`ServedMembers.resume_parked`."""

    def has_room(self, connection: "Connection", member: "Member") -> bool:
        """Whether a message of ``member``, paired with a member of another host, can go now."""

    def forward(self, forward: "Forward") -> None:
        """A message for a member of another host (in the commit under way)."""

    def committed(self, connections: list["Connection"]) -> None:
        """These connections' records were just committed."""

    def nick_left(self, nick: str) -> None:
        """A member with ``nick`` left the room."""

    def closed(self, connection: "Connection") -> None:
        """A client is closed."""

    def session_moved(self, old_id: int, old_outbox: "Outbox | None", connection: "Connection") -> None:
        """A session went on from member ``old_id`` to ``connection`` (its old slot is freed in
        this commit): what its old outbox had not seen acknowledged goes on from the new one."""

    def session_ended(self, hashed: bytes) -> None:
        """The session whose token hashes to ``hashed`` ended here (QUIT, or its grace ran out)."""

    def wake(self, nick: str | None) -> None:
        """The output ring of the member with ``nick`` has room again."""

    def unhealthy(self) -> str | None:
        """Why a load balancer should send this host no new clients (its ``/healthz`` answers
        503 with it), or None while it serves."""

    def status(self) -> dict | None:
        """What ``chatctl status`` shows of it (None on one host)."""

    def close(self) -> None:
        """chatd stops."""


class SingleHost:
    """One chatd host alone: no other host to wait for, tell or hear from."""

    cursor = None
    keeps_sessions = True

    def start(self, journal: "Journal") -> None:
        pass

    def holds_back(self, connection: "Connection") -> bool:
        return False

    def parks(self, connection: "Connection", end: int, command: "Command") -> bool:
        return False

    def has_room(self, connection: "Connection", member: "Member") -> bool:
        return True

    def forward(self, forward: "Forward") -> None:
        # The room forwards only to members the directory showed it, and there is none here.
        log.error("member %d: a message for %s on host %s, but this chatd is a single host: dropped (a bug)",
                  forward.sender, forward.receiver, forward.host)

    def committed(self, connections: list["Connection"]) -> None:
        pass

    def nick_left(self, nick: str) -> None:
        pass

    def closed(self, connection: "Connection") -> None:
        pass

    def session_moved(self, old_id: int, old_outbox: "Outbox | None", connection: "Connection") -> None:
        pass

    def session_ended(self, hashed: bytes) -> None:
        pass

    def wake(self, nick: str | None) -> None:
        pass

    def unhealthy(self) -> None:
        return None

    def status(self) -> None:
        return None

    def close(self) -> None:
        pass


class ServedMembers(Protocol):
    """What the other hosts' side asks of the server, by member id."""

    def is_connected(self, member_id: int) -> bool:
        """Whether the member's client is still served here."""

    def holds(self, member_id: int) -> bool:
        """Whether the member is served here: its client is connected, or its session is
        detached and waits for it (chatd.sessions), nick and all."""

    def connected_ids(self) -> list[int]:
        """Every member whose client is served here."""

    def outbox(self, member_id: int) -> "Outbox | None":
        """The member's outbox of forwards (None: not connected)."""

    def detached_outboxes(self) -> "list[tuple[int, Outbox]]":
        """The outboxes of detached sessions (chatd.sessions), by member id: what a restore
        found in them was handled and must still be published."""

    def output_has_room(self, member_id: int) -> bool:
        """Whether the member's output ring (its connection's, or its detached session's) can
        take another event; True for a member with neither."""

    def apply(self, outcome: "Outcome") -> None:
        """Carry out what the room decided (events, records to commit, closes, forwards)."""

    def resume_parked(self, member_id: int, end: int, outcome: "Outcome") -> None:
        """The member's parked command, which ends at input offset ``end``, came to ``outcome``:
        carry it out and take its next commands."""

    def answer_parked(self, member_id: int, end: int, command, started=None) -> None:
        """Answer the member's parked session command (chatd.sessions carries it out; ``started``:
        the token and hash a SESSION is to have) and take its next commands."""

    def resume_taken_over(self, member_id: int, end: int, outcome: "Outcome") -> None:
        """The member's parked RESUME took over a session held elsewhere (chatd.keeper): its
        output is kept from now on, as a session's, and ``outcome`` carried out."""

    def admit_resume(self) -> int:
        """0 if a resume may go now (it is counted), else the seconds its client is to wait."""

    def moved(self, member_id: int, why: str, host: str | None = None) -> None:
        """The member's session (or nick) is another host's now (``host``, if known): its client
        is told ``ERR moved`` and closed, and it leaves this host's room (a member of ``host``
        from then on)."""

    def resume(self, member_id: int) -> None:
        """Take the member's commands again (they were held back)."""

    def outbox_freed(self, member_id: int) -> None:
        """Forwards of the member left its outbox: commit its record, and take its commands
        if they waited for that room."""

    def close(self, member_id: int, reason: str) -> None:
        """Close the member's client on purpose, saying why in the log."""
