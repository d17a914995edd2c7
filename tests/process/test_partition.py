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

import pytest

from ctl.hosts import Hosts
from ctl.probe import LineClient
from helpers import line_client, require_nats, skip_or_fail
from testkit.partition import Netns, cut_and_heal, missing_for_partitions

#: Short, so that it lapses well within the partition; long enough that no healthy host's lapses
#: on a busy 2-core machine.
LEASE = 5.0
#: How long h2 stays cut off (a CI run; bench/partition.py holds it longer).
PARTITION = float(os.environ.get("PARTITION_SECONDS", "100"))
PARTITIONED = 2


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
