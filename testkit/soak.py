"""Pairs that stream numbered messages while chatd is crashed, and a tally of what arrived.

Theory of operation
-------------------
:class:`Traffic` runs ``pairs`` pairs of line clients in one thread on a
selector. Each client names itself (``a0``/``b0``, ``a1``/``b1`` …), pairs with
its partner, then sends messages numbered by itself, ``MSG <nick>:<k>:<body>``,
as long as fewer than ``window`` of its messages are on their way. The body's
length and bytes follow from ``(nick, k)`` alone, so the receiver can check
each one byte for byte; some are short, some near the 64 KiB line limit. Some
messages are written in two or three pieces with pauses between them (so a
crash finds half a line read), and some receivers read only now and then (so
chatd has output queued, and writes to them in part).

Each receiver checks every ``FROM`` line as it comes: the sender's ``k`` must
be the next one (else it is *lost* — skipped — or *repeated*), the body must
be the expected bytes (else *garbled*), and chatd's ``n`` must count 1, 2, 3 …
(``n-gaps``, ``n-repeats``). A connection that ends is *dropped*. At the end
every sender stops, and what is still on its way is waited for, then counted
*lost* if it never comes.

The crashes are the caller's: :func:`run` calls ``crash(rng)`` every so often
(kill chatd with some signal, start the next), as a test or a soak wants.
"""

from __future__ import annotations

import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

MAX_TEXT = 65532 - 24  # what fits a 64 KiB line after "MSG " and the "<nick>:<k>:" header


