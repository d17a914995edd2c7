"""The bus thread: nats-py on an asyncio loop of its own (see :mod:`chatd.bus` for what it does).

This module is imported by the bus thread only (``chatd.bus._run_bus_thread``):
asyncio and nats-py take ~100 ms to import, and a chatd restarting after a crash
restores its clients without waiting for them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Awaitable, Callable

import nats
import nats.errors
import nats.js.errors
from nats.js import api as js_api

from .checks import (DUPLICATE_WINDOW, MAX_AGE, STREAM_SUBJECTS, bucket_refusal, cursor_refusal, describe, holder,
                     kv_entry, stream_refusal, unread_expired)
from .mailbox import Mailbox
from .results import (BusError, Claimed, Connected, Delivered, DirectoryComplete, Disconnected, HostChanged,
                      NickChanged, Published, Released, Updated)
from .state import BusSettings, Gauges
from .tasks import Lanes, retry

#: Seconds one publish attempt waits for JetStream's ack before it is sent again.
ACK_TIMEOUT = 2.0
#: The ordered consumers' idle heartbeat: a consumer whose node died is remade after two missed.
HEARTBEAT = 1.0
#: Delivery pauses while this many Delivered results wait for chatd to take them.
DELIVERY_BACKLOG = 10_000
#: A BusError that goes on is said again at most this often.
SAY_AGAIN_AFTER = 30.0
#: JetStream's error code for "wrong last sequence" (a compare-and-set that lost).
WRONG_LAST_SEQUENCE = (10071, 10164)


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
        self.hosts_alive: dict[str, bool] = {}
        self._host_seen: dict[str, float] = {}
        self._nick_revision: dict[str, int] = {}
        #: The buckets whose first values have not all come yet (DirectoryComplete when none).
        self._catching_up = {"nicks", "hosts"}
        self._said: dict[str, float] = {}
        self._tasks: set[asyncio.Task] = set()
        self._publishes = Lanes(self.spawn, self._publish)
        self._nick_work = Lanes(self.spawn, self._nick_job)
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
        if await self._until_done("setup", self._setup) is False:
            return  # failed for good: said
        self.gauges.ready = True
        self._ready.set()
        self.spawn(self._keep_lease())
        self.spawn(self._watch_hosts_expiring())
        self.spawn(self._until_done("delivery", self._start_delivery))
        self.spawn(self._until_done("nick watch", self._watch_nicks))
        self.spawn(self._until_done("host watch", self._watch_hosts))

    async def _until_done(self, what: str, step: Callable[[], Awaitable[Any]]):
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
            if not isinstance(exc, nats.errors.TimeoutError):  # the usual way a dead server or a leader election shows
                self.say("publish-retrying", f"publishing to {subject} failed, retrying: {describe(exc)}")

        ack = await retry(lambda tries: self.js.publish(subject, payload, timeout=ACK_TIMEOUT, headers=dict(headers)),
                          failed, gate=self._ready)
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

        async def attempt(tries: int):
            if kind == "claim":
                return await self._claim(token, nick, command[3])
            if kind == "update":
                return await self._update(token, nick, *command[3:], tries)
            return await self._release(nick, command[3], tries)

        def failed(exc: Exception) -> None:
            if not isinstance(exc, nats.errors.TimeoutError):
                self.say("kv-retrying", f"a nick operation failed, retrying: {describe(exc)}")

        self.put(await retry(attempt, failed, gate=self._ready))

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
            named = holder(entry.value)
            if named == self.settings.host_id or (named is not None and not await self._lease_held(named)):
                try:
                    revision = await self.nicks.update(nick, value, last=entry.revision)
                    return Claimed(token, nick, True, revision, self.settings.host_id)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another host moved first: look again
            return Claimed(token, nick, False, entry.revision, named)

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
                                             f"{settings.host_lease:g} s ({describe(exc)}): other hosts may take "
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
        return kv_entry(prefix, msg.subject, msg.headers, msg.metadata.sequence.stream)
