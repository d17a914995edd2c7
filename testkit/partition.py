"""A chatd host cut off from NATS by a firewall rule, and pairs whose clients move when told to.

Theory of operation
-------------------
**The cut** (:class:`Netns`). One chatd host (its holderd and chatd) runs in a
network namespace of its own, made here (``ip netns add``), joined to the root
namespace by a veth pair with two addresses of a /30 no interface of this
machine uses. The NATS nodes stay in the root namespace and listen on the
root end's address (``ctl.natscluster``'s ``client_host``); the other hosts and
every client stay in the root namespace too, and the clients of the host in
the namespace connect to its end's address. A *partition* is one nftables
table in that namespace whose chains drop, silently, every packet to and from
the NATS ports: the host's TCP connections to NATS hang as on a cut cable
(no reset, no refusal), while its clients' connections, on other ports, go on.
*Healing* flushes the chains. :meth:`Netns.close` deletes the namespace (the
veth goes with it): nothing is left behind, failed or not. Everything here
needs root (``ip``, ``nft``, ``nsenter``).

**The load** (:class:`MovingPairs`). Like :mod:`testkit.soak`, pairs of line
clients stream numbered messages, ``MSG <nick>:<k>:<body>`` (the body follows
from ``(nick, k)``: :func:`testkit.soak.body`), each as long as fewer than
``window`` of its messages are on their way, from one selector thread. What
differs is what a client does when chatd tells it to go:

- ``ERR moved <h>``: its host lost its hold on the client's nick; of the
  messages this connection sent, chatd handled the first ``h`` (they will be
  delivered) and not the rest. The client is *moved*: it connects to another
  host (as a load balancer would send it), takes its nick again (``ERR
  nick-taken`` while the old host's lease has not yet expired in NATS: it
  asks again), pairs, and sends again, same ``k``, what was not handled;
- ``UNPAIRED``: it stops sending until ``PAIRED`` again; what it sent
  meanwhile may be refused (``ERR not-paired``).

The accounting is per message: each ``k`` must reach the partner at most once
(else *repeated*), byte for byte (else *garbled*), never one chatd said it did
not handle; and at the end every message must have arrived, except those
*excused*: a message on its way to a client that was moved (a new connection
is a new client: without sessions, what was on its way to the old one is not
sent to the new one), or sent to a pairing that ended before it arrived.
``n`` must count 1, 2, 3 ... on each pairing of each connection. A
connection that ends without ``ERR moved`` is *dropped*. Order is checked by
``n`` alone: across a move, the old host's last messages come when it is back,
after the new connection's (said in README's "Partitions").
"""

from __future__ import annotations

import os
import random
import selectors
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

from . import soak
from .soak import body


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _free_subnet() -> int:
    """The third octet of a 10.203.X.0/30 no address of this machine is in."""
    used = run("ip", "-4", "-o", "addr").stdout
    start = os.getpid() % 250
    for offset in range(250):
        octet = (start + offset) % 250 + 1
        if f" 10.203.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.203.X.0/30 for the veth pair")


