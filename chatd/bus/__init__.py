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
  :meth:`Bus.update`, :meth:`Bus.release`. Each posts a command and returns
  at once: it never waits for the network. The bus thread is woken
  (``call_soon_threadsafe``) only if it is not already due to look, so a burst
  of publishes costs one wake-up.
* the bus thread posts results, which make an ``eventfd`` readable
  (:meth:`Bus.fileno`), again only if it is not readable already. chatd's loop
  watches that fd and calls :meth:`Bus.results`, which takes everything
  waiting.


What the bus thread does with the network:

**The stream and buckets.** On connecting it makes sure of the stream
``CHATD`` (subjects ``chat.>``, file storage, ``replicas``, a 10-minute
duplicate window, messages kept a day) and two KV buckets: nicks (no expiry,
one revision a key) and hosts (entries expire after ``host_lease``). A stream
or bucket another host made first is accepted as it is if it gives what
matters, and then it **reads each configuration back**: nats-server 2.9
ignores options it does not know without a word, and an exactly-once design
that silently lost its duplicate window, or its replicas, would not be one. A
configuration that does not give what matters is a fatal :class:`BusError`
naming the fix; the bus then does nothing more.

**Publishing, exactly once and in order.** :meth:`Bus.publish` sends to
``chat.<to_host>.<receiver>`` with the header ``Nats-Msg-Id``: JetStream keeps
one message per id within the duplicate window, so a publish retried (after a
lost ack, a dead server, or chatd's own crash) is stored once and acked as a
*duplicate*. Each attempt waits :data:`ACK_TIMEOUT` for the ack; failures are
retried with backoff until acked, whatever happens to the servers. **At most
one publish per subject is in flight**: if message k failed while k+1 (already
sent) was stored, the retried k would be stored after k+1, and a receiver that
drops what is not newer than what it has seen would lose k. Publishes to
different subjects are pipelined, so the rate comes from many pairs at once.
:class:`Published` results come in call order per subject.

**Delivery in stream order.** Messages for ``chat.<host_id>.>`` come through
nats-py's *ordered consumer*: an ephemeral push consumer, no acks, started at
stream sequence ``cursor + 1`` (from the first message when ``cursor`` is 0),
which checks every message's consumer sequence and, on a gap or when its
heartbeats (every :data:`HEARTBEAT` s) stop because the node holding it died,
makes a new consumer from the last stream sequence it received plus one. On
top, the bus drops any message whose stream sequence is not above the last it
delivered, so a repeat can never reach chatd. The cursor is chatd's: the
stream sequence of the last message it committed to its journal.
:class:`Delivered` results are in stream order, gapless for this host's
subjects. If chatd stops taking results, delivery pauses at
:data:`DELIVERY_BACKLOG` waiting results (the consumer's flow control then
holds the server back) instead of growing without end.

**Nicks and leases.** A nick is a key in the nicks bucket whose value is
JSON naming its host (``{"host": ...}``). :meth:`Bus.claim` creates it; if it
exists and names this host (left over from this host's earlier life) or a
host whose lease key is gone from the hosts bucket (that host died and its
lease expired), it takes it with a compare-and-set update on the revision it
read; otherwise the claim is refused. While the bus runs it puts this host's
lease key every ``host_lease / 4`` s. Both buckets are watched (all current
values, then every change), giving :class:`NickChanged` and
:class:`HostChanged`. nats-server 2.9 writes no marker when a key expires,
so a host whose lease was not renewed for ``host_lease`` is looked up and,
if gone, reported dead by the bus itself. Work on one nick runs one at a time,
in call order.

Closing the bus does not delete the lease: a chatd that stops to be restarted
keeps its clients (and their nicks) through holderd, so only a lease that
expires frees its nicks.

Errors: a call with a bad argument raises :class:`fdkeep.errors.Error` at once,
in chatd's thread; everything that goes wrong on the network comes back as a
:class:`BusError` line for chatd's log (said once, then again at most every
:data:`SAY_AGAIN_AFTER` s while it lasts) and is retried.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Hashable

from fdkeep.errors import Error

from .mailbox import Mailbox
from .state import BusSettings, Gauges


# asyncio and nats-py take ~100 ms to import: the bus thread imports them (_load_client),
# so that a chatd restarting after a crash restores its clients without waiting for them.
asyncio = nats = js_api = None


def _load_client() -> None:
    global asyncio, nats, js_api
    import asyncio
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api as js_api

#: Seconds one publish attempt waits for JetStream's ack before it is sent again.
ACK_TIMEOUT = 2.0
#: Backoff between retries: from the first to the longest, doubling.
RETRY_FIRST, RETRY_LONGEST = 0.05, 1.0
#: The ordered consumers' idle heartbeat: a consumer whose node died is remade after two missed.
HEARTBEAT = 1.0
#: What the stream keeps: one message per Nats-Msg-Id for this long, every message this long.
DUPLICATE_WINDOW = 600.0
MAX_AGE = 86400.0
#: Delivery pauses while this many Delivered results wait for chatd to take them.
DELIVERY_BACKLOG = 10_000
#: A BusError that goes on is said again at most this often.
SAY_AGAIN_AFTER = 30.0
#: JetStream's error code for "wrong last sequence" (a compare-and-set that lost).
WRONG_LAST_SEQUENCE = (10071, 10164)

NAME_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# -- results ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Published:
    """The publish ``token`` was stored at stream sequence ``seq`` (``duplicate``: stored before)."""
    token: Any
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    """``ok``: the nick is this host's now, at ``revision``. Else ``holder`` (a host id, None if
    unreadable) has it, at ``revision``."""
    token: Any
    nick: str
    ok: bool
    revision: int | None
    holder: str | None


@dataclass(frozen=True, slots=True)
class Updated:
    """``ok``: the new value is stored at ``revision``; else the revision given was not the last."""
    token: Any
    nick: str
    ok: bool
    revision: int | None


@dataclass(frozen=True, slots=True)
class Released:
    """``ok``: the nick's entry is deleted; else the revision given was not the last (not deleted)."""
    nick: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message for this host, at stream sequence ``seq`` (the cursor to journal once it is committed)."""
    seq: int
    subject: str
    headers: dict
    payload: bytes


@dataclass(frozen=True, slots=True)
class NickChanged:
    """The nicks bucket changed: ``value`` None when the nick was released."""
    nick: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class HostChanged:
    """A host's lease appeared (``alive``) or was deleted or expired."""
    host_id: str
    alive: bool


@dataclass(frozen=True, slots=True)
class DirectoryComplete:
    """Every nick and host lease that existed when the bus connected has come (as
    :class:`NickChanged` and :class:`HostChanged`): what is not known now does not exist.
    Comes once."""


@dataclass(frozen=True, slots=True)
class BusError:
    """A line for chatd's log. ``fatal``: the bus stopped working and will not recover by itself."""
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Connected:
    server: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


def _check_token(what: str, value: str) -> None:
    if not isinstance(value, str) or not NAME_TOKEN.match(value):
        raise Error("bad-name", f"{what} {value!r} cannot be part of a NATS subject or key: "
                                "use 1 to 64 of A-Z a-z 0-9 _ -")


class Bus:
    """chatd's side: every method returns at once; results come back through :meth:`results`.

    ``servers``: every NATS server's URL (nats-py reconnects across them for ever).
    ``replicas``: the stream's and buckets' replica count, 3 by default with 3 servers or more.
    """

    def __init__(self, servers: list[str], host_id: str, *, stream: str = "CHATD",
                 nick_bucket: str = "chatd_nicks", host_bucket: str = "chatd_hosts",
                 host_lease: float = 10.0, replicas: int | None = None):
        if importlib.util.find_spec("nats") is None:
            raise Error("unavailable", "nats-py is not installed: pip install 'process-backup[cluster]'")
        if not servers:
            raise Error("bad-config", "no NATS server given: pass at least one nats://host:port")
        _check_token("host id", host_id)
        if host_lease <= 0:
            raise Error("bad-config", f"host_lease must be positive, not {host_lease}")
        self.settings = BusSettings(
            servers=tuple(servers), host_id=host_id, stream=stream, nick_bucket=nick_bucket,
            host_bucket=host_bucket, host_lease=float(host_lease),
            replicas=replicas if replicas is not None else (3 if len(servers) >= 3 else 1))
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
        _check_token("host id", to_host)
        _check_token("receiver", receiver)
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
        _check_token("nick", nick)
        if not revision or revision < 1:
            raise Error("bad-revision", f"release needs the revision the claim returned, not {revision!r}: "
                                        "a delete without one could delete another host's claim")
        self._command(("release", None, nick, revision))

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
        _check_token("nick", nick)
        if _holder(value) != self.host_id:
            raise Error("bad-value", f"a nick's value must be a JSON object with \"host\": {self.host_id!r} "
                                     f"(this host), so that other hosts know whose it is; got {bytes(value)[:80]!r}")

    def _command(self, command: tuple) -> None:
        if self._mailbox.closed:
            raise Error("closed", "this Bus is closed: make a new one")
        self._mailbox.post_command(command)


def _run_bus_thread(settings: BusSettings, mailbox: Mailbox, gauges: Gauges, cursor: int | None) -> None:
    _load_client()
    _Engine(settings, mailbox, gauges, cursor).run()

class _Lanes:
    """Work that runs one job at a time per key (a subject, a nick), any number of keys at once."""

    def __init__(self, engine: "_Engine", run: Callable[[tuple], Awaitable[None]]):
        self._engine = engine
        self._run = run
        self._queues: dict[Hashable, deque] = {}

    def add(self, key: Hashable, job: tuple) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque([job])
        self._engine.spawn(self._drain(key))

    async def _drain(self, key: Hashable) -> None:
        queue = self._queues[key]
        while queue:
            await self._run(queue[0])
            queue.popleft()
        del self._queues[key]  # no await since the last check: nothing was added meanwhile


class _Engine:
    """Everything on the bus thread, made there. It meets chatd's thread only through ``mailbox``
    and ``gauges`` (which it alone writes): see :mod:`chatd.bus.mailbox` and :mod:`chatd.bus.state`."""

    def __init__(self, settings: BusSettings, mailbox: Mailbox, gauges: Gauges, cursor: int | None):
        self.settings = settings
        self.mailbox = mailbox
        self.gauges = gauges  # its last_delivered is the cursor: Bus.start made it so
        self.only_new = cursor is None
        self.loop = None
        self.nc = None
        self.js = None
        self.hosts_alive: dict[str, bool] = {}
        self._host_seen: dict[str, float] = {}
        self._nick_revision: dict[str, int] = {}
        #: The buckets whose first values have not all come yet (DirectoryComplete when none).
        self._catching_up = {"nicks", "hosts"}
        self._said: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._publishes = _Lanes(self, self._publish)
        self._nick_work = _Lanes(self, self._nick_job)
        self.nicks = None
        self.hosts = None

    # -- the thread --------------------------------------------------------------------
    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self._ready = asyncio.Event()
        #: Set once this host's lease is first stored: no claim is made before, since until then
        #: another host would take this host for a dead one and its nicks for free.
        self._leased = asyncio.Event()
        self._stopping = asyncio.Event()
        # From here on chatd's thread may wake this one.
        if not self.mailbox.open(lambda: self.loop.call_soon_threadsafe(self.take_commands)):
            self.loop.close()
            return
        try:
            self.loop.run_until_complete(self._main())
        finally:
            try:
                # nats-py leaves tasks of its own (an ordered consumer's heartbeat check …): end them too.
                leftover = asyncio.all_tasks(self.loop)
                for task in leftover:
                    task.cancel()
                self.loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()

    def spawn(self, coroutine) -> asyncio.Task:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.say("bug", f"the bus thread's task {task.get_coro().__name__} failed: {type(exc).__name__}: {exc}")

    async def _main(self) -> None:
        self.take_commands()  # what chatd asked before the thread ran
        self.spawn(self._connect_and_serve())
        await self._stopping.wait()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.nc is not None:
            try:
                await asyncio.wait_for(self.nc.close(), 2)
            except (Exception, asyncio.CancelledError):
                pass

    def put(self, result) -> None:
        self.mailbox.post_result(result)

    def say(self, code: str, message: str, fatal: bool = False) -> None:
        """A BusError, unless the same was said less than SAY_AGAIN_AFTER ago."""
        now = time.monotonic()
        key = f"{code}:{message}"
        if not fatal and now - self._said.get(key, -SAY_AGAIN_AFTER) < SAY_AGAIN_AFTER:
            return
        self._said[key] = now
        self.put(BusError(code, message, fatal))

    def fail(self, code: str, message: str) -> None:
        """A fatal error: say it, and do no more work."""
        self.gauges.failure = message
        self.say(code, message, fatal=True)
        self.gauges.ready = False

    # -- commands from chatd -----------------------------------------------------------
    def take_commands(self) -> None:
        for command in self.mailbox.take_commands():
            if command[0] == "publish":
                self._publishes.add(command[2], command)
            else:
                self._nick_work.add(command[2], command)
        if self.mailbox.closed:
            self._stopping.set()

    # -- connecting and the setup ------------------------------------------------------
    async def _connect_and_serve(self) -> None:
        settings = self.settings
        self.nc = await nats.connect(
            list(settings.servers),

            name=f"chatd {settings.host_id}",
            max_reconnect_attempts=-1,  # for ever, across every server, the first connect too
            reconnect_time_wait=0.5,
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=2,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        self.gauges.server = self._url()
        self.gauges.max_payload = self.nc.max_payload
        self.put(Connected(self.gauges.server))
        self.js = self.nc.jetstream(timeout=3)
        if not await self._retry("setup", self._setup):
            return
        self.gauges.ready = True
        self._ready.set()
        self.spawn(self._keep_lease())
        self.spawn(self._watch_hosts_expiring())
        self.spawn(self._retry("delivery", self._start_delivery))
        self.spawn(self._retry("nick watch", self._watch_nicks))
        self.spawn(self._retry("host watch", self._watch_hosts))

    async def _retry(self, what: str, attempt: Callable[[], Awaitable[bool | None]]) -> bool:
        """Call ``attempt`` until it returns without raising; False if it failed fatally (returned False)."""
        delay = RETRY_FIRST
        while True:
            try:
                return await attempt() is not False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.say("retrying", f"{what} failed, retrying: {_describe(exc)}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_LONGEST)

    async def _setup(self) -> bool:
        settings = self.settings
        want = js_api.StreamConfig(
            name=settings.stream, subjects=["chat.>"], storage=js_api.StorageType.FILE, num_replicas=settings.replicas,
            retention=js_api.RetentionPolicy.LIMITS, duplicate_window=DUPLICATE_WINDOW, max_age=MAX_AGE,
            discard=js_api.DiscardPolicy.OLD,
        )
        info = await self._ensure_stream(want)
        config = info.config
        problems = []
        if "chat.>" not in (config.subjects or []):
            problems.append(f"its subjects are {config.subjects}, not chat.>")
        if (config.duplicate_window or 0) < DUPLICATE_WINDOW:
            problems.append(f"its duplicate window is {config.duplicate_window or 0:.0f} s, under "
                            f"{DUPLICATE_WINDOW:.0f} s (a publish retried later would be stored twice)")
        if (config.num_replicas or 1) < settings.replicas:
            problems.append(f"it has {config.num_replicas} replica(s), not {settings.replicas} "
                            "(an acked message could be lost with one node)")
        if config.storage != js_api.StorageType.FILE:
            problems.append(f"its storage is {config.storage}, not file")
        if problems:
            self.fail("bad-stream", f"stream {settings.stream} will not do: {'; '.join(problems)}. Fix: remove the "
                                    f"stream (every host must agree on its settings) and start chatd again")
            return False
        if self.gauges.last_delivered > info.state.last_seq:
            self.fail("cursor-ahead", f"this host's journal has read stream {settings.stream} up to sequence "
                                      f"{self.gauges.last_delivered}, but the stream ends at {info.state.last_seq}: "
                                      "it was made anew, and delivering from the old cursor would skip messages. "
                                      "Fix: start chatd with a fresh journal (its cursor at 0)")
            return False
        if self.gauges.last_delivered and info.state.first_seq > self.gauges.last_delivered + 1 and info.state.messages:
            self.say("messages-expired", f"stream {settings.stream} starts at sequence {info.state.first_seq}: messages "
                                         f"{self.gauges.last_delivered + 1} to {info.state.first_seq - 1} expired (max "
                                         f"age {config.max_age or 0:.0f} s) before this host read them")
        self.nicks = await self._ensure_bucket(settings.nick_bucket, ttl=None)
        self.hosts = await self._ensure_bucket(settings.host_bucket, ttl=settings.host_lease)
        return self.nicks is not None and self.hosts is not None

    async def _ensure_stream(self, want):
        try:
            return await self.js.stream_info(want.name)
        except nats.js.errors.NotFoundError:
            pass
        try:
            return await self.js.add_stream(want)
        except nats.js.errors.BadRequestError:
            return await self.js.stream_info(want.name)  # another host made it meanwhile: judge it below

    async def _ensure_bucket(self, bucket: str, ttl: float | None):
        settings = self.settings
        try:
            kv = await self.js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            try:
                kv = await self.js.create_key_value(bucket=bucket, history=1, ttl=ttl, replicas=settings.replicas,
                                                    storage=js_api.StorageType.FILE)
            except nats.js.errors.BadRequestError:
                kv = await self.js.key_value(bucket)
        config = (await kv.status()).stream_info.config
        problems = []
        if config.max_msgs_per_subject != 1:
            problems.append(f"it keeps {config.max_msgs_per_subject} revisions a key, not 1")
        if (config.num_replicas or 1) < settings.replicas:
            problems.append(f"it has {config.num_replicas} replica(s), not {settings.replicas}")
        if ttl is None and config.max_age:
            problems.append(f"its entries expire after {config.max_age:.0f} s: nicks would vanish")
        if ttl is not None and abs((config.max_age or 0) - ttl) > 0.001:
            problems.append(f"its entries expire after {config.max_age or 0:g} s, not host_lease = {ttl:g} s "
                            "(every host must use the same lease)")
        if problems:
            self.fail("bad-bucket", f"KV bucket {bucket} will not do: {'; '.join(problems)}. Fix: give every "
                                    f"host the same settings, or remove the bucket, and start chatd again")
            return None
        return kv

    # -- connection events -------------------------------------------------------------
    def _url(self) -> str | None:
        url = self.nc.connected_url if self.nc is not None else None
        return f"nats://{url.hostname}:{url.port}" if url else None

    async def _on_error(self, exc: Exception) -> None:
        """nats-py's own reports: failed (re)connects, and what its background tasks hit."""
        if isinstance(exc, (OSError, nats.errors.NoServersError)) or (
                self.gauges.server is None and isinstance(exc, asyncio.TimeoutError)):
            self.say("unreachable", f"cannot reach NATS ({', '.join(self.settings.servers)}): {_describe(exc)}; "
                                    "retrying. Fix: start nats-server there, or correct --cluster")
        else:
            self.say("nats", f"the NATS client reported {_describe(exc)} (it retries by itself)")

    async def _on_disconnected(self) -> None:
        if self.gauges.server is not None:
            self.put(Disconnected(f"lost {self.gauges.server}"))
        self.gauges.server = None

    async def _on_reconnected(self) -> None:
        self.gauges.server = self._url()
        self.put(Connected(self.gauges.server))

    # -- publishing --------------------------------------------------------------------
    async def _publish(self, command: tuple) -> None:
        _, token, subject, msg_id, payload = command
        headers = {"Nats-Msg-Id": msg_id}
        delay = RETRY_FIRST
        while True:
            await self._ready.wait()
            try:
                ack = await self.js.publish(subject, payload, timeout=ACK_TIMEOUT, headers=dict(headers))
                break
            except asyncio.CancelledError:
                raise
            except nats.errors.TimeoutError:
                pass  # the usual way a dead server or a stream leader election shows: just again
            except Exception as exc:
                self.say("publish-retrying", f"publishing to {subject} failed, retrying: {_describe(exc)}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_LONGEST)
        self.gauges.publishes_done += 1
        self.put(Published(token, ack.seq, bool(ack.duplicate)))

    # -- delivery ----------------------------------------------------------------------
    async def _start_delivery(self) -> None:
        settings = self.settings
        if self.gauges.last_delivered:
            config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                                           opt_start_seq=self.gauges.last_delivered + 1)
        elif self.only_new:
            config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)
        else:
            config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
        await self.js.subscribe(f"chat.{settings.host_id}.>", stream=settings.stream, cb=self._on_delivery,
                                ordered_consumer=True, idle_heartbeat=HEARTBEAT, config=config,
                                inactive_threshold=30.0)

    async def _on_delivery(self, msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self.gauges.last_delivered:
            return  # a repeat (a remade consumer starts where the last received one was)
        while self.mailbox.backlog >= DELIVERY_BACKLOG:
            await asyncio.sleep(0.005)  # chatd is behind: hold the consumer (flow control holds the server)
        self.gauges.last_delivered = seq
        self.gauges.lag = meta.num_pending
        self.put(Delivered(seq, msg.subject, dict(msg.headers or {}), msg.data))

    # -- nicks -------------------------------------------------------------------------
    async def _nick_job(self, command: tuple) -> None:
        kind, token, nick = command[:3]
        if kind == "claim":
            result = await self._until_answered(lambda attempt: self._claim(token, nick, command[3]))
        elif kind == "update":
            result = await self._until_answered(lambda attempt: self._update(token, nick, *command[3:], attempt))
        else:
            result = await self._until_answered(lambda attempt: self._release(nick, command[3], attempt))
        self.put(result)

    async def _until_answered(self, attempt: Callable[[int], Awaitable[Any]]):
        """``attempt(n)``'s result, retried (n = 0, 1, …) through timeouts and lost connections."""
        delay = RETRY_FIRST
        tries = 0
        while True:
            await self._ready.wait()
            try:
                return await attempt(tries)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, nats.errors.TimeoutError):
                    self.say("kv-retrying", f"a nick operation failed, retrying: {_describe(exc)}")
            tries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_LONGEST)

    async def _claim(self, token, nick: str, value: bytes) -> Claimed:
        await self._leased.wait()
        while True:
            try:
                revision = await self.nicks.create(nick, value)
                return Claimed(token, nick, True, revision, self.settings.host_id)
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self.nicks.get(nick)
            except nats.js.errors.KeyNotFoundError:
                continue  # released since: create again
            holder = _holder(entry.value)
            if holder == self.settings.host_id or (holder is not None and not await self._lease_held(holder)):
                try:
                    revision = await self.nicks.update(nick, value, last=entry.revision)
                    return Claimed(token, nick, True, revision, self.settings.host_id)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another host moved first: look again
            return Claimed(token, nick, False, entry.revision, holder)

    async def _lease_held(self, host_id: str) -> bool:
        try:
            await self.hosts.get(host_id)
            return True
        except nats.js.errors.KeyNotFoundError:
            return False

    async def _update(self, token, nick: str, value: bytes, revision: int, attempt: int) -> Updated:
        try:
            return Updated(token, nick, True, await self.nicks.update(nick, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # Lost the compare-and-set, or an earlier attempt won it and only its answer was lost.
        try:
            entry = await self.nicks.get(nick)
        except nats.js.errors.KeyNotFoundError:
            return Updated(token, nick, False, None)
        if attempt and entry.value == value:
            return Updated(token, nick, True, entry.revision)
        return Updated(token, nick, False, entry.revision)

    async def _release(self, nick: str, revision: int, attempt: int) -> Released:
        try:
            await self.nicks.delete(nick, last=revision)  # with last: a compare-and-set delete
            return Released(nick, True)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code not in WRONG_LAST_SEQUENCE:
                raise
        if attempt:  # did an earlier attempt delete it, its answer lost?
            try:
                await self.nicks.get(nick)
            except nats.js.errors.KeyNotFoundError:
                return Released(nick, True)
        return Released(nick, False)

    async def _watch_nicks(self) -> None:
        prefix = f"$KV.{self.settings.nick_bucket}."
        await self._watch("nicks", self.settings.nick_bucket, prefix, self._on_nick, headers_only=False)

    async def _on_nick(self, msg) -> None:
        nick, revision, deleted = self._kv_entry(msg, f"$KV.{self.settings.nick_bucket}.")
        if revision <= self._nick_revision.get(nick, 0):
            return
        self._nick_revision[nick] = revision
        self.put(NickChanged(nick, None if deleted else msg.data, revision))

    # -- hosts -------------------------------------------------------------------------
    async def _keep_lease(self) -> None:
        settings = self.settings
        value = json.dumps({"host": settings.host_id, "pid": os.getpid(), "since": time.time()}).encode()
        subject = f"$KV.{settings.host_bucket}.{settings.host_id}"
        every = settings.host_lease / 4
        lapsed = False
        began = time.monotonic()
        while True:
            try:
                await self.js.publish(subject, value, timeout=every)
                self.gauges.lease_renewed = time.monotonic()
                self._leased.set()
                if lapsed:
                    lapsed = False
                    self.say("lease-renewed", f"this host's lease ({settings.host_id}) is renewed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                since = self.gauges.lease_renewed or began
                if not lapsed and time.monotonic() - since > settings.host_lease:
                    lapsed = True
                    self.say("lease-lapsed", f"this host's lease ({settings.host_id}) was not renewed for "
                                             f"{settings.host_lease:g} s ({_describe(exc)}): other hosts may take "
                                             "its nicks. Fix: bring NATS back; the lease is renewed then")
            # Until it is first stored, no claim is answered: try again soon (a new bucket's
            # stream may take a moment to elect its leader).
            await asyncio.sleep(every if self._leased.is_set() else min(every, 0.1))

    async def _watch_hosts(self) -> None:
        await self._watch("hosts", self.settings.host_bucket, f"$KV.{self.settings.host_bucket}.", self._on_host,
                          headers_only=True)

    async def _on_host(self, msg) -> None:
        host, _, deleted = self._kv_entry(msg, f"$KV.{self.settings.host_bucket}.")
        if deleted:
            self._host_is(host, False)
        else:
            self._host_seen[host] = time.monotonic()
            self._host_is(host, True)

    def _host_is(self, host: str, alive: bool) -> None:
        if self.hosts_alive.get(host) != alive:
            self.hosts_alive[host] = alive
            self.gauges.hosts_alive = tuple(sorted(host for host, alive in self.hosts_alive.items() if alive))
            self.put(HostChanged(host, alive))

    async def _watch_hosts_expiring(self) -> None:
        """Report hosts whose lease expired: nats-server 2.9 tells watchers nothing when a key expires."""
        lease = self.settings.host_lease
        while True:
            await asyncio.sleep(lease / 4)
            now = time.monotonic()
            for host, alive in list(self.hosts_alive.items()):
                if alive and now - self._host_seen.get(host, now) > lease:
                    try:
                        if await self._lease_held(host):
                            self._host_seen[host] = time.monotonic()  # renewed, and we missed it
                        else:
                            self._host_is(host, False)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        pass  # ask again next round

    # -- watching a bucket -------------------------------------------------------------
    async def _watch(self, which: str, bucket: str, prefix: str, callback, headers_only: bool) -> None:
        """Every key's last value, then every change: an ordered consumer on the bucket's stream.
        The first values are all in when one comes with nothing pending after it, or at once
        if the bucket held nothing when the watch began."""

        async def deliver(msg) -> None:
            await callback(msg)
            if which in self._catching_up and msg.metadata.num_pending == 0:
                self._caught_up(which)

        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                                       headers_only=headers_only)
        empty = (await self.js.stream_info(f"KV_{bucket}")).state.messages == 0
        await self.js.subscribe(f"{prefix}>", stream=f"KV_{bucket}", cb=deliver, ordered_consumer=True,
                                idle_heartbeat=HEARTBEAT, config=config, inactive_threshold=30.0)
        if empty:
            self._caught_up(which)

    def _caught_up(self, which: str) -> None:
        if which in self._catching_up:
            self._catching_up.discard(which)
            if not self._catching_up:
                self.put(DirectoryComplete())

    @staticmethod
    def _kv_entry(msg, prefix: str) -> tuple[str, int, bool]:
        operation = (msg.headers or {}).get("KV-Operation")
        return msg.subject[len(prefix):], msg.metadata.sequence.stream, operation in ("DEL", "PURGE")


def _holder(value: bytes) -> str | None:
    """The host a nick's value names; None if it names none."""
    try:
        holder = json.loads(value).get("host")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return holder if isinstance(holder, str) else None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[len("nats: "):]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
