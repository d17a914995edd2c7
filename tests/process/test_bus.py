"""chatd.bus against real nats-server processes on loopback: exactly once, in order, nicks and leases.

Each test drives its Bus the way chatd's loop will: it waits on the Bus's
eventfd and takes :meth:`~chatd.bus.Bus.results`, never blocking on the
network. Most tests share one 3-node cluster (R3 stream and buckets) and keep
apart by host ids and nicks of their own; the node-kill test has a cluster of
its own. Every Bus and every nats-server is ended after each test, failed or not.
"""

from __future__ import annotations

import json
import select
import time
import uuid

import pytest

from chatd.bus.access import connect_options
from chatd.bus import (Bus, BusError, Claimed, Connected, Delivered, HostChanged, NickChanged, Published,
                       Released, Updated)
from ctl.launch import wait_until
from fdkeep.errors import Error

LEASE = 2.0  # seconds; every Bus on the shared cluster must use the same (it is the hosts bucket's TTL)


class Driver:
    """A Bus driven like chatd drives it: wait for its eventfd, take what came."""

    def __init__(self, bus: Bus):
        self.bus = bus
        self.seen: list = []
        self.arrived: dict[type, list[float]] = {}  # kind -> when each pump took some of it
        self._poll = select.poll()
        self._poll.register(bus.fileno(), select.POLLIN)

    def pump(self, timeout: float = 0.1) -> list:
        self._poll.poll(timeout * 1000)
        new = self.bus.results()
        self.seen.extend(new)
        now = time.monotonic()
        for kind in {type(result) for result in new}:
            self.arrived.setdefault(kind, []).append(now)
        return new

    def longest_silence(self, kind, start: float, end: float) -> float:
        """The longest time between ``start`` and ``end`` in which no result of ``kind`` came."""
        times = [start] + [t for t in self.arrived.get(kind, []) if start < t < end] + [end]
        return max(later - earlier for earlier, later in zip(times, times[1:]))

    def wait_for(self, predicate, timeout: float, what: str):
        """``predicate()``'s first true value, taking the bus's results meanwhile."""

        def step():
            value = predicate()
            if not value:
                self.pump(0.05)
            return value

        try:
            return wait_until(step, timeout, what, interval=0)
        except Error:
            errors = [r for r in self.seen if isinstance(r, BusError)]
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; bus status "
                                 f"{self.bus.status()}; its errors: {errors[-5:]}") from None

    def of(self, kind) -> list:
        """What came of ``kind``; of deliveries, those on this host's own subjects: a bus delivers
        every host's (chatd drops what is for no member of its own), and the tests share a cluster."""
        own = f"chat.{self.bus.host_id}."
        return [result for result in self.seen if isinstance(result, kind)
                and (kind is not Delivered or result.subject.startswith(own))]

    def ready(self, timeout: float = 20) -> "Driver":
        self.wait_for(lambda: self.bus.status()["ready"] and self.bus.status()["hosts_alive"], timeout,
                      "the bus to be ready")
        return self


@pytest.fixture
def buses():
    """``make(cluster, host_id, **options)`` -> a started Bus's Driver, with the host's credentials
    of the (secured) cluster; every Bus closed after the test."""
    made: list[Bus] = []

    def make(cluster, host_id: str, cursor: int = 0, ready: bool = True, **options) -> Driver:
        options.setdefault("host_lease", LEASE)
        bus = Bus(cluster.urls, host_id, **cluster.bus_options(host_id), **options)
        made.append(bus)
        driver = Driver(bus)
        bus.start(cursor)
        return driver.ready() if ready else driver

    yield make
    for bus in made:
        bus.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def nick_value(host: str, **more) -> bytes:
    return json.dumps({"host": host, **more}).encode()


def test_the_same_msg_id_is_stored_once(shared_cluster, buses):
    host = unique("dup")
    driver = buses(shared_cluster, host)
    driver.bus.publish("first", host, "bob", f"{host}:ann>bob:1", b"hello")
    driver.bus.publish("again", host, "bob", f"{host}:ann>bob:1", b"hello")
    driver.wait_for(lambda: len(driver.of(Published)) == 2 and driver.of(Delivered), 10, "two acks, a delivery")
    first, again = driver.of(Published)
    assert (first.token, first.duplicate) == ("first", False)
    assert (again.token, again.duplicate, again.seq) == ("again", True, first.seq)
    driver.pump(0.5)  # nothing more comes
    [delivered] = driver.of(Delivered)
    assert (delivered.seq, delivered.subject, delivered.payload) == (first.seq, f"chat.{host}.bob", b"hello")
    assert delivered.headers["Nats-Msg-Id"] == f"{host}:ann>bob:1"


