"""chatd hosts behind a real HAProxy (Debian's haproxy, ctl.haproxy): one address for every client.

Three chatd hosts (each its own holderd and journal) over a real 3-node NATS
JetStream cluster, a real haproxy in front with the configuration the README
shows (faster checks, so that the test is short). Clients connect to HAProxy's
two ports only: line clients, `chatctl client` as a process, a WebSocket like
the page's, and /healthz. A host is lost whole (its chatd and holderd
SIGKILLed): HAProxy's checks of chatd's /healthz take it out (its stats socket
says DOWN, its log says why); a client with a session (`chatctl client`) resumes
it through the same address on a live host (chatd.keeper) and chats on, and one
without comes back as a new client. The fault test streams 20 pairs with
sessions through HAProxy while hosts are lost whole, chatd is killed and a NATS
node dies; the same test with ``--direct-same-host`` must see loss.
Where the test needs a client on a given host, it drains the other hosts
for that one connection through HAProxy's admin socket (``set server …
state drain``), as an operator steers traffic; the hosts are all ``ready``
again before the loss. Every process is ended after the test, failed or not.
"""

from __future__ import annotations

import random
import signal
import time
import types
import urllib.request

import pytest

from ctl.haproxy import LINE_BACKEND, WEB_BACKEND, HAProxy
from ctl.hosts import Hosts
from ctl.launch import wait_until
from ctl.probe import LineClient, WebSocketClient
from haproxied import FALL, INTER_MS, LEASE, TIMEOUT, host_of, hosts_behind_haproxy, only
from helpers import line_client
from test_lineclient import ClientProcess
from testkit import soak

#: The fault test's lease: long, so that a storm of kills never lets a live host's lease lapse.
SOAK_LEASE = 20.0


@pytest.fixture
def behind_haproxy(tmp_path, request):
    with hosts_behind_haproxy(tmp_path, request) as both:
        yield both


@pytest.fixture
def soak_behind_haproxy(tmp_path, request):
    """As behind_haproxy, with a long lease (a storm of kills never lets a live host's lease lapse);
    ``request.param``: more chatd options."""
    with hosts_behind_haproxy(tmp_path, request, lease=SOAK_LEASE, chatd_args=getattr(request, "param", ())) as both:
        yield both


def through(proxy: HAProxy, nick: str, pair: str | None = None) -> LineClient:
    return line_client(proxy.line_port, nick, pair, timeout=TIMEOUT)


def healthz(proxy: HAProxy) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.web_port}/healthz", timeout=TIMEOUT) as response:
        return response.status, response.read()


def page(proxy: HAProxy, nick: str, pair: str) -> WebSocketClient:
    """A WebSocket to /ws through HAProxy's web port, as the page opens it, named and paired."""
    socket = WebSocketClient(proxy.web_port, timeout=TIMEOUT)
    socket.send({"type": "nick", "name": nick}, {"type": "pair", "peer": pair})
    assert [m["type"] for m in socket.messages(2)] == ["ok", "ok"]
    return socket


def first_messages_both_ways(clients, carl_says: str, dana_says: str, wanda_says: str, lee_says: str) -> None:
    """carl (a chatctl client) and dana, wanda (a page's WebSocket) and lee: each pair's first
    message each way arrives, numbered 1."""
    carl, dana, wanda, lee = clients
    carl.type(carl_says)
    assert dana.line() == f"FROM carl 1 {carl_says}"
    dana.send(f"MSG {dana_says}")
    carl.wait_for_count(f"FROM dana 1 {dana_says}", 1, timeout=TIMEOUT)
    wanda.send({"type": "msg", "text": wanda_says})
    assert lee.line() == f"FROM wanda 1 {wanda_says}"
    lee.send(f"MSG {lee_says}")
    assert wanda.messages(1) == [{"type": "from", "from": "lee", "n": 1, "text": lee_says}]

