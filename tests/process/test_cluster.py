"""chatd hosts paired across hosts through a real 3-node NATS JetStream cluster on loopback.

Each host is a chatd with its own holderd, journal and port (ctl.hosts.Hosts); the
clients of a pair connect to different hosts. Crashes are real signals to chatd
and to nats-server nodes; every process is ended after each test, failed or not.
"""

from __future__ import annotations

import random
import re
import signal
import time

import pytest

from testkit import soak
from ctl.hosts import Hosts
from ctl.launch import wait_until
from ctl.probe import LineClient, WebSocketClient
from helpers import line_client, previous_release, require_nats

LEASE = 2.0
#: The fault tests' lease: longer than a NATS leader election (4-9 s on 2.9) after a node
#: is killed, so that no live host is taken for dead meanwhile.
SOAK_LEASE = 20.0


@pytest.fixture
def hosts(tmp_path, request):
    require_nats()
    made: list[Hosts] = []

    def make(count: int = 3, lease: float = LEASE, env: dict | None = None, **kwargs) -> Hosts:
        cluster = Hosts(count, 3, lease=lease, workdir=str(tmp_path / f"hosts{len(made)}"), **kwargs)
        made.append(cluster)
        return cluster.start(env=env)

    yield make
    for cluster in made:
        if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
            print(cluster.logs()[-30000:])
        cluster.close()


def client(port: int, nick: str, pair: str | None = None) -> LineClient:
    return line_client(port, nick, pair, timeout=15)


def test_a_pair_across_two_hosts_chats_like_a_local_one(hosts):
    cluster = hosts(2)
    ann = client(cluster.ports[0], "ann", "bob")
    bob = client(cluster.ports[1], "bob", "ann")
    assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
    ann.send("MSG hello", "MSG across")
    assert bob.lines(2) == ["FROM ann 1 hello", "FROM ann 2 across"]
    bob.send("MSG back")
    assert ann.line() == "FROM bob 1 back"
    bob.send("WHO")
    who = []
    while (line := bob.line()) != "END":
        who.append(line)
    assert sorted(who) == ["USER ann bob", "USER bob ann"], "WHO lists members of every host"
    status = cluster.status(0)["cluster"]
    assert status["host"] == "h0" and "h1" in status["hosts_alive"] and status["bus"]["replicas"] == 3


def test_a_cluster_host_restored_on_request_joins_the_cluster_and_chats_on(hosts):
    """--cluster goes with --restore --wait: `chatctl restore` begins serving the one way every
    start does (chatd.lifecycle), so the host joins the cluster and its pair across hosts goes on."""
    cluster = hosts(2)
    ann = client(cluster.ports[0], "ann", "bob")
    bob = client(cluster.ports[1], "bob", "ann")
    assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
    ann.send("MSG before")
    assert bob.line() == "FROM ann 1 before"
    cluster.hosts[0].chatd.send_signal(signal.SIGKILL)
    cluster.hosts[0].chatd.wait(20)
    cluster.restart_chatd(0, "--wait", wait=True)
    assert cluster.status(0)["role"] == "waiting"
    ann.send("MSG while it waits")
    summary = cluster.hosts[0].control("restore")
    assert summary["ok"] and summary["clients"] == 1
    assert bob.line() == "FROM ann 2 while it waits"
    bob.send("MSG back")
    assert ann.line() == "FROM bob 1 back"
    wait_until(lambda: cluster.status(0)["cluster"]["connected"], 15, "h0 to be connected to NATS again")
    assert cluster.status(0)["role"] == "serving"


def test_a_web_client_and_a_line_client_on_two_hosts_chat_through_a_crash(hosts):
    cluster = hosts(2)
    page = WebSocketClient(cluster.hosts[0].http_port)
    page.send({"type": "nick", "name": "wanda"}, {"type": "pair", "peer": "lee"})
    assert [m["type"] for m in page.messages(2)] == ["ok", "ok"]
    lee = client(cluster.ports[1], "lee", "wanda")
    assert lee.line() == "PAIRED wanda" and page.messages(1)[0] == {"type": "paired", "peer": "lee"}
    page.send({"type": "msg", "text": "from the page"})
    assert lee.line() == "FROM wanda 1 from the page"
    cluster.hosts[0].chatd.send_signal(signal.SIGSEGV)
    cluster.hosts[0].chatd.wait(20)
    cluster.restart_chatd(0, wait=True)
    lee.send("MSG to the page")
    assert page.messages(1) == [{"type": "from", "from": "lee", "n": 1, "text": "to the page"}]
    page.send({"type": "msg", "text": "after the crash"})
    assert lee.line() == "FROM wanda 2 after the crash", "n counts on across hosts and the crash"


def test_a_nick_is_unique_across_hosts_under_a_race(hosts):
    cluster = hosts(3)
    rounds = 10
    for round_number in range(rounds):
        racers = [LineClient(port, timeout=15) for port in cluster.ports]
        for racer in racers:
            racer.send(f"NICK racer{round_number}")
        answers = [racer.line() for racer in racers]
        assert sorted(answers) == sorted([f"OK NICK racer{round_number}"] + ["ERR nick-taken"] * 2), answers
        for racer in racers:
            racer.close()


def test_a_dead_hosts_nicks_come_free_after_its_lease(hosts):
    cluster = hosts(2)
    ann = client(cluster.ports[0], "ann", "bob")
    bob = client(cluster.ports[1], "bob", "ann")
    assert bob.line() == "PAIRED ann"
    taker = LineClient(cluster.ports[1], timeout=15)
    taker.send("NICK ann")
    assert taker.line() == "ERR nick-taken"
    # Host h0 is lost whole (chatd and holderd: its clients' connections end).
    for proc in (cluster.hosts[0].chatd, cluster.hosts[0].holderd):
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    lost = time.monotonic()
    wait_until(lambda: bob.line().startswith("UNPAIRED"), LEASE * 6, "bob to hear his peer's host is gone")
    freed = time.monotonic() - lost

    def taken() -> bool:
        taker.send("NICK ann")
        return taker.line() == "OK NICK ann"

    wait_until(taken, LEASE * 6, "h0's nick to come free")
    print(f"h0's members left the room {freed:.1f} s after it died (lease {LEASE} s)")
    ann.close()