def body(nick: str, k: int) -> bytes:
    """The message body ``nick`` sends as its k-th: its length and bytes follow from (nick, k)."""
    rng = random.Random(f"{nick}/{k}")
    roll = rng.random()
    size = rng.randint(60000, MAX_TEXT) if roll < 0.05 else rng.randint(1000, 8000) if roll < 0.25 \
        else rng.randint(1, 200)
    alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789"
    seed = bytes(rng.choice(alphabet) for _ in range(64))
    return (seed * (size // 64 + 1))[:size]


@dataclass
class Tally:
    sent: int = 0
    received: int = 0
    lost: int = 0
    repeated: int = 0
    garbled: int = 0
    n_gaps: int = 0
    n_repeats: int = 0
    dropped: int = 0
    crashes: int = 0
    notes: list[str] = field(default_factory=list)

    def problems(self) -> int:
        return self.lost + self.repeated + self.garbled + self.n_gaps + self.n_repeats + self.dropped

    def row(self) -> dict:
        return {key: value for key, value in self.__dict__.items() if key != "notes"}

    def note(self, text: str) -> None:
        if len(self.notes) < 20:
            self.notes.append(text)


class Client:
    def __init__(self, traffic: "Traffic", nick: str, partner: str, slow: bool):
        self.traffic = traffic
        self.nick = nick
        self.partner = partner
        self.slow = slow
        self.sock = socket.create_connection(("127.0.0.1", traffic.port_for(nick)), timeout=10)
        self.sock.setblocking(False)
        if slow:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        self.pieces: list[bytes] = []  # what is still to be written, in order
        self.next_piece_at = 0.0
        self.next_k = 1  # the k of the next message this client sends
        self.expect_k = 1  # the k expected next from the partner
        self.expect_n = 1
        self.inbuf = bytearray()
        self.paired = False
        self.closed = False
        self.read_after = 0.0
        self.queue(f"NICK {nick}\nPAIR {partner}\n".encode())

    def queue(self, data: bytes, pieces: int = 1) -> None:
        if pieces == 1 or len(data) < 8:
            self.pieces.append(data)
            return
        cuts = sorted(self.traffic.rng.sample(range(1, len(data)), pieces - 1))
        self.pieces += [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]

    @property
    def in_flight(self) -> int:
        return self.next_k - 1 - self.traffic.clients[self.partner].expect_k + 1

    def maybe_send(self, now: float) -> None:
        traffic = self.traffic
        if self.paired and not traffic.stopping and not self.pieces and self.in_flight < traffic.window:
            k = self.next_k
            self.next_k += 1
            traffic.tally.sent += 1
            line = b"MSG " + f"{self.nick}:{k}:".encode() + body(self.nick, k) + b"\n"
            self.queue(line, traffic.rng.choice((1, 1, 2, 3)))
        while self.pieces and now >= self.next_piece_at:
            try:
                sent = self.sock.send(self.pieces[0])
            except BlockingIOError:
                return
            except OSError as exc:
                self.drop(f"write failed: {exc}")
                return
            if sent < len(self.pieces[0]):
                self.pieces[0] = self.pieces[0][sent:]
                return
            self.pieces.pop(0)
            if self.pieces:  # a line in pieces: the next one a little later
                self.next_piece_at = now + traffic.rng.uniform(0.001, 0.02)

    def readable(self, now: float) -> None:
        if self.slow and now < self.read_after:
            return
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as exc:
            self.drop(f"read failed: {exc}")
            return
        if not data:
            self.drop("EOF")
            return
        if self.slow:
            self.read_after = now + self.traffic.rng.uniform(0.0, 0.05)
        self.inbuf += data
        while True:
            end = self.inbuf.find(b"\n")
            if end < 0:
                return
            line = bytes(self.inbuf[:end])
            del self.inbuf[:end + 1]
            self.line(line)

    def line(self, line: bytes) -> None:
        tally = self.traffic.tally
        if line == f"PAIRED {self.partner}".encode():
            self.paired = True
            return
        if not line.startswith(b"FROM "):
            if line.startswith((b"OK ", b"UNPAIRED", b"PAIRED")):
                return
            tally.garbled += 1
            tally.note(f"{self.nick} got an unexpected line: {line[:80]!r}")
            return
        try:
            _, sender, n, text = line.split(b" ", 3)
            nick, k, payload = text.split(b":", 2)
            n, k = int(n), int(k)
        except ValueError:
            tally.garbled += 1
            tally.note(f"{self.nick} got a garbled line: {line[:80]!r}…")
            return
        if n > self.expect_n:
            tally.n_gaps += 1
            tally.note(f"{self.nick}: n jumped from {self.expect_n} to {n}")
        elif n < self.expect_n:
            tally.n_repeats += 1
            tally.note(f"{self.nick}: n {n} again (expected {self.expect_n})")
        self.expect_n = max(self.expect_n, n + 1)
        if nick.decode() != self.partner or sender.decode() != self.partner:
            tally.garbled += 1
            return
        if k < self.expect_k:
            tally.repeated += 1
            tally.note(f"{self.nick}: message {k} of {self.partner} again")
            return
        if k > self.expect_k:
            tally.lost += k - self.expect_k
            tally.note(f"{self.nick}: messages {self.expect_k}..{k - 1} of {self.partner} never came")
        if payload != body(self.partner, k):
            tally.garbled += 1
            tally.note(f"{self.nick}: message {k} of {self.partner} garbled")
        tally.received += 1
        self.expect_k = k + 1

    def drop(self, reason: str) -> None:
        if not self.closed:
            self.closed = True
            self.traffic.tally.dropped += 1
            self.traffic.tally.note(f"{self.nick}'s connection ended: {reason}")
            if not self.slow:
                self.traffic.selector.unregister(self.sock)
            self.sock.close()


class Traffic:
    def __init__(self, port: int | list[int], pairs: int, window: int = 20, seed: int = 1,
                 slow_share: float = 0.25):
        """``port``: chatd's line port; or the ports of several chatd hosts (a cluster), and
        then the two of each pair connect to different hosts: a<i> to the i-th (round), b<i>
        to the next."""
        self.ports = port if isinstance(port, list) else [port]
        self.window = window
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.stopping = False
        self.selector = selectors.DefaultSelector()
        self.clients: dict[str, Client] = {}
        for index in range(pairs):
            for nick, partner in ((f"a{index}", f"b{index}"), (f"b{index}", f"a{index}")):
                client = Client(self, nick, partner, slow=self.rng.random() < slow_share)
                self.clients[nick] = client
                if not client.slow:  # slow readers are read on their own schedule, below
                    self.selector.register(client.sock, selectors.EVENT_READ, client)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def port_for(self, nick: str) -> int:
        index = int(nick[1:]) + (nick[0] == "b")
        return self.ports[index % len(self.ports)]

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            for key, _ in self.selector.select(0.005):
                key.data.readable(time.monotonic())
            now = time.monotonic()
            for client in self.clients.values():
                if not client.closed:
                    client.maybe_send(now)
                    if client.slow and now >= client.read_after:
                        client.readable(now)

    def all_arrived(self) -> bool:
        return all(c.closed or self.clients[c.partner].expect_k == c.next_k for c in self.clients.values()) \
            and not any(c.pieces for c in self.clients.values() if not c.closed)

    def finish(self, timeout: float) -> Tally:
        """Stop sending, wait for what is on its way, count what never came."""
        self.stopping = True
        deadline = time.monotonic() + timeout
        while not self.all_arrived() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._done.set()
        self._thread.join(5)
        for client in self.clients.values():
            partner = self.clients[client.partner]
            missing = client.next_k - partner.expect_k
            if missing > 0 and not partner.closed:
                self.tally.lost += missing
                self.tally.note(f"{partner.nick} never got {client.nick}'s messages "
                                f"{partner.expect_k}..{client.next_k - 1}")
            if not client.closed:
                client.sock.close()
        return self.tally


def run(port: int | list[int], pairs: int, crashes: int, crash, seed: int = 1, interval=(0.05, 0.5),
        settle: float = 60.0, progress=None) -> Tally:
    """Stream between ``pairs`` pairs while calling ``crash(rng)`` ``crashes`` times, a random
    ``interval`` apart; then settle and tally."""
    traffic = Traffic(port, pairs, seed=seed)
    deadline = time.monotonic() + 30
    traffic.start()
    while not all(c.paired for c in traffic.clients.values()):
        if time.monotonic() > deadline:
            traffic.finish(0)
            raise TimeoutError("the pairs did not pair within 30 s")
        time.sleep(0.01)
    rng = random.Random(seed * 7919)
    try:
        for number in range(crashes):
            time.sleep(rng.uniform(*interval))
            crash(rng)
            traffic.tally.crashes += 1
            if progress and (number + 1) % max(crashes // 10, 1) == 0:
                progress(traffic.tally)
    except BaseException:
        traffic.finish(0)  # a failed crash step leaves no clients (nor their nicks) behind it
        raise
    time.sleep(interval[1])
    return traffic.finish(settle)
