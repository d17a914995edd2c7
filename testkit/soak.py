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
(``n-gaps``, ``n-repeats``). A connection that ends is *dropped*; a pairing
chatd ends (``UNPAIRED``: the partner's host counted dead) is *unpaired*, and
its ``PAIRED`` again starts ``n`` from 1, as the protocol says. At the end
every sender stops, and what is still on its way is waited for, then counted
*lost* if it never comes.

The crashes are the caller's: :func:`run` calls ``crash(rng)`` every so often
(kill chatd with some signal, start the next), as a test or a soak wants.

**With sessions** (``sessions=True``), each client asks for one (``SESSION``)
after it pairs, says which messages it has (``ACK <n>``) every
:data:`ACK_EVERY` messages or :data:`ACK_BYTES`, and :func:`run` also *cuts* connections at random
(:meth:`Traffic.cut`): a reset, a plain close, or a client gone silent (its
socket left open and never read again, as a phone that changed networks). A
cut client connects again and says ``RESUME <token> <last n>``; chatd answers
``RESUMED … <handled>`` and sends again every message after that ``n``; the
client sends again its messages after the ``handled`` count (its ``k`` is its
count of chat commands since ``SESSION``). Then a lost, repeated or garbled
message, or a gap in ``n``, is counted as without sessions; a client whose
session is refused counts as *dropped*. ``ERR busy <s>``: it tries again then.
An ``UNPAIRED`` is counted *away*, not a problem: a session's ``n`` goes on over
it, and a peer whose host is lost shows as gone until its session is resumed.
"""

from __future__ import annotations

import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

MAX_TEXT = 65532 - 24  # what fits a 64 KiB line after "MSG " and the "<nick>:<k>:" header
#: With sessions, a client acknowledges what it received after this many messages, or bytes of
#: them: chatd keeps what it sent until then, in an output ring whose room its peer waits for.
ACK_EVERY = 16
ACK_BYTES = 32 * 1024
#: ... and sends at most this many bytes of messages beyond the last count of its commands
#: handled (``HANDLED``), asking for one with an ``ACK`` when it must wait: so an ACK always
#: finds room in chatd's input ring (128 KiB) behind the commands that wait there.
UNCONFIRMED_BYTES = 64 * 1024
#: Ways to cut a connection (see Traffic.cut).
CUTS = ("reset", "close", "silent")


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
    cuts: int = 0
    resumes: int = 0
    busy: int = 0
    moved: int = 0
    #: Without sessions: pairings chatd broke (UNPAIRED). With them: a peer shown gone for a while
    #: (its host lost, and the session not yet resumed elsewhere), counted in ``away``.
    unpaired: int = 0
    away: int = 0
    notes: list[str] = field(default_factory=list)

    def problems(self) -> int:
        return (self.lost + self.repeated + self.garbled + self.n_gaps + self.n_repeats + self.dropped
                + self.unpaired)

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
        self.sock = self._connect()
        self.pieces: list[bytes] = []  # what is still to be written, in order
        self.next_piece_at = 0.0
        self.next_k = 1  # the k of the next message this client sends
        self.expect_k = 1  # the k expected next from the partner
        self.expect_n = 1
        self.inbuf = bytearray()
        self.paired = False
        self.closed = False
        self.read_after = 0.0
        #: With sessions: its token; a RESUME under way; when to try again (busy); sockets abandoned.
        self.token: str | None = None
        self.resuming = False
        self.retry_at = 0.0
        self.abandoned: list[socket.socket] = []
        self.acked_n = 0
        self.unacked_bytes = 0
        self.resumed_from: int | None = None
        self.resent: set[int] = set()
        #: Sizes of its messages chatd has not yet counted handled, by k; an ACK asked and unanswered.
        self.unconfirmed: dict[int, int] = {}
        self.asked = False
        self.queue(f"NICK {nick}\nPAIR {partner}\n".encode() + (b"SESSION\n" if traffic.sessions else b""))

    def _connect(self) -> socket.socket:
        # Its own port first; a port that refuses (its host lost) is passed over for the next, as a
        # load balancer's health check would.
        ports = self.traffic.ports
        first = ports.index(self.traffic.port_for(self.nick))
        for attempt in range(len(ports)):
            try:
                sock = socket.create_connection(("127.0.0.1", ports[(first + attempt) % len(ports)]), timeout=10)
                break
            except ConnectionRefusedError:
                if attempt == len(ports) - 1:
                    raise
        sock.setblocking(False)
        if self.slow:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        return sock

    def cut(self, how: str) -> None:
        """End this client's connection as ``how`` says (:data:`CUTS`), and resume on a new one."""
        if self.closed or self.token is None or self.resuming:
            return
        self.traffic.tally.cuts += 1
        if not self.slow:
            self.traffic.selector.unregister(self.sock)
        if how == "reset":
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        elif how == "close":
            self.sock.close()
        else:  # silent: left open, never read or written again
            self.abandoned.append(self.sock)
        self._resume()

    def _resume(self) -> None:
        self.sock = self._connect()
        if not self.slow:
            self.traffic.selector.register(self.sock, selectors.EVENT_READ, self)
        self.pieces.clear()  # what was half written is sent again whole, if chatd did not handle it
        self.inbuf.clear()
        self.resuming = True
        # A retry the last connection's ERR busy asked for is this RESUME: sent again on top of it,
        # it would be answered RESUMED twice (a second RESUME on the connection holding the session).
        self.retry_at = 0.0
        self.sock.sendall(f"RESUME {self.token} {self.expect_n - 1}\n".encode())
        self.resumed_from = self.expect_n - 1

    def confirmed(self, handled: int) -> None:
        """chatd counts this client's first ``handled`` messages handled."""
        self.asked = False
        for k in [k for k in self.unconfirmed if k <= handled]:
            del self.unconfirmed[k]

    def resumed(self, handled: int) -> None:
        """chatd handled this client's first ``handled`` messages: the rest go again."""
        self.resuming = False
        self.confirmed(handled)
        self.traffic.tally.resumes += 1
        for k in range(handled + 1, self.next_k):
            self.resent.add(k)
            self.queue(b"MSG " + f"{self.nick}:{k}:".encode() + body(self.nick, k) + b"\n")

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
        if self.resuming:
            if self.retry_at and now >= self.retry_at:
                self.retry_at = 0.0
                self.sock.sendall(f"RESUME {self.token} {self.expect_n - 1}\n".encode())
            return
        if self.paired and not traffic.stopping and not self.pieces and self.in_flight < traffic.window \
                and (self.token or not traffic.sessions):
            k = self.next_k
            line = b"MSG " + f"{self.nick}:{k}:".encode() + body(self.nick, k) + b"\n"
            if traffic.sessions and self.unconfirmed and sum(self.unconfirmed.values()) + len(line) > UNCONFIRMED_BYTES:
                if not self.asked:
                    self.asked = True
                    self.queue(f"ACK {self.acked_n}\n".encode())
                return self._write(now)
            self.next_k += 1
            traffic.tally.sent += 1
            if traffic.sessions:
                self.unconfirmed[k] = len(line)
            self.queue(line, traffic.rng.choice((1, 1, 2, 3)))
        self._write(now)

    def _write(self, now: float) -> None:
        traffic = self.traffic
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
            if self.paired and not self.traffic.sessions:
                self.expect_n = 1  # a new pairing counts from 1 (chatd.room); its UNPAIRED was counted
            self.paired = True
            return
        if line == f"UNPAIRED {self.partner}".encode():
            if self.traffic.sessions:
                tally.away += 1
            else:
                tally.unpaired += 1
                tally.note(f"{self.nick} was told UNPAIRED after n {self.expect_n - 1} (its partner's host "
                           "counted dead? see the hosts' logs: 'is gone')")
            return
        if line.startswith((b"SESSION ", b"RESUMED ", b"HANDLED ", b"ERR ")) and self.traffic.sessions:
            self.session_line(line)
            return
        if not line.startswith(b"FROM "):
            if line.startswith((b"OK ", b"UNPAIRED", b"PAIRED")):
                return
            tally.garbled += 1
            tally.note(f"{self.nick} got an unexpected line: {line[:80]!r}")
            return
        try:
            sender, n, nick, k, payload = read_from(line)
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
            expected = body(self.partner, k)
            at = next((i for i, (x, y) in enumerate(zip(payload, expected)) if x != y), min(len(payload), len(expected)))
            tally.note(f"{self.nick}: message {k} of {self.partner} (n {n}) garbled: {len(payload)} bytes, "
                       f"{len(expected)} expected, first difference at {at}: {payload[at:at + 40]!r}"
                       + (" (sent again after a resume)" if k in self.traffic.clients[self.partner].resent else ""))
        tally.received += 1
        self.expect_k = k + 1
        self.unacked_bytes += len(line)
        if self.token and (n - self.acked_n >= ACK_EVERY or self.unacked_bytes >= ACK_BYTES):
            self.acked_n, self.unacked_bytes = n, 0
            self.queue(f"ACK {n}\n".encode())

    def session_line(self, line: bytes) -> None:
        words = line.decode().split()
        if words[0] == "SESSION" and len(words) == 3:
            self.token = words[1]
        elif words[0] == "RESUMED" and len(words) == 4 and self.resuming:
            self.resumed(int(words[3]))
        elif words[:2] == ["ERR", "busy"] and self.resuming:
            self.traffic.tally.busy += 1
            self.retry_at = time.monotonic() + self.traffic.rng.uniform(0, int(words[2]))
        elif words[0] == "HANDLED" and len(words) == 2:
            self.confirmed(int(words[1]))
        elif words[:2] == ["ERR", "moved"]:
            self.traffic.tally.moved += 1  # another host holds its session: it closes, and we resume
        else:
            self.traffic.tally.garbled += 1
            self.traffic.tally.note(f"{self.nick} got an unexpected line: {line[:80]!r}")
            if words == ["ERR", "unknown-session"]:
                self.drop("its session was refused")

    def drop(self, reason: str) -> None:
        if self.traffic.sessions and self.token and not self.closed and reason != "its session was refused":
            if not self.slow:
                self.traffic.selector.unregister(self.sock)
            self.sock.close()
            self._resume()  # the connection ended, the session did not
            return
        if not self.closed:
            self.closed = True
            self.traffic.tally.dropped += 1
            self.traffic.tally.note(f"{self.nick}'s connection ended: {reason}")
            if not self.slow:
                self.traffic.selector.unregister(self.sock)
            self.sock.close()


class Traffic:
    def __init__(self, port: int | list[int], pairs: int, window: int = 20, seed: int = 1,
                 slow_share: float = 0.25, sessions: bool = False):
        """``port``: chatd's line port; or the ports of several chatd hosts (a cluster), and
        then the two of each pair connect to different hosts: a<i> to the i-th (round), b<i>
        to the next. ``sessions``: each client has a session and resumes it when cut."""
        self.sessions = sessions
        self._cuts: list[tuple[str, str]] = []
        self._cuts_lock = threading.Lock()
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

    def cut(self, rng: random.Random, most: int = 3) -> None:
        """Cut 1 to ``most`` clients' connections, each in one of the :data:`CUTS` ways
        (done by the traffic's thread, between two of its steps)."""
        chosen = rng.sample(sorted(self.clients), min(len(self.clients), rng.randint(1, most)))
        with self._cuts_lock:
            self._cuts += [(nick, rng.choice(CUTS)) for nick in chosen]

    def _run(self) -> None:
        while not self._done.is_set():
            with self._cuts_lock:
                cuts, self._cuts = self._cuts, []
            for nick, how in cuts:
                self.clients[nick].cut(how)
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
            and not any(c.pieces or c.resuming for c in self.clients.values() if not c.closed)

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
            for sock in client.abandoned:
                sock.close()
        return self.tally


def read_from(line: bytes) -> tuple[bytes, int, bytes, int, bytes]:
    """A ``FROM <sender> <n> <nick>:<k>:<body>`` line's sender, ``n``, nick, ``k`` and body
    (ValueError if garbled)."""
    _, sender, n, text = line.split(b" ", 3)
    nick, k, payload = text.split(b":", 2)
    return sender, int(n), nick, int(k), payload


def run(port: int | list[int], pairs: int, crashes: int, crash, seed: int = 1, interval=(0.05, 0.5),
        settle: float = 60.0, progress=None, sessions: bool = False, cuts: int = 0) -> Tally:
    """Stream between ``pairs`` pairs while calling ``crash(rng)`` ``crashes`` times, a random
    ``interval`` apart; then settle and tally. ``sessions``: every client has one, and besides
    the crashes ``cuts`` times connections are cut (:meth:`Traffic.cut`), in a random order."""
    traffic = Traffic(port, pairs, seed=seed, sessions=sessions)
    deadline = time.monotonic() + 30
    traffic.start()
    while not all(c.paired and (c.token or not sessions) for c in traffic.clients.values()):
        if time.monotonic() > deadline:
            traffic.finish(0)
            raise TimeoutError("the pairs did not pair within 30 s")
        time.sleep(0.01)
    rng = random.Random(seed * 7919)
    steps = ["crash"] * crashes + ["cut"] * cuts
    rng.shuffle(steps)
    try:
        for number, step in enumerate(steps):
            time.sleep(rng.uniform(*interval))
            if step == "cut":
                traffic.cut(rng)
            else:
                crash(rng)
                traffic.tally.crashes += 1
            if progress and (number + 1) % max(len(steps) // 10, 1) == 0:
                progress(traffic.tally)
    except BaseException:
        traffic.finish(0)  # a failed crash step leaves no clients (nor their nicks) behind it
        raise
    time.sleep(interval[1])
    return traffic.finish(settle)