def test_delivery_resumes_after_the_committed_cursor(shared_cluster, buses):
    """The crash-restart path: a new Bus from the journaled cursor gets exactly what came after it."""
    host, other = unique("cur"), unique("snd")
    first = buses(shared_cluster, host)
    for k in range(1, 11):
        first.bus.publish(k, host, "bob", f"{host}:{k}", b"m%d" % k)
    first.wait_for(lambda: len(first.of(Delivered)) == 10, 10, "ten deliveries")
    delivered = first.of(Delivered)
    assert [d.payload for d in delivered] == [b"m%d" % k for k in range(1, 11)]
    cursor = delivered[5].seq  # the test "committed" the sixth
    first.bus.close()

    sender = buses(shared_cluster, other)  # while the host is down, more arrive for it
    for k in range(11, 16):
        sender.bus.publish(k, host, "bob", f"{host}:{k}", b"m%d" % k)
    sender.wait_for(lambda: len(sender.of(Published)) == 5, 10, "five acks")

    second = buses(shared_cluster, host, cursor=cursor)
    second.wait_for(lambda: len(second.of(Delivered)) >= 9, 10, "nine deliveries")
    second.pump(0.5)
    again = second.of(Delivered)
    assert [d.payload for d in again] == [b"m%d" % k for k in range(7, 16)]
    assert [d.seq for d in again[:4]] == [d.seq for d in delivered[6:]]
    assert all(a.seq < b.seq for a, b in zip(again, again[1:]))
    assert second.bus.status()["last_delivered"] == again[-1].seq


def test_racing_hosts_each_win_a_nick_once_and_a_dead_hosts_nicks_come_free(shared_cluster, buses):
    left, right = unique("left"), unique("right")
    a = buses(shared_cluster, left)
    b = buses(shared_cluster, right)
    nicks = [unique("n") for _ in range(20)]
    for nick in nicks:  # both ask for every nick at once: twenty races
        a.bus.claim(("a", nick), nick, nick_value(left))
        b.bus.claim(("b", nick), nick, nick_value(right))
    for driver in (a, b):
        driver.wait_for(lambda: len(driver.of(Claimed)) == 20, 15, "twenty answers")
    winners = {}
    for driver, host in ((a, left), (b, right)):
        for claimed in driver.of(Claimed):
            if claimed.ok:
                assert claimed.nick not in winners, f"{claimed.nick} won twice"
                winners[claimed.nick] = (host, claimed.revision)
            else:
                assert claimed.holder in (left, right) and claimed.holder != host
    assert sorted(winners) == sorted(nicks)
    lefts = [nick for nick, (host, _) in winners.items() if host == left]
    rights = [nick for nick, (host, _) in winners.items() if host == right]

    # Release: a stale revision deletes nothing; the right one deletes.
    if rights:
        nick = rights[0]
        revision = winners[nick][1]
        b.bus.release(nick, revision + 1000)
        b.wait_for(lambda: b.of(Released), 10, "a refused release")
        assert b.of(Released)[-1] == Released(nick, False)
        b.bus.release(nick, revision)
        b.wait_for(lambda: len(b.of(Released)) == 2, 10, "a release")
        assert b.of(Released)[-1] == Released(nick, True)
        a.bus.claim("after-release", nick, nick_value(left))
        a.wait_for(lambda: [c for c in a.of(Claimed) if c.token == "after-release"], 10, "a claim")
        assert [c.ok for c in a.of(Claimed) if c.token == "after-release"] == [True]

    # While left lives, right cannot take its nicks; once left's lease expires, it can.
    if lefts:
        b.bus.claim("too-early", lefts[0], nick_value(right))
        b.wait_for(lambda: [c for c in b.of(Claimed) if c.token == "too-early"], 10, "a claim")
        assert [(c.ok, c.holder) for c in b.of(Claimed) if c.token == "too-early"] == [(False, left)]
    a.bus.close()
    b.wait_for(lambda: HostChanged(left, False) in b.of(HostChanged), LEASE * 3 + 5, f"{left}'s lease to expire")
    for nick in lefts:
        b.bus.claim(("late", nick), nick, nick_value(right))
    b.wait_for(lambda: len([c for c in b.of(Claimed) if c.token[0] == "late"]) == len(lefts), 10, "claims")
    assert all(c.ok and c.holder == right for c in b.of(Claimed) if c.token[0] == "late")


