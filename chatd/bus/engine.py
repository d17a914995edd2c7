"""The bus thread: nats-py on an asyncio loop of its own (see :mod:`chatd.bus` for what it does).

This module is imported by the bus thread only (``chatd.bus._run_bus_thread``):
asyncio and nats-py take ~100 ms to import, and a chatd restarting after a crash
restores its clients without waiting for them.

The :class:`Engine` is made on the bus thread and lives there. It takes
chatd's commands from the :class:`~chatd.bus.mailbox.Mailbox` (publishes to
its per-subject lanes, nick work to its :class:`~chatd.bus.directory.Directory`),
posts results there, and reports itself in the
:class:`~chatd.bus.state.Gauges`, which it and its directory alone write. It
connects, makes sure of the stream and buckets (judged by
:mod:`~chatd.bus.checks`), then publishes and delivers. Its one-shot network
steps (the setup, starting delivery and the watches, each publish, each nick
operation) are retried by :func:`~chatd.bus.tasks.retry` until they succeed;
a setup judged wrong is fatal instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import nats
import nats.errors
import nats.js.errors
from nats.js import api as js_api

from fdkeep.errors import Error

from .access import connect_options, new_client, refused
from .checks import (DUPLICATE_WINDOW, MAX_AGE, STREAM_SUBJECTS, bucket_refusal, cursor_refusal, describe,
                     stream_refusal, unread_expired)
from .directory import Directory
from .sessions import SessionWork
from .mailbox import Mailbox
from .results import BusError, Connected, Delivered, Disconnected, Published
from .state import BusSettings, Gauges
from .tasks import Lanes, retry

#: Seconds one publish attempt waits for JetStream's ack before it is sent again. On loopback
#: or a LAN an ack takes milliseconds; what outlasts this is a stream without a leader (a node
#: died: an election takes 4-9 s on nats-server 2.9), and a publish sent during the election is
#: answered by none: sent again soon, it is stored soon after the new leader is (bench/nats_stall.py).
ACK_TIMEOUT = 1.0
#: Seconds one publish attempt may take as a whole, not only its wait for the ack: over a link
#: gone silent (a partition) nats-py's writes stop, and a publish queued behind them can wait for
#: good, the connection it was queued on long gone; bounded, it is sent again on the new one.
ATTEMPT_LIMIT = ACK_TIMEOUT + 1.0
#: The ordered consumers' idle heartbeat: a consumer whose node died is remade after two missed
#: (nats-py), so within a second; each remaking is one small request.
HEARTBEAT = 0.5
#: Seconds a JetStream API request waits for its answer (a stream's info, a bucket's entry, an
#: ordered consumer remade): each is retried (a nick claim's retry finds out what the first one
#: did), so short, for the reason of ACK_TIMEOUT: a request sent during an election goes again
#: soon after it. Three streams elect at once when a node dies (the messages', two buckets').
API_TIMEOUT = 1.0
#: A session's entry goes this long after its last write (a client away for a day starts anew).
SESSION_TTL = 24 * 3600.0
#: Delivery pauses while this many Delivered results wait for chatd to take them.
DELIVERY_BACKLOG = 10_000
#: A BusError that goes on is said again at most this often.
SAY_AGAIN_AFTER = 30.0


class Engine:
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
        #: Set once the stream and buckets are right: publishing and nick work wait for it.
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._said: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._publishes = Lanes(self.spawn, self._publish)
        self.directory = Directory(self)
        self.sessions = SessionWork(self)

    # -- the thread --------------------------------------------------------------------
    def run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
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
            elif command[0] in ("session_get", "session_put", "replay"):
                self.sessions.queue(command)
            else:
                self.directory.queue(command)
        if self.mailbox.closed:
            self._stopping.set()

    # -- connecting and the setup ------------------------------------------------------
    async def _connect_and_serve(self) -> None:
        settings = self.settings
        try:
            access = connect_options(settings.host_id, settings.creds, settings.ca)
        except Error as exc:
            self.fail(exc.code, exc.message)
            return
        self.nc = new_client(tls_expected=settings.ca is not None)
        await self.nc.connect(
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
            **access,  # this host's nkey and the servers' CA, if secured: chatd.bus.access
        )
        self.gauges.server = self._url()
        self.gauges.max_payload = self.nc.max_payload
        self.put(Connected(self.gauges.server))
        self.js = self.nc.jetstream(timeout=API_TIMEOUT)
        directory = self.directory
        # The lease first: this host is alive from the moment chatd runs (it serves its clients
        # from holderd before NATS answers). Put only after the setup, a host whose chatd was
        # restarted again and again during a slow setup (a NATS node's death) went unleased for
        # as long, and other hosts counted it dead: their members' pairs with it broke.
        lease = self.spawn(directory.keep_lease())
        lapse_watch = self.spawn(directory.watch_own_lease())
        if await self.until_done("setup", self._setup) is False:
            lease.cancel()  # failed for good (said): a host that serves no cluster holds no nicks
            lapse_watch.cancel()
            return
        self.gauges.ready = True
        self.ready.set()
        self.spawn(directory.watch_hosts_expiring())
        self.spawn(self.until_done("delivery", self._start_delivery))
        self.spawn(self.until_done("nick watch", directory.watch_nicks))
        self.spawn(self.until_done("host watch", directory.watch_hosts))

    async def until_done(self, what: str, step: Callable[[], Awaitable[Any]]):
        """``step()``'s result once it returns without raising; each failure said as "retrying"."""
        return await retry(lambda tries: step(),
                           lambda exc: self.say("retrying", f"{what} failed, retrying: {describe(exc)}"))

    async def _setup(self) -> bool:
        settings = self.settings
        want = js_api.StreamConfig(
            name=settings.stream, subjects=[STREAM_SUBJECTS], storage=js_api.StorageType.FILE,
            num_replicas=settings.replicas,
            retention=js_api.RetentionPolicy.LIMITS, duplicate_window=DUPLICATE_WINDOW, max_age=MAX_AGE,
            discard=js_api.DiscardPolicy.OLD,
        )
        info = await self._ensure_stream(want)  # read back: judged on what the server keeps
        refusal = stream_refusal(settings.stream, info.config, settings.replicas)
        if refusal:
            self.fail("bad-stream", refusal)
            return False
        cursor = self.gauges.last_delivered
        refusal = cursor_refusal(settings.stream, cursor, info.state)
        if refusal:
            self.fail("cursor-ahead", refusal)
            return False
        expired = unread_expired(settings.stream, cursor, info.state, info.config.max_age)
        if expired:
            self.say("messages-expired", expired)
        nicks = await self._ensure_bucket(settings.nick_bucket, ttl=None)
        hosts = await self._ensure_bucket(settings.host_bucket, ttl=settings.host_lease)
        sessions = await self._ensure_bucket(settings.session_bucket, ttl=SESSION_TTL)
        if nicks is None or hosts is None or sessions is None:
            return False
        self.directory.use_buckets(nicks, hosts)
        self.sessions.use_bucket(sessions)
        return True

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
        refusal = bucket_refusal(bucket, (await kv.status()).stream_info.config, settings.replicas, ttl)
        if refusal:
            self.fail("bad-bucket", refusal)
            return None
        return kv

    # -- connection events -------------------------------------------------------------
    def _url(self) -> str | None:
        url = self.nc.connected_url if self.nc is not None else None
        return f"nats://{url.hostname}:{url.port}" if url else None

    async def _on_error(self, exc: Exception) -> None:
        """nats-py's own reports: failed (re)connects, and what its background tasks hit."""
        settings = self.settings
        refusal = refused(exc, settings.host_id, settings.creds is not None, settings.ca is not None)
        if refusal:
            self.say("refused", f"{refusal} (retrying)")
            return
        if isinstance(exc, (OSError, nats.errors.NoServersError)) or (
                self.gauges.server is None and isinstance(exc, asyncio.TimeoutError)):
            self.say("unreachable", f"cannot reach NATS ({', '.join(self.settings.servers)}): {describe(exc)}; "
                                    "retrying. Fix: start nats-server there, or correct --cluster")
        else:
            self.say("nats", f"the NATS client reported {describe(exc)} (it retries by itself)")

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

        def failed(exc: Exception) -> None:
            # A timeout is the usual way a dead server, a leader election or a silent link shows.
            if not isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
                self.say("publish-retrying", f"publishing to {subject} failed, retrying: {describe(exc)}")

        ack = await retry(lambda tries: asyncio.wait_for(
            self.js.publish(subject, payload, timeout=ACK_TIMEOUT, headers=dict(headers)), ATTEMPT_LIMIT),
            failed, gate=self.ready)
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
        # Every host's subjects, not only its own: a session's receiver may be taken over by this
        # host from any other (chatd.keeper), and its messages come on the subject its senders
        # last saw. NATS 2.9 gives a consumer one filter subject; what is for no member here is
        # dropped unread by chatd (chatd.inbound).
        await self.follow("chat.>", settings.stream, self._on_delivery, config)

    async def follow(self, subject: str, stream: str, callback, config) -> None:
        """``callback(msg)`` for each message of ``stream`` on ``subject`` from where ``config`` says,
        through nats-py's ordered consumer: remade (from the last one received) on a gap, or when
        its heartbeats stop because the node holding it died."""
        await self.js.subscribe(subject, stream=stream, cb=callback, ordered_consumer=True,
                                idle_heartbeat=HEARTBEAT, config=config, inactive_threshold=30.0)

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
