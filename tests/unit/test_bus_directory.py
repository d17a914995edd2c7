"""The directory's watch knows when it has a bucket's first values, even if the delivery that
says "nothing pending" never comes (a consumer remade while a new stream elects its leader);
a nick change says which hosts' leases were lapsing when it was stored."""

import asyncio
import datetime
from types import SimpleNamespace

import nats.errors
import nats.js.errors

from chatd.bus import directory as directory_module
from chatd.bus.directory import Directory
from chatd.bus.results import DirectoryComplete, NickChanged


class FakeEngine:
    def __init__(self, stream_state, deliveries):
        self.settings = SimpleNamespace(nick_bucket="nicks", host_bucket="hosts", host_id="h0", host_lease=4.0)
        self.gauges = SimpleNamespace()
        self.ready = asyncio.Event()
        self.put_results = []
        self._state = stream_state
        self._deliveries = deliveries

        async def stream_info(name):
            return SimpleNamespace(state=SimpleNamespace(**self._state[name]))

        self.js = SimpleNamespace(stream_info=stream_info)

    def spawn(self, coroutine):
        return asyncio.get_running_loop().create_task(coroutine)

    def put(self, result):
        self.put_results.append(result)

    def say(self, code, message, fatal=False):
        pass

    async def follow(self, subject, stream, callback, config):
        for seq, pending in self._deliveries.get(stream, ()):
            await callback(message(subject[:-1] + f"k{seq}", seq, pending))


def message(subject, seq, pending, stored=0.0):
    """A KV bucket's message as nats-py gives it; ``stored``: when NATS stored it (epoch seconds)."""
    return SimpleNamespace(subject=subject, headers=None, data=b"{}",
                           metadata=SimpleNamespace(sequence=SimpleNamespace(stream=seq), num_pending=pending,
                                                    timestamp=datetime.datetime.fromtimestamp(
                                                        stored, datetime.timezone.utc)))


def complete(engine, timeout=5.0):
    async def run():
        directory = Directory(engine)
        tasks = [asyncio.create_task(directory.watch_nicks()), asyncio.create_task(directory.watch_hosts())]
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout)
        except asyncio.TimeoutError:
            pass
        for task in tasks:
            task.cancel()
        return any(isinstance(result, DirectoryComplete) for result in engine.put_results)

    return asyncio.run(run())


def test_complete_from_the_delivery_with_nothing_pending(monkeypatch):
    monkeypatch.setattr(directory_module, "CATCH_UP_LOOK", 60.0)  # the look must not be what ends it
    engine = FakeEngine({"KV_nicks": {"messages": 2, "last_seq": 7}, "KV_hosts": {"messages": 0, "last_seq": 3}},
                        {"KV_nicks": [(4, 1), (7, 0)]})
    assert complete(engine, timeout=1.0)


def test_complete_when_the_last_delivery_said_something_was_pending(monkeypatch):
    """The consumer was remade: the message with nothing pending after it was never delivered,
    but the stream's last message was handled."""
    monkeypatch.setattr(directory_module, "CATCH_UP_LOOK", 0.05)
    engine = FakeEngine({"KV_nicks": {"messages": 2, "last_seq": 7}, "KV_hosts": {"messages": 1, "last_seq": 2}},
                        {"KV_nicks": [(4, 1), (7, 1)], "KV_hosts": [(2, 3)]})
    assert complete(engine)


def test_not_complete_while_the_streams_last_message_is_unread(monkeypatch):
    monkeypatch.setattr(directory_module, "CATCH_UP_LOOK", 0.05)
    engine = FakeEngine({"KV_nicks": {"messages": 2, "last_seq": 9}, "KV_hosts": {"messages": 0, "last_seq": 0}},
                        {"KV_nicks": [(4, 1), (7, 1)]})
    assert not complete(engine, timeout=0.5)


def test_a_nick_change_names_the_hosts_alive_whose_lease_went_unrenewed_for_a_lease_before_it():
    """Measured in NATS's times (the lease 4 s): h1 last renewed 4 s before the change and its key
    is gone (the change may be a claim of its nick); h2 2.5 s before (alive for all NATS knew:
    only a session taken over moves a nick of it); h3's lease was deleted; h4's last put seen
    here is as old as h1's, but its key is there (this host's watch of the leases fell behind)."""
    engine = FakeEngine({}, {})
    directory = Directory(engine)

    async def get(host):
        if host == "h1":
            raise nats.js.errors.KeyNotFoundError()
        return SimpleNamespace(key=host, revision=1)

    directory.hosts = SimpleNamespace(get=get)

    async def run():
        await directory._on_host(message("$KV.hosts.h1", 1, 0, stored=1000.0))
        await directory._on_host(message("$KV.hosts.h2", 2, 0, stored=1001.5))
        await directory._on_host(message("$KV.hosts.h3", 3, 0, stored=999.0))
        await directory._on_host(message("$KV.hosts.h4", 4, 0, stored=999.5))
        deleted = message("$KV.hosts.h3", 5, 0, stored=1001.0)
        deleted.headers = {"KV-Operation": "DEL"}
        await directory._on_host(deleted)
        await directory._on_nick(message("$KV.nicks.bob", 9, 0, stored=1004.0))

    asyncio.run(run())
    [change] = [result for result in engine.put_results if isinstance(result, NickChanged)]
    assert change.nick == "bob" and change.lapsing == frozenset({"h1"})


def test_a_lease_put_that_failed_is_tried_again_soon_not_a_quarter_lease_later():
    """A NATS node's death leaves the hosts bucket without a leader for seconds: each put then
    fails, and trying again a quarter lease after each failure left a host unleased for half its
    lease and more (and a chatd killed meanwhile, for longer: other hosts counted it dead)."""
    engine = FakeEngine({}, {})
    engine.settings.host_lease = 4.0  # a put every second while they succeed
    puts = []

    async def publish(subject, value, timeout):
        puts.append(asyncio.get_running_loop().time())
        if len(puts) in (2, 3):
            raise nats.errors.NoRespondersError  # the bucket's stream has no leader for now

    engine.js.publish = publish

    async def run():
        directory = Directory(engine)
        task = asyncio.create_task(directory.keep_lease())
        await asyncio.sleep(1.9)
        task.cancel()
        return directory

    directory = asyncio.run(run())
    assert len(puts) == 4, puts  # renewed, failed twice (each tried again soon), renewed
    assert puts[1] - puts[0] >= 0.9  # a quarter lease after a put that succeeded
    assert puts[3] - puts[1] < 3 * directory_module.LEASE_RETRY
    assert directory._leased.is_set()