def test_a_host_takes_back_its_own_nicks_from_an_earlier_life(shared_cluster, buses):
    host = unique("self")
    first = buses(shared_cluster, host)
    first.bus.claim(1, "me-" + host[-8:], nick_value(host))
    first.wait_for(lambda: first.of(Claimed), 10, "a claim")
    [claimed] = first.of(Claimed)
    first.bus.close()  # its lease is still there: the restart comes at once

    second = buses(shared_cluster, host)
    second.bus.claim(2, "me-" + host[-8:], nick_value(host, target="bob"))
    second.wait_for(lambda: second.of(Claimed), 10, "a claim")
    [again] = second.of(Claimed)
    assert again.ok and again.revision > claimed.revision

    second.bus.update(3, "me-" + host[-8:], nick_value(host, target="eve"), claimed.revision)  # stale
    second.bus.update(4, "me-" + host[-8:], nick_value(host, target="eve"), again.revision)
    second.wait_for(lambda: len(second.of(Updated)) == 2, 10, "two updates")
    stale, fresh = second.of(Updated)
    assert (stale.token, stale.ok) == (3, False)
    assert (fresh.token, fresh.ok) == (4, True) and fresh.revision > again.revision


def test_watchers_see_other_hosts_nicks_and_leases(shared_cluster, buses):
    watcher_host, other_host = unique("watch"), unique("other")
    watcher = buses(shared_cluster, watcher_host)
    other = buses(shared_cluster, other_host)
    nick = unique("w")
    other.bus.claim(1, nick, nick_value(other_host))
    other.wait_for(lambda: other.of(Claimed), 10, "a claim")
    [claimed] = other.of(Claimed)
    assert claimed.ok
    watcher.wait_for(lambda: [c for c in watcher.of(NickChanged) if c.nick == nick], 10, "the nick's change")
    assert HostChanged(other_host, True) in watcher.of(HostChanged)
    other.bus.release(nick, claimed.revision)
    watcher.wait_for(lambda: len([c for c in watcher.of(NickChanged) if c.nick == nick]) == 2, 10, "the release")
    changes = [c for c in watcher.of(NickChanged) if c.nick == nick]
    assert changes[0] == NickChanged(nick, nick_value(other_host), claimed.revision)
    assert changes[1].value is None and changes[1].revision > claimed.revision
    other.bus.close()
    watcher.wait_for(lambda: HostChanged(other_host, False) in watcher.of(HostChanged), LEASE * 3 + 5,
                     "the other host's lease to expire")


def test_bad_arguments_raise_at_once(shared_cluster, buses):
    host = unique("args")
    driver = buses(shared_cluster, host, ready=False)
    with pytest.raises(Error, match="cannot be part of a NATS subject"):
        driver.bus.publish(1, host, "bob.evil", "id", b"x")
    with pytest.raises(Error, match="JSON object"):
        driver.bus.claim(1, "nick", b'{"host": "someone-else"}')
    with pytest.raises(Error, match="revision"):
        driver.bus.release("nick", 0)
    driver.bus.close()
    with pytest.raises(Error, match="closed"):
        driver.bus.publish(1, host, "bob", "id", b"x")


def test_unreachable_at_start_is_said_and_the_bus_connects_when_a_server_comes(nats_cluster_factory, buses):
    cluster = nats_cluster_factory(nodes=1, start=False)
    driver = buses(cluster, unique("late"), ready=False)
    driver.wait_for(lambda: [e for e in driver.of(BusError) if e.code == "unreachable"], 10, "a BusError")
    error = [e for e in driver.of(BusError) if e.code == "unreachable"][0]
    assert cluster.urls[0] in error.message and "Fix:" in error.message and not error.fatal
    assert driver.bus.status()["connected"] is None
    host = driver.bus.host_id
    driver.bus.publish(1, host, "bob", "early", b"queued while nothing ran")
    cluster.start()
    driver.ready(15)
    driver.wait_for(lambda: driver.of(Published) and driver.of(Delivered), 10, "the early publish")
    assert driver.of(Connected)[0].server == cluster.urls[0]
    assert driver.of(Delivered)[0].payload == b"queued while nothing ran"
    assert driver.bus.status()["replicas"] == 1


def test_a_stream_the_server_made_without_what_matters_is_a_fatal_error(nats_cluster_factory, buses):
    """A stream another host (or an older chatd) made with a short duplicate window is refused, loudly."""
    import asyncio

    import nats
    from nats.js import api

    cluster = nats_cluster_factory(nodes=1)

    async def make_bad_stream():
        connection = await nats.connect(cluster.urls, **connect_options("maker", **cluster.bus_options("maker")))
        try:
            await connection.jetstream().add_stream(api.StreamConfig(
                name="CHATD", subjects=["chat.>"], storage=api.StorageType.FILE, duplicate_window=5))
        finally:
            await connection.close()

    asyncio.run(make_bad_stream())
    driver = buses(cluster, unique("bad"), ready=False)
    driver.wait_for(lambda: [e for e in driver.of(BusError) if e.fatal], 10, "a fatal BusError")
    [error] = [e for e in driver.of(BusError) if e.fatal]
    assert error.code == "bad-stream" and "duplicate window is 5 s" in error.message and "Fix:" in error.message
    assert driver.bus.status()["failed"] == error.message and not driver.bus.status()["ready"]