class Netns:
    """A network namespace with a veth pair to the root namespace, and a partition switch."""

    TABLE = "partition"

    def __init__(self):
        tag = f"{os.getpid() % 100000}{random.randrange(100):02d}"
        self.name = f"pbpart{tag}"
        self.outer_veth, self.inner_veth = f"pbo{tag}", f"pbi{tag}"
        octet = _free_subnet()
        #: The root namespace's end (the NATS nodes listen here) and the namespace's end.
        self.outer, self.inner = f"10.203.{octet}.1", f"10.203.{octet}.2"
        self.is_cut = False
        self._made = False

    @property
    def prefix(self) -> tuple[str, ...]:
        """What runs a command in the namespace (nsenter execs it: the pid stays the daemon's)."""
        return ("nsenter", f"--net=/run/netns/{self.name}")

    def create(self) -> "Netns":
        run("ip", "netns", "add", self.name)
        self._made = True
        inside = ("ip", "netns", "exec", self.name)
        run("ip", "link", "add", self.outer_veth, "type", "veth", "peer", "name", self.inner_veth)
        run("ip", "link", "set", self.inner_veth, "netns", self.name)
        run("ip", "addr", "add", f"{self.outer}/30", "dev", self.outer_veth)
        run("ip", "link", "set", self.outer_veth, "up")
        run(*inside, "ip", "addr", "add", f"{self.inner}/30", "dev", self.inner_veth)
        run(*inside, "ip", "link", "set", self.inner_veth, "up")
        run(*inside, "ip", "link", "set", "lo", "up")
        # The table and its two chains, empty (everything passes) until cut().
        run(*inside, "nft", "add", "table", "inet", self.TABLE)
        for chain, hook in (("out", "output"), ("in", "input")):
            run(*inside, "nft", "add", "chain", "inet", self.TABLE, chain,
                f"{{ type filter hook {hook} priority 0 ; policy accept ; }}")
        return self

    def cut(self, ports: list[int]) -> None:
        """Drop, silently, every packet between the namespace and ``ports`` on the outer address."""
        inside = ("ip", "netns", "exec", self.name)
        listed = "{ " + ", ".join(map(str, ports)) + " }"
        run(*inside, "nft", "add", "rule", "inet", self.TABLE, "out", "ip", "daddr", self.outer, "tcp", "dport",
            listed, "drop")
        run(*inside, "nft", "add", "rule", "inet", self.TABLE, "in", "ip", "saddr", self.outer, "tcp", "sport",
            listed, "drop")
        self.is_cut = True

    def heal(self) -> None:
        inside = ("ip", "netns", "exec", self.name)
        for chain in ("out", "in"):
            run(*inside, "nft", "flush", "chain", "inet", self.TABLE, chain)
        self.is_cut = False

    def close(self) -> None:
        """Delete the namespace (its veth end, and so the pair, and its nftables go with it)."""
        if self._made:
            run("ip", "netns", "delete", self.name, check=False)
            run("ip", "link", "delete", self.outer_veth, check=False)  # gone already, as a rule
            self._made = False

    def leftovers(self) -> list[str]:
        """What of this namespace is still there (nothing, after :meth:`close`)."""
        left = []
        if self.name in run("ip", "netns", "list").stdout.split():
            left.append(f"network namespace {self.name}")
        if run("ip", "link", "show", self.outer_veth, check=False).returncode == 0:
            left.append(f"veth {self.outer_veth}")
        return left

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def missing_for_partitions() -> str | None:
    """What this machine lacks to cut a host off, as the fix; None if nothing."""
    if os.geteuid() != 0:
        return "root (network namespaces and nftables)"
    lacking = [tool for tool in ("ip", "nft", "nsenter") if not any(
        os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "/usr/sbin:/usr/bin").split(":")
        + ["/usr/sbin", "/sbin"])]
    return f"{', '.join(lacking)} (apt-get install nftables iproute2 util-linux)" if lacking else None


# -- the load --------------------------------------------------------------------------------
@dataclass
class Tally(soak.Tally):
    """testkit.soak's tally, and what moving clients add."""

    phantom: int = 0  # arrived though chatd said it did not handle it
    resent: int = 0
    excused: int = 0  # on their way to a moved client, or to a pairing that ended: not required
    excused_arrived: int = 0
    refused: int = 0  # ERR not-paired: sent while unpaired, not handled
    #: Handled by a host that then said ERR moved, not arrived at the move, and owed (not excused since).
    held: int = 0
    held_arrived: int = 0
    nick_retries: int = 0

    def problems(self) -> int:
        return super().problems() + self.phantom


