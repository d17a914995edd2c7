"""chatd's connection to NATS JetStream: publishing, delivery in order, nicks and host leases.

Theory of operation
-------------------
chatd runs one single-threaded epoll loop (:class:`fdkeep.loop.Loop`); the
NATS client (nats-py) is asyncio. So :class:`Bus` runs nats-py on **one
daemon thread of its own, with its own asyncio loop**, and the two threads
meet only in a :class:`~chatd.bus.mailbox.Mailbox` (two queues, an eventfd,
two wake-up flags; its docstring says which thread calls what and why no
wake-up is lost). Besides it they share the frozen
:class:`~chatd.bus.state.BusSettings` and the bus thread's
:class:`~chatd.bus.state.Gauges`, which only the bus thread writes:

* chatd's thread calls :meth:`Bus.publish`, :meth:`Bus.claim`,
  :meth:`Bus.update`, :meth:`Bus.release`, :meth:`Bus.take`, and the sessions'
  :meth:`Bus.session_get`, :meth:`Bus.session_put`, :meth:`Bus.replay`. Each posts a command and returns
  at once: it never waits for the network. The bus thread is woken
  (``call_soon_threadsafe``) only if it is not already due to look, so a burst
  of publishes costs one wake-up.
* the bus thread posts results, which make an ``eventfd`` readable
  (:meth:`Bus.fileno`), again only if it is not readable already. chatd's loop
  watches that fd and calls :meth:`Bus.results`, which takes everything
  waiting.

The bus thread imports asyncio and nats-py itself (they take ~100 ms): a chatd
restarting after a crash restores its clients without waiting for them, so
``import chatd.bus`` loads neither. The modules, by thread:

* chatd's thread: :class:`Bus` (here); :mod:`~chatd.bus.results`, the values
  it gives back.
* both: :mod:`~chatd.bus.mailbox`, :mod:`~chatd.bus.state`, and
  :mod:`~chatd.bus.checks`, the pure decisions (names, nick values, whether a
  stream, a bucket or the cursor will do).
* :mod:`~chatd.bus.access`: this host's NATS key and the servers' CA (chatd's
  thread checks the files, the bus thread connects with them).
* the bus thread only: :mod:`~chatd.bus.engine` (the connection, the setup,
  publishing, delivery), :mod:`~chatd.bus.directory` (nicks and leases),
  :mod:`~chatd.bus.sessions` (the sessions bucket, a receiver's messages read again),
  :mod:`~chatd.bus.tasks` (the one retry loop, the per-key lanes).

What the bus thread does with the network:

**The stream and buckets.** On connecting it makes sure of the stream
``CHATD`` (subjects ``chat.>``, file storage, ``replicas``, a 10-minute
duplicate window, messages kept a day) and three KV buckets: nicks (no expiry,
one revision a key), hosts (entries expire after ``host_lease``) and sessions
(entries expire a day after their last write). A stream
or bucket another host made first is accepted as it is if it gives what
matters, and then it **reads each configuration back**: nats-server 2.9
ignores options it does not know without a word, and an exactly-once design
that silently lost its duplicate window, or its replicas, would not be one. A
configuration that does not give what matters is a fatal :class:`BusError`
naming the fix (:mod:`~chatd.bus.checks` says what matters); the bus then does
nothing more.

**Publishing, exactly once and in order.** :meth:`Bus.publish` sends to
``chat.<to_host>.<receiver>`` with the header ``Nats-Msg-Id``: JetStream keeps
one message per id within the duplicate window, so a publish retried (after a
lost ack, a dead server, or chatd's own crash) is stored once and acked as a
*duplicate*. Each attempt waits :data:`~chatd.bus.engine.ACK_TIMEOUT` for the
ack; failures are retried with backoff until acked, whatever happens to the
servers (:func:`~chatd.bus.tasks.retry`, which retries the setup, the watches
and each nick operation too). **At most one publish per subject is in
flight**: if message k failed while k+1 (already sent) was stored, the retried
k would be stored after k+1, and a receiver that drops what is not newer than
what it has seen would lose k. Publishes to different subjects are pipelined,
so the rate comes from many pairs at once. :class:`Published` results come in
call order per subject.

**Delivery in stream order.** Messages for ``chat.>`` (every host's: a session may be
taken over from any host, :mod:`chatd.keeper`; chatd drops unread what is for no member
of its own) come through
nats-py's *ordered consumer*: an ephemeral push consumer, no acks, started at
stream sequence ``cursor + 1`` (from the first message when ``cursor`` is 0),
which checks every message's consumer sequence and, on a gap or when its
heartbeats (every :data:`~chatd.bus.engine.HEARTBEAT` s) stop because the node
holding it died, makes a new consumer from the last stream sequence it
received plus one. On top, the bus drops any message whose stream sequence is
not above the last it delivered, so a repeat can never reach chatd. The cursor
is chatd's: the stream sequence of the last message it committed to its
journal. :class:`Delivered` results are in stream order, gapless for this
host's subjects. If chatd stops taking results, delivery pauses at
:data:`~chatd.bus.engine.DELIVERY_BACKLOG` Delivered results not yet taken
(the mailbox counts them; the consumer's flow control then holds the server
back) instead of growing without end.

**Nicks and leases.** A nick is a key in the nicks bucket whose value is
JSON naming its host (``{"host": ...}``). :meth:`Bus.claim` creates it; if it
exists and names this host (left over from this host's earlier life), a
host whose lease key is gone from the hosts bucket (that host died and its
lease expired), or no host at all (garbage someone wrote over it:
:mod:`~chatd.bus.payloads`), it takes it with a compare-and-set update on the
revision it read; otherwise the claim is refused. A change under a key that is
no nick or host id is ignored, said once per kind. While the bus runs it puts this host's
lease key every ``host_lease / 4`` s, from the moment it is connected (before the stream and
buckets are checked: chatd serves its clients from the start, and a host whose chatd is
restarted again and again, each time in the middle of a slow setup, must not go unleased for
so long that it counts as dead); a put that failed is tried again within
:data:`~chatd.bus.directory.LEASE_RETRY`, not a quarter lease later. Both buckets are watched (all current
values, then every change), giving :class:`NickChanged` and
:class:`HostChanged`. nats-server 2.9 writes no marker when a key expires,
so a host whose lease was not renewed for ``host_lease`` is looked up and,
if gone, reported dead by the bus itself. That look comes a while after the
expiry, and another host may take a nick of the dead host first: so each
:class:`NickChanged` names the hosts whose last lease put was stored a lease or more
before the change was (``lapsing``, in NATS's own times) and whose key a look
finds gone (this host's watch of the leases may be behind), and a nick moving
from one of them is taken for a new member, not a session moved.
Work on one nick runs one at a time, in call order.

**Its own lease, told.** A host cut off from NATS cannot hear that its
lease expired: it works it out. The key expires ``host_lease`` after the
server stored the last put, which is after that put was sent; so once
``host_lease`` less :data:`~chatd.bus.directory.FENCE_MARGIN` has passed
since the last acknowledged put was *sent*, and no later one is acknowledged,
the bus says :class:`LeaseLapsed` (other hosts may take this host's nicks now,
and chatd fences itself: :mod:`chatd.fencing`), and :class:`LeaseRenewed`
when a put is acknowledged again. Before the first put there is no lease to lose.

Closing the bus does not delete the lease: a chatd that stops to be restarted
keeps its clients (and their nicks) through holderd, so only a lease that
expires frees its nicks.

Errors: a call with a bad argument raises :class:`fdkeep.errors.Error` at once,
in chatd's thread; everything that goes wrong on the network comes back as a
:class:`BusError` line for chatd's log (said once, then again at most every
:data:`~chatd.bus.engine.SAY_AGAIN_AFTER` s while it lasts) and is retried.
"""

