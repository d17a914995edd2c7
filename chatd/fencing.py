"""A host whose lease may have lapsed stops serving the nicks it may have lost.

Theory of operation
-------------------
A host cut off from NATS (a partition: its clients still reach it, NATS does
not) goes on serving while its lease stands: its clients' messages are
handled, counted and kept in their outboxes (bounded journal rings: a full
one holds its sender back), and wait there for the stream; in ``--cluster``
mode even two clients of this host wait, since a message is stored in the
stream before it is delivered (:attr:`chatd.room.Room.durable_host`).

Once its lease may have expired in NATS (the bus works that out alone, since
a host cut off hears nothing: :class:`chatd.bus.LeaseLapsed`), any other host
may take its nicks, and a client that takes one there would be a second
holder of the same nick, counting its own ``k`` and ``n``. So the host
*fences* itself: every client holding a nick is told ``ERR moved <sent>``
(:class:`chatd.room.Moved`: of its messages since its NICK the first
``sent`` were handled and will be delivered; with ``--direct-same-host``,
those to a member of this host are delivered at once and not in that count) and closed, so that it
reconnects through the load balancer to a host that serves. The load
balancer is told too: while fenced, ``/healthz`` answers 503 (its body says
why), so HAProxy takes the host out after its next failed checks and sends
new clients elsewhere; one that lands here before that waits for NATS with
its NICK, as any client does. ``chatctl status`` says ``FENCED``. Nothing of
theirs is counted or delivered here after that.

What those clients had sent and the host had handled is in their outboxes,
not yet published: it goes on to the stream from memory when the host is
back (:meth:`chatd.forwards.Publisher.closed`, the path of any client closed
with forwards not yet acknowledged), once, under the message ids it would
have had; and the receivers' rooms drop any ``k`` they had. Their nicks'
entries are released then, unless another host took them meanwhile (a
compare-and-set on the revision this host had).

Clients without a nick hold nothing another host can take: they stay, and a
NICK they say waits for NATS as always. When the lease is stored again
(:class:`chatd.bus.LeaseRenewed`) the host serves as before; its directory
watch, never stopped, has caught up with what changed meanwhile.
"""

from __future__ import annotations

import logging
import time

from fdkeep.text import plural

from .across import ServedMembers
from .room import Moved, Outcome, Room

log = logging.getLogger("chatd")


class Fence:
    """Whether this host is fenced, and the one act of fencing."""

    def __init__(self, room: Room, members: ServedMembers):
        self.room = room
        self.members = members
        #: monotonic time since when the lease may be gone (None: it stands).
        self.since: float | None = None
        #: Clients told to move, since the host began.
        self.moved = 0

    @property
    def fenced(self) -> bool:
        return self.since is not None

    def why(self, host_id: str) -> str | None:
        """Why this host must get no new clients (its ``/healthz`` says it), or None."""
        if self.since is None:
            return None
        return (f"fenced for {time.monotonic() - self.since:.0f} s: host {host_id}'s lease may have lapsed "
                "(no put of it acknowledged by NATS); its clients go to other hosts")

    def lapsed(self, seconds: float) -> None:
        """The lease may be gone: every client holding a nick is told to move, and closed."""
        if self.since is None:
            self.since = time.monotonic()
        outcome, sessions = Outcome(), []
        for member in list(self.room.members.values()):
            if member.nick is not None and self.members.is_connected(member.id):
                if member.token:
                    sessions.append(member.id)
                else:
                    outcome.tell(member.id, Moved(member.sent))
                    outcome.closes.append(member.id)
        self.moved += len(outcome.closes) + len(sessions)
        log.warning("cluster: no lease put acknowledged for %.1f s: other hosts may take this host's nicks; "
                    "%s told to move (ERR moved) and closed, %s closed to resume where they are served",
                    seconds, plural(len(outcome.closes), "client"), plural(len(sessions), "session"))
        if outcome.closes:
            self.members.apply(outcome)
        for member_id in sessions:
            # Its session waits (chatd.sessions) and is kept in the cluster (chatd.keeper): its client
            # resumes on a host that serves, which takes it over; this one learns so when it is back.
            self.members.close(member_id, "this host was cut off from NATS: its session waits to be resumed")

    def renewed(self) -> None:
        if self.since is not None:
            log.warning("cluster: the lease is stored again after %.1f s: serving as before",
                        time.monotonic() - self.since)
            self.since = None
