"""A chatd host cut off from NATS by a real firewall rule, under load, then healed: exactly once.

Three hosts over a 3-node NATS cluster (ctl.hosts.Hosts); h2 runs in a network namespace
of its own (testkit.partition.Netns), its clients connecting to it over a veth. The
partition is an nftables rule in that namespace dropping, silently, every packet to and from
the NATS ports: no process is killed, the clients' connections to h2 stay up. The rule is
held well past the host lease, so h2 fences itself (its clients are told ``ERR moved`` and
move to h0 and h1), then deleted; everything each client sent must arrive once (see
testkit.partition for the accounting). The namespace, its veth and its rules, and every
process, are gone after the test, failed or not.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

import pytest

from ctl.hosts import Hosts
from ctl.probe import LineClient
from ctl.launch import wait_until
from helpers import line_client, require_nats, skip_or_fail
from testkit.partition import Netns, cut_and_heal, missing_for_partitions

#: Short, so that it lapses well within the partition; long enough that no healthy host's lapses
#: on a busy 2-core machine.
LEASE = 5.0
#: How long h2 stays cut off (a CI run; bench/partition.py holds it longer).
PARTITION = float(os.environ.get("PARTITION_SECONDS", "100"))
PARTITIONED = 2


def healthz(address: str, port: int) -> tuple[int, bytes]:
    """chatd's answer to a load balancer's probe: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/healthz", timeout=15) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as answer:
        return answer.code, answer.read()


@pytest.fixture
def partitioned(tmp_path, request):
    require_nats()
    missing = missing_for_partitions()
    if missing:
        skip_or_fail(f"needs {missing}", "the partition test")
    netns = Netns()
    cluster = None
    try:
        netns.create()
        cluster = Hosts(3, 3, lease=LEASE, workdir=str(tmp_path / "hosts"), nats_host=netns.outer,
                        placement={PARTITIONED: (netns.inner, netns.prefix)})
        cluster.start()
        yield netns, cluster
    finally:
        if cluster is not None:
            if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
                print(cluster.logs(nats_tail=3000)[-80000:])
            cluster.close()
        netns.close()
    assert netns.leftovers() == [], "the namespace and its veth are gone"


def test_a_host_cut_off_from_nats_under_load_fences_itself_and_loses_nothing(partitioned):
    netns, cluster = partitioned
    outcome = cut_and_heal(netns, cluster, PARTITIONED, PARTITION)
    tally = outcome.tally
    print(outcome.lines(PARTITION, LEASE))
    for index, host in enumerate(cluster.hosts):
        assert host.chatd.poll() is None and host.holderd.poll() is None, f"h{index}'s daemons are up"
    assert tally.problems() == 0, (tally.row(), tally.notes)
    # Fenced once the lease may have lapsed (a quarter of it, the renewal period, before at the earliest,
    # with the margin), not at the first put that failed; tests/unit/test_bus_lease.py checks the bound.
    assert outcome.fenced_after is not None and outcome.fenced_after > LEASE / 2, outcome.fenced_after
    assert tally.moved == outcome.moved_expected, "every client of the cut-off host was told to move, once"
    assert outcome.at_heal["moved"] == tally.moved, "... while it was cut off"
    assert tally.resent > 0, "the cut-off host held its clients back: what it had not handled was sent again"
    assert tally.held > 0 and tally.held_arrived == tally.held, \
        "what the cut-off host handled and had not published came when it was back"
    assert tally.received > outcome.at_heal["received"] + tally.held, "the pairs went on after the heal"
    status = cluster.status(PARTITIONED)["cluster"]
    assert status["connected"] and not status["fenced"] and status["moved"] == tally.moved
    # It serves again: a new pair across it and h0.
    ann = LineClient(cluster.ports[PARTITIONED], timeout=15, host=netns.inner)
    ann.send("NICK ann", "PAIR bob")
    assert ann.lines(2) == ["OK NICK ann", "OK PAIR bob"]
    bob = line_client(cluster.ports[0], "bob", "ann", timeout=15)
    assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
    ann.send("MSG back again")
    assert bob.line() == "FROM ann 1 back again"
    bob.send("MSG welcome")
    assert ann.line() == "FROM bob 1 welcome"


def test_a_session_of_a_cut_off_host_resumed_elsewhere_is_served_there_alone_once_the_host_is_back(partitioned):
    """Fencing, with a session (issue 24): ann's host h2 is cut off from NATS; once its lease may
    have lapsed it closes her connection (her session waits), and she resumes on h1, which takes
    the session over (its entry written with the revision it read: the fence). When h2 is back it
    learns the session moved (the directory shows ann on h1) and lets go of it: it neither serves
    nor counts anything for her; ann and bob chat on, every message once, n going on."""
    netns, cluster = partitioned
    ann = LineClient(cluster.ports[PARTITIONED], timeout=15, host=netns.inner)
    ann.send("NICK ann", "PAIR bob", "SESSION")
    assert ann.lines(2) == ["OK NICK ann", "OK PAIR bob"]
    words = ann.line().split()
    assert words[0] == "SESSION" and words[2] == "0", words
    token = words[1]
    bob = line_client(cluster.ports[0], "bob", "ann", timeout=15)
    assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
    ann.send("MSG one")
    assert bob.line() == "FROM ann 1 one"
    bob.send("MSG hello")
    assert ann.line() == "FROM bob 1 hello"
    ann.send("ACK 1")
    assert ann.line() == "HANDLED 1"

    netns.cut([node.client_port for node in cluster.nats.nodes])
    try:
        ann.sock.settimeout(LEASE * 6)
        with pytest.raises((EOFError, ConnectionError)):
            ann.line()  # closed by h2 once fenced: nothing else comes first
        assert cluster.status(PARTITIONED)["cluster"]["fenced"]
        status, reason = healthz(netns.inner, cluster.hosts[PARTITIONED].http_port)
        assert status == 503 and reason.startswith(b"fenced for "), "a load balancer sends new clients elsewhere"
        again = LineClient(cluster.ports[1], timeout=30)
        again.send(f"RESUME {token} 1")
        assert again.line() == "RESUMED ann bob 1", "taken over on h1: nick, peer, what was handled"
        again.send("MSG two")
        assert bob.line() == "FROM ann 2 two"
        bob.send("MSG and on h1")
        assert again.line() == "FROM bob 2 and on h1"
    finally:
        netns.heal()

    def let_go() -> bool:
        status = cluster.status(PARTITIONED)
        nicks = [client["nick"] for client in cluster.hosts[PARTITIONED].control("clients")["clients"]]
        return not status["cluster"]["fenced"] and "ann" not in nicks

    wait_until(let_go, 120, "h2 to be back and to have let go of ann's session")
    assert healthz(netns.inner, cluster.hosts[PARTITIONED].http_port) == (200, b"ok\n"), "back in the balance"
    again.send("MSG three")
    assert bob.line() == "FROM ann 3 three", "nothing of ann's came twice, nothing went missing"
    bob.send("MSG done")
    assert again.line() == "FROM bob 3 done"
    again.send("ACK 3")
    assert again.line() == "HANDLED 3", "h1 counts ann's commands: h2's write of her entry would fail"
    for client in (ann, again, bob):
        client.close()