def test_clients_chat_through_haproxy_and_come_back_through_it_to_a_live_host_after_a_host_is_lost(
        behind_haproxy):
    cluster, proxy = behind_haproxy
    wanda_again = None
    assert healthz(proxy) == (200, b"ok\n"), "chatd's /healthz answers through HAProxy's web port"
    chatctl_env = types.SimpleNamespace(port=proxy.line_port, env=cluster.hosts[0].env)

    # On h0, the host to be lost: carl (`chatctl client`, a process) and wanda (a page's WebSocket).
    with only(proxy, LINE_BACKEND, 0):
        carl = ClientProcess(chatctl_env, "pipe", "carl", "--pair", "dana", ready="[carl] < OK NICK carl")
    with only(proxy, WEB_BACKEND, 0):
        wanda = page(proxy, "wanda", "lee")
    # Their peers on h1 and h2; ann and bob, on h1 and h2 too, chat through it all.
    with only(proxy, LINE_BACKEND, 1):
        dana = through(proxy, "dana", "carl")
        ann = through(proxy, "ann", "bob")
    with only(proxy, LINE_BACKEND, 2):
        lee = through(proxy, "lee", "wanda")
        bob = through(proxy, "bob", "ann")
    placed = {nick: host_of(cluster, nick) for nick in ("carl", "wanda", "dana", "ann", "lee", "bob")}
    assert placed == {"carl": 0, "wanda": 0, "dana": 1, "ann": 1, "lee": 2, "bob": 2}, placed
    try:
        assert dana.line() == "PAIRED carl" and lee.line() == "PAIRED wanda" and ann.line() == "PAIRED bob"
        assert bob.line() == "PAIRED ann" and wanda.messages(1) == [{"type": "paired", "peer": "lee"}]
        carl.wait_for("[carl] < PAIRED dana", timeout=TIMEOUT)
        first_messages_both_ways((carl, dana, wanda, lee), "hello dana", "hello carl", "from the page", "to the page")
        ann.send("MSG before")
        assert bob.line() == "FROM ann 1 before"
        assert set(proxy.states().values()) == {"UP"}, "every host ready again after the steering"

        # h0 is lost whole: its chatd and its holderd die together, and with them its connections.
        for proc in (cluster.hosts[0].chatd, cluster.hosts[0].holderd):
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        lost = time.monotonic()
        # carl's session is kept in the cluster: `chatctl client` resumes it through HAProxy, on
        # a live host, by itself; wanda's WebSocket asked for none, and ends.
        carl.wait_for("[carl] resumed …", timeout=TIMEOUT)
        resumed = time.monotonic() - lost
        with pytest.raises((EOFError, ConnectionError)):
            wanda.message()
        wait_until(lambda: proxy.host_state(0) == {"DOWN"}, TIMEOUT, "HAProxy's checks to take h0 out")
        taken_out = time.monotonic() - lost
        assert proxy.host_state(1) == proxy.host_state(2) == {"UP"}, proxy.states()
        log = proxy.log_tail(100_000)
        for backend in (LINE_BACKEND, WEB_BACKEND):
            assert f"Server {backend}/h0 is DOWN" in log, f"HAProxy's log says {backend}'s h0 is out"

        # The pair on the live hosts chats on; carl and dana too, as if nothing happened (n goes on,
        # dana hears nothing of it); wanda's peer hears her gone after h0's lease.
        ann.send("MSG after h0 is lost")
        assert bob.line() == "FROM ann 2 after h0 is lost"
        carl.type("after the loss")
        assert dana.line() == "FROM carl 2 after the loss"
        dana.send("MSG welcome back")
        carl.wait_for_count("FROM dana 2 welcome back", 1, timeout=TIMEOUT)
        assert host_of(cluster, "carl") in (1, 2)
        assert lee.line() == "UNPAIRED wanda"

        # Through the same address, wanda comes back to a live host as a new client: her nick once
        # h0's lease let it go, the same pair, n from 1.
        assert healthz(proxy) == (200, b"ok\n")

        def wanda_back() -> WebSocketClient | None:
            socket = WebSocketClient(proxy.web_port, timeout=TIMEOUT)
            socket.send({"type": "nick", "name": "wanda"})
            if socket.messages(1)[0]["type"] == "ok":
                return socket
            socket.close()
            return None

        wanda_again = wait_until(wanda_back, LEASE * 8, "wanda's nick to come free, then be taken again",
                                 interval=0.3)
        wanda_again.send({"type": "pair", "peer": "lee"})
        assert [m["type"] for m in wanda_again.messages(2)] == ["ok", "paired"] and lee.line() == "PAIRED wanda"
        assert host_of(cluster, "wanda") in (1, 2)
        print(f"h0 out of HAProxy {taken_out * 1000:.0f} ms after its loss (checks every {INTER_MS} ms, fall "
              f"{FALL}); carl's session resumed through it {resumed * 1000:.0f} ms after it; wanda (no "
              f"session) paired again {time.monotonic() - lost:.1f} s after it (lease {LEASE:g} s)")
        wanda_again.send({"type": "msg", "text": "back too"})
        assert lee.line() == "FROM wanda 1 back too"
        lee.send("MSG welcome back")
        assert wanda_again.messages(1) == [{"type": "from", "from": "lee", "n": 1, "text": "welcome back"}]

        # Every new connection lands on a live host while h0 is out.
        for number in range(6):
            probe = through(proxy, f"probe{number}")
            assert host_of(cluster, f"probe{number}") in (1, 2)
            probe.close()
    finally:
        carl.close()
        for client in (dana, ann, lee, bob, wanda, wanda_again):
            if client is not None:
                client.close()  # not left to the garbage collector: a later test counts its fds