from __future__ import annotations

import importlib.util
import threading
import time

from fdkeep.errors import Error

from .access import check_files
from .checks import check_token, holder
from .mailbox import Mailbox
from .results import (BusError, Claimed, Connected, Delivered, DirectoryComplete, Disconnected, HostChanged,
                      LeaseLapsed, LeaseRenewed, NickChanged, Published, Released, Replayed, SessionRead,
                      SessionWritten, Updated)
from .state import BusSettings, Gauges

__all__ = ["Bus", "BusError", "Claimed", "Connected", "Delivered", "DirectoryComplete", "Disconnected",
           "HostChanged", "LeaseLapsed", "LeaseRenewed", "NickChanged", "Published", "Released", "Replayed",
           "SessionRead", "SessionWritten", "Updated"]


class Bus:
    """chatd's side: every method returns at once; results come back through :meth:`results`.

    ``servers``: every NATS server's URL (nats-py reconnects across them for ever).
    ``replicas``: the stream's and buckets' replica count, 3 by default with 3 servers or more.
    ``creds``, ``ca``: this host's nkey seed file and the servers' CA (:mod:`chatd.bus.access`).
    """

    def __init__(self, servers: list[str], host_id: str, *, stream: str = "CHATD",
                 nick_bucket: str = "chatd_nicks", host_bucket: str = "chatd_hosts",
                 host_lease: float = 10.0, replicas: int | None = None, creds: str | None = None,
                 ca: str | None = None):
        if importlib.util.find_spec("nats") is None:
            raise Error("unavailable", "nats-py is not installed: pip install 'process-backup[cluster]'")
        if not servers:
            raise Error("bad-config", "no NATS server given: pass at least one nats://host:port")
        check_token("host id", host_id)
        if host_lease <= 0:
            raise Error("bad-config", f"host_lease must be positive, not {host_lease}")
        check_files(creds, ca)
        self.settings = BusSettings(
            servers=tuple(servers), host_id=host_id, stream=stream, nick_bucket=nick_bucket,
            host_bucket=host_bucket, host_lease=float(host_lease),
            replicas=replicas if replicas is not None else (3 if len(servers) >= 3 else 1), creds=creds, ca=ca)
        self._mailbox = Mailbox(backlog_of=Delivered)
        self._gauges = Gauges()  # the bus thread's own from start() on
        self._publishes_requested = 0
        self._thread: threading.Thread | None = None

    @property
    def host_id(self) -> str:
        return self.settings.host_id

    def fileno(self) -> int:
        """The eventfd chatd's loop watches: readable when :meth:`results` has something."""
        return self._mailbox.fileno()

    def start(self, cursor: int | None) -> None:
        """Connect, make sure of the stream and buckets, keep the lease, deliver from ``cursor + 1``
        (None: only what is published from now on; a test's way to show what a host that keeps
        no cursor loses)."""
        if self._mailbox.closed:
            raise Error("closed", "this Bus is closed: make a new one")
        if self._thread is not None:
            raise Error("already-started", "Bus.start was called before: call it once")
        if cursor is not None and cursor < 0:
            raise Error("bad-cursor", f"the cursor is a stream sequence, 0 or more, not {cursor}")
        self._gauges = Gauges(last_delivered=cursor or 0)
        self._thread = threading.Thread(target=_run_bus_thread, args=(self.settings, self._mailbox, self._gauges, cursor),
                                        name=f"chatd-bus-{self.host_id}", daemon=True)
        self._thread.start()

    def publish(self, token, to_host: str, receiver: str, msg_id: str, payload: bytes) -> None:
        """Store ``payload`` for ``receiver`` on ``to_host`` once; :class:`Published` (``token``) when acked."""
        check_token("host id", to_host)
        check_token("receiver", receiver)
        if not msg_id:
            raise Error("bad-msg-id", "a publish needs a Nats-Msg-Id: it is what makes a retry harmless")
        limit = self._gauges.max_payload
        if limit and len(payload) > limit:
            raise Error("too-large", f"a {len(payload)}-byte payload is over the server's max_payload "
                                     f"({limit}): split it, or raise max_payload in nats-server's config")
        self._publishes_requested += 1  # before: the bus thread's count of those done never passes it
        self._command(("publish", token, f"chat.{to_host}.{receiver}", msg_id, bytes(payload)))

    def claim(self, token, nick: str, value: bytes) -> None:
        """Make ``nick`` this host's across the cluster; :class:`Claimed` (``token``).

        ``value`` is JSON with ``"host"`` naming this host: that is how other hosts tell
        whose nick it is, and whether its lease is gone.
        """
        self._check_nick_value(nick, value)
        self._command(("claim", token, nick, bytes(value)))

    def update(self, token, nick: str, value: bytes, revision: int) -> None:
        """Replace our entry for ``nick`` if it is still at ``revision``; :class:`Updated` (``token``)."""
        self._check_nick_value(nick, value)
        self._command(("update", token, nick, bytes(value), revision))

    def release(self, nick: str, revision: int) -> None:
        """Delete our entry for ``nick`` if it is still at ``revision``; :class:`Released`."""
        check_token("nick", nick)
        if not revision or revision < 1:
            raise Error("bad-revision", f"release needs the revision the claim returned, not {revision!r}: "
                                        "a delete without one could delete another host's claim")
        self._command(("release", None, nick, revision))

    def take(self, token, nick: str, value: bytes) -> None:
        """Make ``nick`` this host's whoever holds it (a session this host took over holds it:
        chatd.keeper); :class:`Claimed` (``token``)."""
        self._check_nick_value(nick, value)
        self._command(("take", token, nick, bytes(value)))

    def session_get(self, token, sid: str) -> None:
        """The session's entry in the sessions bucket; :class:`SessionRead` (``token``)."""
        check_token("session id", sid)
        self._command(("session_get", token, sid))

    def session_put(self, token, sid: str, value: bytes, revision: int) -> None:
        """Create the session's entry (``revision`` 0) or replace it if still at ``revision``;
        :class:`SessionWritten` (``token``)."""
        check_token("session id", sid)
        self._command(("session_put", token, sid, bytes(value), int(revision)))

    def replay(self, token, receiver: str, first: int, last: int) -> None:
        """The stream's messages for ``receiver`` (any host's subject) from sequence ``first`` to
        ``last``; :class:`Replayed` (``token``)."""
        check_token("receiver", receiver)
        self._command(("replay", token, receiver, int(first), int(last)))

    def results(self) -> list:
        """Everything that came back since the last call, oldest first (and the eventfd read)."""
        return self._mailbox.take_results()

    def status(self) -> dict:
        gauges = self._gauges
        lease_age = None if gauges.lease_renewed is None else round(time.monotonic() - gauges.lease_renewed, 3)
        return {
            "host_id": self.host_id,
            "servers": list(self.settings.servers),
            "connected": gauges.server,
            "ready": gauges.ready,
            "failed": gauges.failure,
            "publishes_pending": self._publishes_requested - gauges.publishes_done,
            "last_delivered": gauges.last_delivered,
            "lag": gauges.lag,
            "delivered_waiting": self._mailbox.backlog,
            "lease_age": lease_age,
            "hosts_alive": list(gauges.hosts_alive),
            "replicas": self.settings.replicas,
        }

    def close(self) -> None:
        """Stop the bus thread (nothing is drained: what is unacked stays chatd's to redo); idempotent.

        Take :meth:`fileno` off chatd's loop before: the eventfd is closed here.
        """
        if self._mailbox.closed:
            return
        self._mailbox.close()
        if self._thread is not None:
            self._thread.join(10)
        self._mailbox.close_eventfd()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_nick_value(self, nick: str, value: bytes) -> None:
        check_token("nick", nick)
        if holder(value) != self.host_id:
            raise Error("bad-value", f"a nick's value must be a JSON object with \"host\": {self.host_id!r} "
                                     f"(this host), so that other hosts know whose it is; got {bytes(value)[:80]!r}")

    def _command(self, command: tuple) -> None:
        if self._mailbox.closed:
            raise Error("closed", "this Bus is closed: make a new one")
        self._mailbox.post_command(command)


def _run_bus_thread(settings: BusSettings, mailbox: Mailbox, gauges: Gauges, cursor: int | None) -> None:
    from .engine import Engine  # here, on the bus thread: it imports asyncio and nats-py (~100 ms)

    Engine(settings, mailbox, gauges, cursor).run()