def test_no_message_lost_or_repeated_across_killed_nats_nodes(nats_cluster_factory, buses):
    """R3: kill the node holding the delivery consumer, then the stream leader, then the client's node.

    A Bus publishes numbered messages to itself (4 receivers) all along. After
    each kill the two nodes left must carry on (publishes acked and delivered
    again) before the killed node comes back. At the end each message must have
    been delivered exactly once, each receiver's in order, and the stream must
    hold each exactly once (read again from the start by a new Bus).
    """
    cluster = nats_cluster_factory(nodes=3)
    host = unique("kill")
    driver = buses(cluster, host)
    receivers = [f"r{i}" for i in range(4)]
    sent = 0
    began = time.monotonic()

    def keep_publishing() -> None:
        """Paced (1,000 a second, at most 200 unacked), so that the test's own tally stays quick."""
        nonlocal sent
        while sent - len(driver.of(Published)) < 200 and sent < (time.monotonic() - began) * 1000:
            sent += 1
            driver.bus.publish(sent, host, receivers[sent % len(receivers)], f"{host}:{sent}", b"%d" % sent)

    def run_until(predicate, timeout: float, what: str) -> None:
        def step():
            keep_publishing()
            return predicate()
        driver.wait_for(step, timeout, what)

    recoveries = []
    consumers_while_down: dict[int, dict[str, int]] = {}

    def kill_and_restart(index: int, why: str) -> int:
        """Kill node ``index``; once a message sent after the kill is delivered, start it again."""
        killed_at, last_before = time.monotonic(), sent
        cluster.kill(index)
        # 2.9's raft elections wait 4 to 9 s before a stream or meta leader is chosen anew.
        run_until(lambda: any(int(d.payload) > last_before for d in driver.of(Delivered)[-50:]), 25,
                  f"delivery to go on with n{index} ({why}) dead")
        recoveries.append(f"n{index} ({why}) {time.monotonic() - killed_at:.1f} s")
        consumers_while_down[index] = cluster.consumer_nodes("CHATD")  # the node back may list its old ones
        # Back and healthy (current with the meta group) before the next kill: two nodes down
        # at once is a lost quorum, which R3 does not promise to survive.
        cluster.restart(index, wait=True)
        return index

    run_until(lambda: len(driver.of(Delivered)) > 300, 10, "a first flow")
    consumers = cluster.consumer_nodes("CHATD")
    assert len(consumers) == 1, f"one delivery consumer expected, the cluster has {consumers}"
    [(consumer, consumer_node)] = consumers.items()
    kill_and_restart(consumer_node, "the consumer's")
    remade = consumers_while_down[consumer_node]
    assert remade and consumer not in remade, f"the ordered consumer was not remade: {remade}"
    kill_and_restart(cluster.stream_leader("CHATD"), "stream leader")
    connected = driver.wait_for(lambda: driver.bus.status()["connected"], 15, "a connection")
    kill_and_restart(cluster.node_of(connected), "the client's")
    more_until = time.monotonic() + 1
    run_until(lambda: time.monotonic() > more_until, 5, "a second more of traffic")

    driver.wait_for(lambda: len(driver.of(Published)) == sent, 30, f"all {sent} acks")
    driver.wait_for(lambda: len(driver.of(Delivered)) >= sent, 30, f"all {sent} deliveries")
    driver.pump(0.5)
    delivered = driver.of(Delivered)
    numbers = [int(d.payload) for d in delivered]
    assert len(numbers) == sent and sorted(numbers) == list(range(1, sent + 1)), "lost or repeated"
    assert all(a.seq < b.seq for a, b in zip(delivered, delivered[1:])), "out of stream order"
    for receiver in receivers:
        mine = [int(d.payload) for d in delivered if d.subject.endswith("." + receiver)]
        assert mine == sorted(mine), f"{receiver}'s messages out of order"
    acked = {p.token: p.seq for p in driver.of(Published)}
    assert {d.seq: int(d.payload) for d in delivered} == {seq: token for token, seq in acked.items()}
    assert sent > 200, f"only {sent} sent: the test did not test much"

    reader = buses(cluster, host)  # everything again, from the stream itself
    reader.wait_for(lambda: len(reader.of(Delivered)) >= sent, 30, "the stream read again")
    reader.pump(0.5)
    assert [int(d.payload) for d in reader.of(Delivered)] == numbers
    print(f"{sent} messages; delivery went on after killing {', '.join(recoveries)}; "
          f"errors said: {sorted({e.code for e in driver.of(BusError)})}")