def host_loss_soak(cluster: Hosts, proxy: HAProxy, losses: int, crashes: int) -> soak.Tally:
    """20 pairs with sessions stream through HAProxy's line port while faults land in a random order:
    ``crashes`` chatd kills on random hosts, ``losses`` whole-host losses (chatd and holderd SIGKILLed,
    their connections and journal gone; the host comes back empty at the next fault), and a NATS node
    killed a third of the way in, started again two thirds in. Every cut client resumes through
    HAProxy, on whatever host it is given; 20 connections are cut besides."""
    steps = ["loss"] * losses + ["crash"] * crashes
    random.Random(losses * 31 + crashes).shuffle(steps)
    node = random.Random(crashes).randrange(len(cluster.nats.nodes))
    lost: list[int] = []
    done = []

    def fault(rng: random.Random) -> None:
        step = steps[len(done)]
        done.append(step)
        if lost:  # the host lost at the last fault comes back, empty
            cluster.start_host_again(lost.pop())
        if len(done) == len(steps) // 3:
            cluster.nats.kill(node)
        elif len(done) == 2 * len(steps) // 3:
            cluster.nats.restart(node, wait=False)
        index = rng.randrange(len(cluster.hosts))
        if step == "loss":
            cluster.lose_host(index)
            lost.append(index)
            return
        chatd = cluster.hosts[index].chatd
        chatd.send_signal(rng.choice((signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)))
        chatd.wait(20)
        cluster.restart_chatd(index)

    try:
        return soak.run([proxy.line_port], pairs=20, crashes=losses + crashes, crash=fault, interval=(0.3, 1.0),
                        settle=120, sessions=True, cuts=20)
    finally:
        if lost:
            cluster.start_host_again(lost.pop())


def test_sessions_through_haproxy_survive_whole_host_losses_chatd_kills_and_a_nats_node_exactly_once(
        soak_behind_haproxy):
    cluster, proxy = soak_behind_haproxy
    tally = host_loss_soak(cluster, proxy, losses=4, crashes=12)
    print("host loss test:", tally.row())
    assert tally.crashes == 16 and tally.resumes >= 20 and tally.sent > 1000
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


@pytest.mark.parametrize("soak_behind_haproxy", [("--direct-same-host",)], indirect=True)
def test_the_host_loss_test_sees_loss_when_same_host_messages_skip_the_stream(soak_behind_haproxy):
    """--direct-same-host tells a message between two clients of one host at once, as one host
    does: what a lost host told that way is nowhere else, and the test must see it."""
    cluster, proxy = soak_behind_haproxy
    tally = host_loss_soak(cluster, proxy, losses=4, crashes=4)
    print("host loss test with --direct-same-host:", tally.row())
    assert tally.lost + tally.garbled + tally.n_gaps + tally.repeated + tally.n_repeats + tally.dropped > 0, \
        "the host loss test must be able to fail"
