"""chatd hosts behind a real HAProxy (Debian's haproxy, ctl.haproxy): one address for every client.

Three chatd hosts (each its own holderd and journal) over a real 3-node NATS
JetStream cluster, a real haproxy in front with the configuration the README
shows (faster checks, so that the test is short). Clients connect to HAProxy's
two ports only: line clients, `chatctl client` as a process, a WebSocket like
the page's, and /healthz. A host is lost whole (its chatd and holderd
SIGKILLed): HAProxy's checks of chatd's /healthz take it out (its stats socket
says DOWN, its log says why), and the clients that were on it come back
through the same address, to a live host, as new clients (a chatd in a
cluster keeps no sessions yet: ERR sessions-off; issue 24's later items).
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
from ctl.lineclient import LOST
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
    carl_again = None
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
        assert carl.exit_status() == LOST, carl.output()
        with pytest.raises((EOFError, ConnectionError)):
            wanda.message()
        wait_until(lambda: proxy.host_state(0) == {"DOWN"}, TIMEOUT, "HAProxy's checks to take h0 out")
        taken_out = time.monotonic() - lost
        assert proxy.host_state(1) == proxy.host_state(2) == {"UP"}, proxy.states()
        log = proxy.log_tail(100_000)
        for backend in (LINE_BACKEND, WEB_BACKEND):
            assert f"Server {backend}/h0 is DOWN" in log, f"HAProxy's log says {backend}'s h0 is out"

        # The pair on the live hosts chats on; the peers of h0's clients hear them gone after the lease.
        ann.send("MSG after h0 is lost")
        assert bob.line() == "FROM ann 2 after h0 is lost"
        assert dana.line() == "UNPAIRED carl" and lee.line() == "UNPAIRED wanda"

        # Through the same two addresses, h0's clients come back, to a live host, as new clients:
        # the same nicks once h0's lease let them go, the same pairs, n from 1 (no session kept yet).
        assert healthz(proxy) == (200, b"ok\n")
        carl_again = ClientProcess(chatctl_env, "pipe", None, ready="connected local-port=…")

        def nick_taken_back() -> bool:
            before = carl_again.count("< OK NICK carl") + carl_again.count("< ERR nick-taken")
            carl_again.type("/nick carl")
            wait_until(lambda: carl_again.count("< OK NICK carl") + carl_again.count("< ERR nick-taken") > before,
                       TIMEOUT, "chatd's answer to NICK carl")
            return carl_again.count("< OK NICK carl") > 0

        wait_until(nick_taken_back, LEASE * 8, "carl's nick to come free, then be taken again", interval=0.3)
        carl_again.type("/pair dana")
        carl_again.wait_for_count("< PAIRED dana", 1, timeout=TIMEOUT)
        assert dana.line() == "PAIRED carl"
        wanda_again = page(proxy, "wanda", "lee")
        assert wanda_again.messages(1) == [{"type": "paired", "peer": "lee"}] and lee.line() == "PAIRED wanda"
        assert host_of(cluster, "carl") in (1, 2) and host_of(cluster, "wanda") in (1, 2)
        print(f"h0 out of HAProxy {taken_out * 1000:.0f} ms after its loss (checks every {INTER_MS} ms, fall "
              f"{FALL}); carl and wanda paired again through it {time.monotonic() - lost:.1f} s after it "
              f"(lease {LEASE:g} s)")

        first_messages_both_ways((carl_again, dana, wanda_again, lee), "back through HAProxy", "welcome back",
                                 "back too", "welcome back")

        # Every new connection lands on a live host while h0 is out.
        for number in range(6):
            probe = through(proxy, f"probe{number}")
            assert host_of(cluster, f"probe{number}") in (1, 2)
            probe.close()
    finally:
        for process in filter(None, (carl, carl_again)):
            process.close()
        for client in (dana, ann, lee, bob):
            client.close()


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