def kill_some_host(cluster: Hosts):
    def crash(rng: random.Random) -> None:
        index = rng.randrange(len(cluster.hosts))
        chatd = cluster.hosts[index].chatd
        chatd.send_signal(rng.choice((signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)))
        chatd.wait(20)
        cluster.restart_chatd(index)

    return crash


def cluster_soak(cluster: Hosts, crashes: int) -> soak.Tally:
    """20 pairs stream, half of them with both clients on one host (their messages go through
    the stream too) and half across two hosts, while ``crashes`` random chatd kills land on
    random hosts; a third of the way in a NATS node is killed, two thirds in it is started again."""
    kill_chatd = kill_some_host(cluster)
    done = []
    node = random.Random(crashes).randrange(len(cluster.nats.nodes))

    def crash(rng: random.Random) -> None:
        kill_chatd(rng)
        done.append(1)
        if len(done) == crashes // 3:
            cluster.nats.kill(node)
        elif len(done) == 2 * crashes // 3:
            cluster.nats.restart(node, wait=False)

    # Each port twice: pair i's clients land on ports[i] and ports[i + 1] (testkit.soak.Traffic).
    ports = [port for port in cluster.ports for _ in (0, 1)]
    return soak.run(ports, pairs=20, crashes=crashes, crash=crash, interval=(0.05, 0.3), settle=120)


def test_pairs_on_a_host_and_across_hosts_stream_exactly_once_through_fifty_chatd_kills_and_a_nats_node_kill(hosts):
    cluster = hosts(3, lease=SOAK_LEASE)
    tally = cluster_soak(cluster, crashes=50)
    print("cluster fault test:", tally.row())
    assert tally.crashes == 50 and tally.sent > 1000
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


def test_sessions_resume_on_their_hosts_exactly_once_through_chatd_kills_and_cut_connections(hosts):
    """Sessions in a cluster: every client has one, connections are cut (reset, closed, gone
    silent) and the clients resume on the host that holds their session, while chatd is killed
    on random hosts. A resumed session's forwards not yet in the stream go on from its new
    connection, ahead of what it sends there (they once went beside it, out of order, and its
    receiver dropped them as seen)."""
    cluster = hosts(3, lease=SOAK_LEASE)
    kill_chatd = kill_some_host(cluster)
    ports = [port for port in cluster.ports for _ in (0, 1)]
    tally = soak.run(ports, pairs=10, crashes=20, crash=kill_chatd, interval=(0.05, 0.3), settle=120,
                     sessions=True, cuts=60)
    print("cluster sessions test:", tally.row())
    assert tally.crashes == 20 and tally.resumes >= 60 and tally.sent > 1000
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


@pytest.mark.parametrize("switch", ["--no-outbox", "--no-cursor"])
def test_the_cluster_fault_test_sees_loss_without_the_outbox_or_the_cursor(hosts, switch):
    cluster = hosts(3, lease=SOAK_LEASE, chatd_args=(switch,))
    tally = cluster_soak(cluster, crashes=30)
    print(f"cluster fault test with {switch}:", tally.row())
    assert tally.lost + tally.garbled + tally.n_gaps + tally.repeated > 0, "the fault test must be able to fail"


def test_a_rolling_upgrade_from_the_previous_release_across_hosts_loses_nothing(hosts, tmp_path):
    """Three hosts start on the previous release (out of git history, its holderd and chatd);
    pairs stream across hosts; each host's chatd in turn is stopped (SIGTERM) and started on
    this release with --restore, one host at a time, so that releases are mixed meanwhile
    (forwards, directory entries and host leases of both read by both). holderd stays the
    previous release's: what it keeps is taken over by this release's chatd. The cluster is an
    open one, as the previous release's was (it knows no --nats-creds): a site secures its
    cluster once every host runs a release that does (README, "Security across hosts")."""
    version, old_tree = previous_release(tmp_path / "previous")
    cluster = hosts(3, lease=SOAK_LEASE, env={"PYTHONPATH": str(old_tree)}, secure=False)
    upgraded = []

    def upgrade_next_host(rng: random.Random) -> None:
        index = len(upgraded)
        old_chatd = cluster.hosts[index].chatd
        old_chatd.send_signal(signal.SIGTERM)
        assert old_chatd.wait(20) == 0, f"h{index}'s chatd {version} stops cleanly on SIGTERM"
        cluster.restart_chatd(index, wait=True)
        assert cluster.status(index)["role"] == "serving"
        upgraded.append(cluster.hosts[index].chatd)

    tally = soak.run(cluster.ports, pairs=10, crashes=3, crash=upgrade_next_host, interval=(1.5, 3.0), settle=60)
    print(f"rolling upgrade from {version} across hosts:", tally.row())
    assert tally.crashes == 3 and tally.sent > 200
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent
    restored = 0
    for index, chatd in enumerate(upgraded):
        with open(cluster.hosts[index].log_path(chatd), errors="replace") as log:
            said = log.read()
        took = re.search(r"restored (\d+) clients", said)
        assert took and "held journal unusable" not in said, said
        restored += int(took.group(1))
        status = cluster.status(index)
        assert status["pid"] == chatd.pid and status["role"] == "serving" and status["cluster"]["connected"]
    assert restored == 20, "each host's clients taken over by this release, none dropped"
