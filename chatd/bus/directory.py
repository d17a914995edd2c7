"""Nicks and host leases, on the bus thread (see :mod:`chatd.bus`, "Nicks and leases").

Imported by the bus thread only, as :mod:`chatd.bus.engine` is. The
:class:`Directory` does the nick work chatd asks for (claim, update, release:
one at a time per nick, each retried until answered), keeps this host's lease,
and watches both buckets, turning what it sees into :class:`NickChanged`,
:class:`HostChanged` and, once, :class:`DirectoryComplete`. It uses its
:class:`~chatd.bus.engine.Engine` for the connection (``js``), the readiness
gate, tasks and results, as far as :class:`EngineSide` declares (it does not import
the engine, which makes it).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Awaitable, Callable, Protocol

import nats.errors
import nats.js.errors
from nats.js import api as js_api

from .checks import describe, kv_entry
from .payloads import BusPayloadError, Complaints, read_entry
from .results import Claimed, DirectoryComplete, HostChanged, LeaseLapsed, LeaseRenewed, NickChanged, Released, Updated
from .tasks import Lanes, retry



class EngineSide(Protocol):
    """What a :class:`Directory` uses of the engine that makes it (chatd.bus.engine.Engine)."""

    settings: Any  # chatd.bus.state.BusSettings
    gauges: Any  # chatd.bus.state.Gauges
    js: Any  # nats-py's JetStream context
    ready: asyncio.Event  # set while connected and set up: nick work waits for it

    def spawn(self, coroutine) -> asyncio.Task: ...
    def put(self, result) -> None: ...
    def say(self, code: str, message: str, fatal: bool = False) -> None: ...
    async def follow(self, subject: str, stream: str, callback: Callable[..., Awaitable[None]], config) -> None: ...

#: How often (s) a watch still reading a bucket's first values looks whether it has them all.
CATCH_UP_LOOK = 1.0

#: How long (s) before the earliest moment this host's lease can expire in NATS the host takes
#: it for lapsed (LeaseLapsed): chatd's loop must have fenced itself before another host can take
#: its nicks (a quarter of the lease at most).
FENCE_MARGIN = 0.5

#: How far apart (s) the clocks of the NATS nodes leading the nicks and the hosts buckets may be:
#: a nick change stored this much less than a lease after a host's last lease put may still be a
#: claim of that host's nicks (:meth:`Directory._lapsing_at`).
CLOCKS_APART = 0.25

#: Seconds before a lease put that failed (no leader for the bucket yet, NATS away) is tried
#: again: a renewal is late already, and a quarter lease more (with the failed put's own wait)
#: is half the lease gone.
LEASE_RETRY = 0.2

#: Seconds a look at one host's lease key may take while the nick watch waits for it.
LEASE_LOOK_LIMIT = 1.0

#: Seconds one nick operation (a claim: create, get, update; each request 1 s at most) may take.
NICK_ATTEMPT_LIMIT = 5.0

#: JetStream's error code for "wrong last sequence" (a compare-and-set that lost).
WRONG_LAST_SEQUENCE = (10071, 10164)


class Directory:
    """The nicks bucket and the hosts bucket, as this host works on and watches them."""

    def __init__(self, engine: EngineSide):
        self.engine = engine
        self.settings = engine.settings
        self.gauges = engine.gauges  # lease_renewed and hosts_alive are written here
        self.nicks = None  # the KV buckets, once the engine's setup found them right (use_buckets)
        self.hosts = None
        #: Set once this host's lease is first stored: no claim is made before, since until then
        #: another host would take this host for a dead one and its nicks for free.
        self._leased = asyncio.Event()
        self._work = Lanes(engine.spawn, self._nick_job)
        self.hosts_alive: dict[str, bool] = {}
        self._host_seen: dict[str, float] = {}
        #: When (NATS's time, epoch seconds) each host's last lease put seen here was stored.
        self._lease_stored: dict[str, float] = {}
        #: When (monotonic) the last acknowledged put of this host's lease was sent: the key
        #: expires no sooner than host_lease after it. None before the first.
        self._lease_sent: float | None = None
        self._lapse_told = False
        self._nick_revision: dict[str, int] = {}
        #: The buckets whose first values have not all come yet (DirectoryComplete when none).
        self._catching_up = {"nicks", "hosts"}
        #: KV changes under a key that names no nick or host: ignored, said once per kind.
        self.complaints = Complaints(lambda line: engine.say("bad-payload", line))

    def use_buckets(self, nicks, hosts) -> None:
        self.nicks, self.hosts = nicks, hosts

    def queue(self, command: tuple) -> None:
        """A claim, update or release from chatd: after the ones before it on the same nick."""
        self._work.add(command[2], command)

    # -- nicks -------------------------------------------------------------------------
    async def _nick_job(self, command: tuple) -> None:
        kind, token, nick = command[:3]

        async def one_try(tries: int):
            if kind == "claim":
                return await self._claim(token, nick, command[3])
            if kind == "take":
                return await self._take(token, nick, command[3])
            if kind == "update":
                return await self._update(token, nick, *command[3:], tries)
            return await self._release(nick, command[3], tries)

        async def attempt(tries: int):
            # Bounded as a whole (a few requests): over a silent link a request queued in nats-py can
            # wait for good (chatd.bus.engine.ATTEMPT_LIMIT), and this nick's lane with it. A claim
            # waits for the first lease first, which is not this attempt's to time.
            if kind == "claim":
                await self._leased.wait()
            return await asyncio.wait_for(one_try(tries), NICK_ATTEMPT_LIMIT)

        def failed(exc: Exception) -> None:
            if not isinstance(exc, (nats.errors.TimeoutError, asyncio.TimeoutError)):
                self.engine.say("kv-retrying", f"a nick operation failed, retrying: {describe(exc)}")

        self.engine.put(await retry(attempt, failed, gate=self.engine.ready))

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
            named, unreadable = self._holder(entry.value)
            if named == self.settings.host_id or unreadable or (named is not None
                                                                and not await self._lease_held(named)):
                try:
                    revision = await self.nicks.update(nick, value, last=entry.revision)
                    return Claimed(token, nick, True, revision, self.settings.host_id)
                except nats.js.errors.KeyWrongLastSequenceError:
                    continue  # another host moved first: look again
            return Claimed(token, nick, False, entry.revision, named)

    async def _take(self, token, nick: str, value: bytes) -> Claimed:
        """The nick, whoever holds it: a compare-and-set on the revision read, again until it wins."""
        await self._leased.wait()
        known = self._nick_revision.get(nick)  # the watch's latest: most often still the entry's
        while True:
            if known is None:
                try:
                    known = (await self.nicks.get(nick)).revision
                except nats.js.errors.KeyNotFoundError:
                    known = 0
            try:
                if known:
                    revision = await self.nicks.update(nick, value, last=known)
                else:
                    revision = await self.nicks.create(nick, value)
                return Claimed(token, nick, True, revision, self.settings.host_id)
            except nats.js.errors.KeyWrongLastSequenceError:
                known = None  # changed since: look again

    @staticmethod
    def _holder(value: bytes) -> tuple[str | None, bool]:
        """The host a nick's entry names, and whether it is *unreadable*: it names no one (garbage
        someone wrote over it), and is free to take. Another release's entry names no host this
        release can trust, but it is not free: that host may be alive."""
        try:
            return read_entry(value)[0], False
        except BusPayloadError as exc:
            return None, exc.kind != "version"

    async def _lease_looked(self, host_id: str, limit: float) -> bool | None:
        """:meth:`_lease_held`, bounded by ``limit`` s (over a silent link a request can wait for
        good: see _nick_job); None if NATS did not tell."""
        try:
            return await asyncio.wait_for(self._lease_held(host_id), limit)
        except asyncio.CancelledError:
            raise
        except Exception:
            return None

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

    async def watch_nicks(self) -> None:
        prefix = f"$KV.{self.settings.nick_bucket}."
        await self._watch("nicks", self.settings.nick_bucket, prefix, self._on_nick, headers_only=False)

    async def _on_nick(self, msg) -> None:
        try:
            nick, revision, deleted = self._kv_entry(msg, f"$KV.{self.settings.nick_bucket}.")
        except BusPayloadError as exc:
            self.complaints("nick change", exc, f"on {msg.subject[:80]!r}")
            return
        if revision <= self._nick_revision.get(nick, 0):
            return
        self._nick_revision[nick] = revision
        lapsing = self._lapsing_at(msg.metadata.timestamp.timestamp())
        if lapsing:  # rare: a host lost, or this host's view of the leases behind (a stalled watch)
            lapsing = await self._gone_of(lapsing)
        self.engine.put(NickChanged(nick, None if deleted else msg.data, revision, lapsing))

    def _lapsing_at(self, stored: float) -> frozenset[str]:
        """The hosts alive here whose last lease put seen was stored at least a lease (less
        :data:`CLOCKS_APART`) before ``stored``. Another host claims a nick of a host only once
        that host's lease key has expired in NATS, a lease after its last put was stored; this
        host learns of the expiry only later (watch_hosts_expiring), so the nick change says it.
        Compared in NATS's own times, it does not depend on when either watch delivered. A
        session taken over sooner (chatd.keeper takes the nick whoever holds it) is not one."""
        since = self.settings.host_lease - CLOCKS_APART
        return frozenset(host for host, put in self._lease_stored.items()
                         if self.hosts_alive.get(host) and stored - put >= since)

    async def _gone_of(self, hosts: frozenset[str]) -> frozenset[str]:
        """Of ``hosts``, those whose lease key is not in the bucket now. This host's last put seen of
        a host may be old because its own watch of the leases stalled (a NATS node's death): a host
        whose key is there was alive when the nick moved, and the move was a session taken over.
        One that cannot be looked up (NATS busy) counts as gone: its peers here hear UNPAIRED and
        PAIRED, rather than have what they send a new member lost unsaid."""
        return frozenset([host for host in sorted(hosts)
                          if await self._lease_looked(host, LEASE_LOOK_LIMIT) is not True])

    # -- hosts -------------------------------------------------------------------------
    async def keep_lease(self) -> None:
        """Put this host's lease every quarter of it, for ever (a put that failed again within
        :data:`LEASE_RETRY`); whether it lapsed meanwhile is :meth:`watch_own_lease`'s to say."""
        settings = self.settings
        value = json.dumps({"host": settings.host_id, "pid": os.getpid(), "since": time.time()}).encode()
        subject = f"$KV.{settings.host_bucket}.{settings.host_id}"
        every = settings.host_lease / 4
        while True:
            renewed = False
            try:
                sending = time.monotonic()
                # Bounded as a whole, not only the wait for the ack: a put queued in nats-py while it
                # reconnects may be acked long after it was begun, and the lapse is counted from then.
                await asyncio.wait_for(self.engine.js.publish(subject, value, timeout=every), every)
                self.gauges.lease_renewed = time.monotonic()
                self._lease_sent = max(sending, self._lease_sent or 0.0)
                self._leased.set()
                renewed = True
                if self._lapse_told:
                    self._lapse_told = False
                    self.engine.put(LeaseRenewed())
                    self.engine.say("lease-renewed", f"this host's lease ({settings.host_id}) is renewed")
            except asyncio.CancelledError:
                raise
            except Exception:
                pass  # tried again soon; a lapse is watch_own_lease's to tell
            # A put that failed is tried again soon: the bucket's stream may be electing its leader
            # (a NATS node died), or not made yet (this host's first setup makes it).
            await asyncio.sleep(every if renewed else min(every, LEASE_RETRY))

    async def watch_own_lease(self) -> None:
        """Say :class:`LeaseLapsed` once this host's lease may have expired in NATS (see
        :mod:`chatd.bus`, "Its own lease, told"): worked out here, since a host cut off from
        NATS hears nothing. Looks every eighth of the lease, and at the moment it is due."""
        lease = self.settings.host_lease
        margin = min(FENCE_MARGIN, lease / 4)
        while True:
            now = time.monotonic()
            if self._lease_sent is None or self._lapse_told:
                await asyncio.sleep(lease / 8)
                continue
            due = self._lease_sent + lease - margin
            if now < due:
                await asyncio.sleep(min(due - now, lease / 8))
                continue
            self._lapse_told = True
            self.engine.put(LeaseLapsed(round(now - self._lease_sent, 3)))
            self.engine.say("lease-lapsed", f"this host's lease ({self.settings.host_id}) may have expired: no "
                                            f"put of it acknowledged for {now - self._lease_sent:.1f} s (lease "
                                            f"{lease:g} s); its clients are told to go elsewhere. Fix: bring "
                                            "NATS back; the host serves again once the lease is renewed")

    async def watch_hosts(self) -> None:
        await self._watch("hosts", self.settings.host_bucket, f"$KV.{self.settings.host_bucket}.", self._on_host,
                          headers_only=True)

    async def _on_host(self, msg) -> None:
        try:
            host, _, deleted = self._kv_entry(msg, f"$KV.{self.settings.host_bucket}.")
        except BusPayloadError as exc:
            self.complaints("host lease", exc, f"on {msg.subject[:80]!r}")
            return
        if deleted:
            self._host_is(host, False)
        else:
            self._host_seen[host] = time.monotonic()
            self._lease_stored[host] = msg.metadata.timestamp.timestamp()
            self._host_is(host, True)

    def _host_is(self, host: str, alive: bool) -> None:
        if self.hosts_alive.get(host) != alive:
            self.hosts_alive[host] = alive
            self.gauges.hosts_alive = tuple(sorted(name for name, up in self.hosts_alive.items() if up))
            self.engine.put(HostChanged(host, alive))

    async def watch_hosts_expiring(self) -> None:
        """Report hosts whose lease expired: nats-server 2.9 tells watchers nothing when a key expires."""
        lease = self.settings.host_lease
        while True:
            await asyncio.sleep(lease / 4)
            now = time.monotonic()
            for host, alive in list(self.hosts_alive.items()):
                if alive and now - self._host_seen.get(host, now) > lease:
                    held = await self._lease_looked(host, NICK_ATTEMPT_LIMIT)
                    if held:
                        self._host_seen[host] = time.monotonic()  # renewed, and we missed it
                    elif held is False:
                        self._host_is(host, False)
                    # None: NATS did not tell; ask again next round

    # -- watching a bucket -------------------------------------------------------------
    async def _watch(self, which: str, bucket: str, prefix: str, callback, headers_only: bool) -> None:
        """Every key's last value, then every change: an ordered consumer on the bucket's stream.

        The first values are all in when one comes with nothing pending after it, or at once
        if the bucket held nothing when the watch began, or when a look at the stream finds
        that every message it holds has been handled here. The last is the one that always
        ends: while a new stream elects its leader, the consumer may be remade (nats-py starts
        it again after the last message it received) and the delivery that says "nothing
        pending" can be one that never comes."""
        handled = 0  # the stream sequence of the last message handed to callback

        async def deliver(msg) -> None:
            nonlocal handled
            await callback(msg)
            handled = max(handled, msg.metadata.sequence.stream)
            if which in self._catching_up and msg.metadata.num_pending == 0:
                self._caught_up(which)

        config = js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.LAST_PER_SUBJECT,
                                       headers_only=headers_only)
        stream = f"KV_{bucket}"
        empty = (await self.engine.js.stream_info(stream)).state.messages == 0
        await self.engine.follow(f"{prefix}>", stream, deliver, config)
        if empty:
            self._caught_up(which)
        while which in self._catching_up:
            await asyncio.sleep(CATCH_UP_LOOK)
            try:
                state = (await self.engine.js.stream_info(stream)).state
            except asyncio.CancelledError:
                raise
            except Exception:
                continue  # no leader yet, or NATS away: look again
            # Deliveries are in stream order, and the stream's last message is always its key's
            # last value: once it is handled, so is every first value.
            if state.messages == 0 or handled >= state.last_seq:
                self._caught_up(which)

    def _caught_up(self, which: str) -> None:
        if which in self._catching_up:
            self._catching_up.discard(which)
            if not self._catching_up:
                self.engine.put(DirectoryComplete())

    @staticmethod
    def _kv_entry(msg, prefix: str) -> tuple[str, int, bool]:
        return kv_entry(prefix, msg.subject, msg.headers, msg.metadata.sequence.stream)