class Client:
    def __init__(self, load: "MovingPairs", nick: str, partner: str, home: tuple[str, int]):
        self.load = load
        self.nick, self.partner = nick, partner
        self.address = home
        self.window = load.deep_window if home in load.deep else load.window
        self.next_k = 1
        #: My messages on their way, not yet received; those excused (need not arrive).
        self.pending: set[int] = set()
        self.excused: set[int] = set()
        #: The partner's messages received (by k).
        self.got: set[int] = set()
        self.resend: list[int] = []
        #: Handled by a host that said ERR moved, and not arrived then: that host still owes them.
        self.held: set[int] = set()
        self.moves = 0
        self.closed = False
        self.sock: socket.socket | None = None
        self._connect()

    # -- the connection -----------------------------------------------------------------
    def _connect(self) -> None:
        self.sock = socket.create_connection(self.address, timeout=10)
        self.sock.setblocking(False)
        self.load.selector.register(self.sock, selectors.EVENT_READ, self)
        self.inbuf, self.outbuf = bytearray(), bytearray()
        self.named = self.paired = self.was_unpaired = False
        self.expect_n = 1
        self.sent_here: list[int] = []  # the k this connection sent, in order: chatd counts the handled ones
        self.refused_here = 0
        self.nick_again_at = 0.0
        self.outbuf += f"PAIR {self.partner}\nNICK {self.nick}\n".encode()

    def _disconnect(self) -> None:
        self.load.selector.unregister(self.sock)
        self.sock.close()

    def step(self, now: float) -> None:
        if self.closed:
            return
        if self.nick_again_at and now >= self.nick_again_at:
            self.nick_again_at = 0.0
            self.outbuf += f"NICK {self.nick}\n".encode()
        partner = self.load.clients[self.partner]
        while self.paired and not self.outbuf and (self.resend or (not self.load.stopping
                                                                   and len(self.pending) < self.window)):
            k = self.resend.pop(0) if self.resend else self._new_k()
            self.sent_here.append(k)
            self.outbuf += b"MSG " + f"{self.nick}:{k}:".encode() + body(self.nick, k) + b"\n"
            if k in partner.got:  # sent again after a move: it must not come twice
                self.load.tally.note(f"{self.nick} resent {k}, which {partner.nick} had")
            break
        if self.outbuf:
            try:
                sent = self.sock.send(self.outbuf)
            except BlockingIOError:
                return
            except OSError as exc:
                return self._write_failed(exc)
            del self.outbuf[:sent]

    def _write_failed(self, exc: OSError) -> None:
        """chatd closed the connection: its last words (ERR moved) may wait unread, as a client
        that writes before it reads finds out; read them before calling it dropped."""
        moves = self.moves
        sock = self.sock
        sock.setblocking(True)
        sock.settimeout(1.0)
        try:
            while self.sock is sock and not self.closed:
                data = sock.recv(262144)
                if not data:
                    break
                self.inbuf += data
                while self.sock is sock and (end := self.inbuf.find(b"\n")) >= 0:
                    line = bytes(self.inbuf[:end])
                    del self.inbuf[:end + 1]
                    self.line(line)
        except OSError:
            pass
        if self.moves == moves and not self.closed:
            self.drop(f"write failed: {exc}")

    def _new_k(self) -> int:
        k = self.next_k
        self.next_k += 1
        self.pending.add(k)
        self.load.tally.sent += 1
        return k

    def readable(self) -> None:
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.drop(f"read failed: {exc}")
        if not data:
            return self.drop("EOF")
        self.inbuf += data
        while (end := self.inbuf.find(b"\n")) >= 0:
            line = bytes(self.inbuf[:end])
            del self.inbuf[:end + 1]
            self.line(line)
            if self.closed or not self.inbuf:
                return

    # -- what chatd says ----------------------------------------------------------------
    def line(self, line: bytes) -> None:
        tally, partner = self.load.tally, self.load.clients[self.partner]
        if line.startswith(b"FROM "):
            return self._from(line, partner)
        words = line.decode(errors="replace").split()
        if words == ["PAIRED", self.partner]:
            if self.was_unpaired:  # what went to the pairing that ended need not arrive
                self.excuse_pending()  # sent to a pairing that ended
            self.paired, self.expect_n = True, 1
        elif words == ["UNPAIRED", self.partner]:
            self.paired, self.was_unpaired = False, True
        elif words == ["OK", "NICK", self.nick]:
            self.named = True
        elif words == ["ERR", "nick-taken"]:
            tally.nick_retries += 1
            self.nick_again_at = time.monotonic() + 0.3
        elif words == ["ERR", "not-paired"]:
            tally.refused += 1
            self.refused_here += 1
        elif len(words) == 3 and words[:2] == ["ERR", "moved"] and words[2].isdigit():
            self._moved(int(words[2]))
        elif words[:1] != ["OK"]:
            tally.garbled += 1
            tally.note(f"{self.nick} got an unexpected line: {line[:100]!r}")

    def _from(self, line: bytes, partner: "Client") -> None:
        tally = self.load.tally
        try:
            sender, n, nick, k, payload = soak.read_from(line)
        except ValueError:
            tally.garbled += 1
            tally.note(f"{self.nick} got a garbled line: {line[:80]!r}")
            return
        if n != self.expect_n:
            tally.n_gaps += 1
            tally.note(f"{self.nick}: n {n}, expected {self.expect_n}")
        self.expect_n = n + 1
        if sender.decode() != self.partner or nick.decode() != self.partner or payload != body(self.partner, k):
            tally.garbled += 1
            tally.note(f"{self.nick}: message {k} from {sender!r} garbled ({len(payload)} bytes)")
            return
        if k in self.got:
            tally.repeated += 1
            tally.note(f"{self.nick}: {self.partner}'s message {k} again")
            return
        if k >= partner.next_k or k in partner.resend:
            tally.phantom += 1
            tally.note(f"{self.nick}: {self.partner}'s message {k} came, though chatd said it did not handle it")
        self.got.add(k)
        tally.received += 1
        if k in partner.excused:
            tally.excused_arrived += 1
        if k in partner.held:
            partner.held.discard(k)
            tally.held_arrived += 1
        partner.pending.discard(k)

    def owed(self) -> set[int]:
        """My messages that must still reach the partner."""
        return self.pending | (set(self.resend) - self.excused)

    def excuse_pending(self) -> None:
        """My messages on their way need not arrive (each still at most once)."""
        if self.pending:
            self.load.tally.excused += len(self.pending)
            no_longer_owed = self.held & self.pending
            self.held -= no_longer_owed
            self.load.tally.held -= len(no_longer_owed)
            self.excused |= self.pending
            self.pending = set()

    def _moved(self, handled: int) -> None:
        """``ERR moved <handled>``: chatd handled the first ``handled`` messages this connection
        sent; the rest go again from another host. What was on its way to me is excused."""
        tally = self.load.tally
        tally.moved += 1
        self.moves += 1
        self._disconnect()
        if self.refused_here:
            # chatd counts what it handled; with refusals on this connection the client cannot tell which
            # k those were: excuse its pending ones rather than guess (the test says how often).
            tally.note(f"{self.nick} moved after {self.refused_here} refusals: its pending excused")
            self.excuse_pending()
        else:
            held = set(self.sent_here[:handled]) & self.pending
            self.held |= held
            tally.held += len(held)
            unhandled = self.sent_here[handled:]
            self.resend = sorted(set(unhandled) | set(self.resend))
            tally.resent += len(unhandled)
        self.load.clients[self.partner].excuse_pending()  # on its way to a moved client
        self.address = self.load.move_to(self)
        self.window = self.load.window
        self._connect()

    def drop(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.load.tally.dropped += 1
            self.load.tally.note(f"{self.nick}'s connection ended: {reason}")
            self._disconnect()


class MovingPairs:
    """``placements``: per pair, the (address, port) of its two clients' hosts; ``refuge``: the
    hosts a moved client connects to instead (in turn)."""

    def __init__(self, placements: list[tuple[tuple[str, int], tuple[str, int]]], refuge: list[tuple[str, int]],
                 window: int = 16, deep: tuple[tuple[str, int], ...] = (), deep_window: int = 400):
        """``deep``: hosts whose clients send up to ``deep_window`` messages ahead (more than their
        outboxes hold: chatd must hold them back) instead of ``window``."""
        self.window = window
        self.deep, self.deep_window = deep, deep_window
        self.refuge = refuge
        self.tally = Tally()
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.clients: dict[str, Client] = {}
        self._moves = 0
        for index, (a_home, b_home) in enumerate(placements):
            self.clients[f"a{index}"] = Client(self, f"a{index}", f"b{index}", a_home)
            self.clients[f"b{index}"] = Client(self, f"b{index}", f"a{index}", b_home)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def move_to(self, client: Client) -> tuple[str, int]:
        self._moves += 1
        return self.refuge[self._moves % len(self.refuge)]

    def start(self, timeout: float = 30) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not all(c.paired for c in self.clients.values()):
            if time.monotonic() > deadline or self.error:
                self.finish(0)
                raise TimeoutError(f"the pairs did not pair within {timeout:.0f} s ({self.error})")
            time.sleep(0.02)

    def _run(self) -> None:
        try:
            while not self._done.is_set():
                for key, _ in self.selector.select(0.005):
                    if not key.data.closed:
                        key.data.readable()
                now = time.monotonic()
                for client in self.clients.values():
                    client.step(now)
        except BaseException as exc:  # said by finish(), not lost in a thread
            self.error = exc

    def held_owed(self) -> dict[str, list[int]]:
        """Per client, what a host that said ERR moved handled and still owes its partner."""
        return {c.nick: sorted(c.held) for c in self.clients.values() if c.held}

    def on_their_way(self) -> int:
        return sum(len(c.owed()) for c in self.clients.values() if not c.closed)

    def finish(self, timeout: float) -> Tally:
        """Stop sending, wait up to ``timeout`` s for what is on its way, count what never came."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while self.on_their_way() and time.monotonic() < deadline and not self.error:
            time.sleep(0.05)
        self._done.set()
        self._thread.join(5)
        if self.error:
            raise self.error
        for client in self.clients.values():
            partner = self.clients[client.partner]
            missing = client.owed()
            if missing and not partner.closed:
                self.tally.lost += len(missing)
                self.tally.note(f"{partner.nick} never got {client.nick}'s {sorted(missing)[:10]} "
                                f"({len(missing)})")
            if not client.closed:
                client._disconnect()
        return self.tally


# -- the scenario the test and the bench share -------------------------------------------------
def placements(addresses: list[tuple[str, int]], cut: int, pairs: int = 12) -> tuple[list, list]:
    """Pairs over three hosts, ``cut`` the one to be cut off: a third with both clients on it, a
    third across it and another host, a third on the two others (never cut off); moved clients go
    to the two others."""
    others = [address for index, address in enumerate(addresses) if index != cut]
    kinds = [(addresses[cut], addresses[cut]), (addresses[cut], others[0]), (others[0], others[1])]
    return [kinds[index % 3] for index in range(pairs)], others


@dataclass
class Outcome:
    tally: Tally
    before: dict  # the tally's row when the cut began, and when it healed
    at_heal: dict
    fenced_after: float | None  # s from the cut to the host's saying it is fenced
    renewed_after: float  # s from the heal to its lease stored again
    held_after: float  # s from the heal to the last of what it held arriving
    moved_expected: int  # the clients of the cut-off host

    def lines(self, seconds: float, lease: float) -> str:
        return (f"partition {seconds:g} s (lease {lease:g} s): fenced {self.fenced_after} s after the cut; "
                f"lease renewed {self.renewed_after:.1f} s after the heal, what it held delivered "
                f"{self.held_after:.1f} s after it\nbefore the cut: {self.before}\nat the heal: {self.at_heal}\n"
                f"at the end: {self.tally.row()}\nnotes: {self.tally.notes}")


def cut_and_heal(netns: Netns, cluster, cut: int, seconds: float, warm_up: float = 5.0, pairs: int = 12,
                 settle: float = 90.0) -> Outcome:
    """Pairs stream (:class:`MovingPairs`; the cut-off host's clients send up to 400 ahead, far
    more than their outboxes hold); host ``cut`` of ``cluster`` (a :class:`ctl.hosts.Hosts`
    whose host ``cut`` runs in ``netns``) is cut off from every NATS node for ``seconds``,
    then healed; the pairs stream on a while, stop, and what is on its way is waited for."""
    addresses = [(cluster.addresses[i], cluster.ports[i]) for i in range(len(cluster.hosts))]
    placed, refuge = placements(addresses, cut, pairs)
    load = MovingPairs(placed, refuge, deep=(addresses[cut],))
    moved_expected = sum((a == addresses[cut]) + (b == addresses[cut]) for a, b in placed)
    load.start()
    try:
        time.sleep(warm_up)
        before = load.tally.row()
        netns.cut([node.client_port for node in cluster.nats.nodes])
        cut_at = time.monotonic()
        fenced_after = None
        while time.monotonic() < cut_at + seconds:
            if fenced_after is None and cluster.status(cut)["cluster"]["fenced"]:
                fenced_after = round(time.monotonic() - cut_at, 2)
            time.sleep(0.1)
        at_heal = load.tally.row()
        netns.heal()
        healed_at = time.monotonic()
        _wait(lambda: not cluster.status(cut)["cluster"]["fenced"], 120, "the lease to be stored again")
        renewed_after = time.monotonic() - healed_at
        _wait(lambda: load.tally.held_arrived >= load.tally.held, 120, "what the host held to arrive",
              lambda: f"still owed: {load.held_owed()}; the hosts' clusters: "
                      f"{[cluster.status(i)['cluster'] for i in range(len(cluster.hosts))]}")
        held_after = time.monotonic() - healed_at
        time.sleep(warm_up)
    except BaseException:
        load.finish(0)
        raise
    return Outcome(load.finish(settle), before, at_heal, fenced_after, renewed_after, held_after, moved_expected)


def _wait(predicate, timeout: float, what: str, why=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}; {why()}")
        time.sleep(0.1)
