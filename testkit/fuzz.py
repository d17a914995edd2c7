"""A fuzzer for the running daemons: holderd's socket, chatd's line and web ports and its control socket.

Theory of operation
-------------------
A :class:`Fuzzer` plays *sessions* against real daemons, one connection each,
chosen at random from a seeded :class:`random.Random` (the same seed plays the
same sessions, so a failure reproduces): on holderd's socket, frames that are
valid, valid with a field replaced by any JSON, valid with bytes flipped,
pipelined, lying about their fd count, announcing a huge body or more than 253
fds, carrying fds of every kind (a pipe, a directory opened ``O_RDONLY``, an
epoll fd, UNIX and TCP sockets, an eventfd, a memfd, ``/dev/null``, the very
connection they travel on, 253 at once), truncated, and connections dropped
mid-frame; on the line port, commands with odd arguments, junk, invalid UTF-8,
over-long lines, floods that never read; on the web port, broken HTTP heads,
WebSocket frames of any opcode, mask, length and reserved bits, lies about
their length; on the control socket, what holderd gets. It reads what each
answers and tallies it (:class:`Tally`), and notes *anomalies*: a request that
got no answer, or not the answer the protocol promises (a valid request
refused, a fd-count lie not reported as ``fd-count-mismatch``...).

It never touches what it must not: holder names that existed when it started,
or under a protected prefix (``chatd/``), are never stored over or removed
(a request that would, even after mutation, is not sent: ``skipped``); it
never asks chatd's control socket to ``crash`` or ``drain``. Names it makes
start with ``fz/``, and :meth:`Fuzzer.clean_up` removes every name it left.

After a run, :func:`survey` and :class:`Baseline` say what matters: both
daemons alive, still serving honest clients, holderd holding what it held
(names and inodes), and each daemon's open fd count back where it was.

Used by ``tests/process/test_fuzz.py`` (bounded, in CI) and ``bench/fuzz.py``
(``--seconds N``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import select
import socket
import struct
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from fdkeep.errors import Error
from fdkeep.fdpass import MAX_FDS, close_fds, recv_with_fds, send_with_fds
from fdkeep.frames import HEADER, FrameDecoder, encode_frame
from holderd.client import HolderClient

FUZZ_PREFIX = "fz/"
FD_KINDS = ("pipe", "dir", "epoll", "unix", "tcp", "eventfd", "memfd", "devnull", "self")
CONTROL_FORBIDDEN = ("crash", "drain")
REPLY_TIMEOUT = 3.0


def _received(sock, wait: float) -> bytes:
    """What comes within ``wait`` seconds of silence (at most 1 MiB), until EOF or an error."""
    sock.settimeout(wait)
    data = b""
    try:
        while len(data) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (socket.timeout, OSError):
        pass
    return data


def _close(sock, rng: random.Random) -> None:
    """Close, now and then with a reset (SO_LINGER 0) rather than a FIN."""
    if rng.random() < 0.3:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _answers(labels: list[str]) -> list[str]:
    """What came back, less the events holderd may send at any time (a lease an earlier
    request of the session asked for, granted now)."""
    return [label for label in labels if label != "lease-granted"]


# -- tallies --------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What was sent to each target, by case, and what came back, by outcome."""

    sent: Counter = field(default_factory=Counter)
    got: dict = field(default_factory=lambda: defaultdict(Counter))
    anomalies: list = field(default_factory=list)
    sessions: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def note(self, target: str, case: str, *outcomes: str) -> None:
        self.sent[target, case] += 1
        for outcome in outcomes:
            self.got[target, case][outcome] += 1

    def anomaly(self, target: str, case: str, what: str) -> None:
        self.got[target, case]["ANOMALY"] += 1
        if len(self.anomalies) < 100:
            self.anomalies.append(f"{target} {case}: {what}")

    def table(self) -> str:
        rows = [("target", "case", "sent", "what came back")]
        for (target, case), count in sorted(self.sent.items()):
            outcomes = ", ".join(f"{name} {n}" for name, n in self.got[target, case].most_common())
            rows.append((target, case, str(count), outcomes or "-"))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c:>{widths[2]}}  {d}" for a, b, c, d in rows]
        lines.insert(1, "-" * max(len(line) for line in lines))
        sessions = ", ".join(f"{target} {n}" for target, n in sorted(self.sessions.items()))
        lines.append(f"{sum(self.sessions.values())} sessions ({sessions}), {sum(self.sent.values())} cases in "
                     f"{self.seconds:.1f} s; anomalies: {len(self.anomalies)}")
        return "\n".join(lines + [f"  ANOMALY {a}" for a in self.anomalies])


@dataclass
class Targets:
    holder_socket: str | None = None
    control_socket: str | None = None
    line_port: int | None = None
    web_port: int | None = None
    host: str = "127.0.0.1"
    #: Holder names of our uid the fuzzer must leave alone (besides those under ``protected_prefixes``).
    protected: frozenset = frozenset()
    protected_prefixes: tuple = ("chatd/",)

    def touches_protected(self, body) -> bool:
        """Would this holder request store over or remove a protected name?"""
        if not isinstance(body, dict):
            return False
        names = self.protected

        def guarded(name) -> bool:
            return isinstance(name, str) and (name in names or name.startswith(self.protected_prefixes))

        if body.get("op") == "STORE":
            items = body.get("items")
            return isinstance(items, list) and any(isinstance(i, dict) and guarded(i.get("name")) for i in items)
        if body.get("op") == "REMOVE":
            if "names" in body:
                wanted = body["names"]
                return isinstance(wanted, list) and any(guarded(n) for n in wanted)
            prefix = body.get("prefix")
            return isinstance(prefix, str) and (any(n.startswith(prefix) for n in names) or any(
                p.startswith(prefix) or prefix.startswith(p) for p in self.protected_prefixes))
        return False


# -- file descriptors of every kind ---------------------------------------------------------------
class FdMaker:
    """Makes fds of every kind to send; keeps their other ends until :meth:`release`."""

    def __init__(self):
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._partners: list = []

    def make(self, kind: str, own: socket.socket | None = None) -> int:
        if kind == "pipe":
            r, w = os.pipe()
            self._partners.append(w)
            return r
        if kind == "dir":
            return os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        if kind == "epoll":
            with select.epoll() as poller:
                return os.dup(poller.fileno())
        if kind == "unix":
            a, b = socket.socketpair()
            self._partners.append(b)
            return a.detach()
        if kind == "tcp":
            client = socket.create_connection(self._listener.getsockname())
            server, _ = self._listener.accept()
            self._partners.append(client)
            return server.detach()
        if kind == "eventfd":
            return os.eventfd(0)
        if kind == "memfd":
            fd = os.memfd_create("fuzz")
            os.write(fd, b"fuzz")
            return fd
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDONLY)
        if kind == "self" and own is not None:
            return os.dup(own.fileno())
        return os.open(os.devnull, os.O_RDONLY)

    def release(self, rng: random.Random, everything: bool = False) -> None:
        """Close the other ends (all, or a random half: held sockets then hang up in holderd)."""
        keep = []
        for partner in self._partners:
            if everything or rng.random() < 0.5:
                partner.close() if hasattr(partner, "close") else os.close(partner)
            else:
                keep.append(partner)
        self._partners = keep

    def close(self) -> None:
        self.release(random.Random(0), everything=True)
        self._listener.close()


def send_all(sock: socket.socket, data: bytes, fds=()) -> None:
    """Bytes, fds riding on the first."""
    view = memoryview(data)
    sent = send_with_fds(sock, view, fds) if data else 0
    if sent < len(view):
        sock.sendall(view[sent:])


def ws_frame(opcode: int, payload: bytes, fin: bool = True, mask: bytes | None = b"\x00\x00\x00\x00",
             rsv: int = 0, long_form: int = 0) -> bytes:
    """A WebSocket frame as a browser sends it (masked), or broken as asked: ``long_form`` 1 or 2
    writes the length with 2 or 8 bytes even where fewer would do (RFC 6455 forbids it)."""
    head = bytes([(0x80 if fin else 0) | (rsv << 4) | (opcode & 15)])
    n, bit = len(payload), 0x80 if mask else 0
    if n < 126 and not long_form:
        head += bytes([bit | n])
    elif n < 65536 and long_form != 2:
        head += bytes([bit | 126]) + struct.pack(">H", n)
    else:
        head += bytes([bit | 127]) + struct.pack(">Q", n)
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


# -- the fuzzer -------------------------------------------------------------------------------------
class Fuzzer:
    def __init__(self, targets: Targets, seed: int):
        self.targets = targets
        self.seed = seed
        self.rng = random.Random(seed)
        self.tally = Tally()
        self.fds = FdMaker()
        self._serial = 0

    # -- what to send ------------------------------------------------------------------
    def text(self, size: int = 12) -> str:
        alphabet = "abcXYZ019 _-/.:\\\"'{}[]\x00\n\té中😀"
        text = "".join(self.rng.choice(alphabet) for _ in range(self.rng.randint(0, size)))
        if self.rng.random() < 0.3:  # a lone surrogate: JSON "\ud800" (it once killed holderd)
            text += self.rng.choice("\ud800\udfff")
        return text

    def junk(self, depth: int = 0):
        """Any JSON value."""
        kind = self.rng.randrange(10 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.random() < 0.5
        if kind == 2:
            return self.rng.choice([0, -1, 1, 2 ** 31, 2 ** 64, -(2 ** 70), self.rng.randint(-999, 999)])
        if kind == 3:
            return self.rng.choice([0.5, -1e308, 1e-300, 3.0])
        if kind in (4, 5):
            return self.text()
        if kind in (6, 7):
            return [self.junk(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self.text(6): self.junk(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def name(self) -> str:
        return f"{FUZZ_PREFIX}{self.rng.choice('abc')}/{self.rng.randrange(8)}"

    def holder_request(self) -> tuple[dict, list[str]]:
        """A valid request (names under fz/), and the kinds of the fds it carries."""
        op = self.rng.choice(["PING", "STORE", "STORE", "RETRIEVE", "LIST", "REMOVE", "LEASE"])
        body: dict = {"op": op}
        if self.rng.random() < 0.8:
            body["id"] = self.rng.choice([self.rng.randrange(1000), self.text(4), None])
        kinds: list[str] = []
        if op == "STORE":
            count = self.rng.randint(1, 4)
            body["items"] = [{"name": self.name(), "meta": base64.b64encode(self.rng.randbytes(
                self.rng.choice([0, 3, 64, 4096]))).decode()} for _ in range(count)]
            names = {item["name"] for item in body["items"]}
            if len(names) < count:
                body["items"] = [{"name": n} for n in sorted(names)]
            kinds = [self.rng.choice(FD_KINDS) for _ in body["items"]]
        elif op in ("RETRIEVE", "LIST", "REMOVE"):
            if self.rng.random() < 0.5:
                body["names"] = [self.name() for _ in range(self.rng.randint(0, 3))]
            else:
                body["prefix"] = FUZZ_PREFIX + self.rng.choice(["", "a", "b/", "c/1"])
        elif op == "LEASE":
            body["lease"] = FUZZ_PREFIX + "lease/" + str(self.rng.randrange(3))
        return body, kinds

    def mutate(self, body: dict) -> dict:
        body = dict(body)
        for _ in range(self.rng.randint(1, 2)):
            how = self.rng.randrange(5)
            key = self.rng.choice(sorted(body) or ["op"])
            if how == 0:
                body[key] = self.junk()
            elif how == 1:
                body.pop(key, None)
            elif how == 2:
                body[self.rng.choice(["items", "names", "prefix", "lease", "id", "op", self.text(5)])] = self.junk()
            elif how == 3 and isinstance(body.get("items"), list) and body["items"]:
                items = list(body["items"])
                index = self.rng.randrange(len(items))
                items[index] = {**items[index], self.rng.choice(["name", "meta"]): self.junk()} \
                    if isinstance(items[index], dict) else self.junk()
                body["items"] = items
            else:
                body["op"] = self.rng.choice(["PING", "ping", "STORE", "RETRIEVE", "LIST", "LEASE", "", self.text(4)])
        return body

    def flip_bytes(self, data: bytes, start: int = 0) -> bytes:
        data = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            if len(data) > start:
                data[self.rng.randrange(start, len(data))] = self.rng.randrange(256)
        return bytes(data)

    # -- running ---------------------------------------------------------------------------
    def run(self, sessions: int | None = None, seconds: float | None = None) -> Tally:
        """Play sessions until ``sessions`` were played or ``seconds`` passed (whichever first)."""
        targets = [name for name, there in (
            ("holderd", self.targets.holder_socket), ("line", self.targets.line_port),
            ("web", self.targets.web_port), ("control", self.targets.control_socket)) if there]
        weights = {"holderd": 4, "line": 2, "web": 2, "control": 1}
        began = time.monotonic()
        played = 0
        try:
            while (sessions is None or played < sessions) and (
                    seconds is None or time.monotonic() - began < seconds):
                target = self.rng.choices(targets, [weights[t] for t in targets])[0]
                self.tally.sessions[target] += 1
                getattr(self, "_session_" + target)()
                played += 1
                if played % 8 == 0:
                    self.fds.release(self.rng)
        finally:
            self.fds.release(self.rng, everything=True)
            self.tally.seconds = time.monotonic() - began
        return self.tally

    def close(self) -> None:
        self.fds.close()

    def clean_up(self) -> int | None:
        """Remove every holder name the fuzzer left (any not protected); how many (None: holderd
        does not answer)."""
        try:
            with HolderClient(self.targets.holder_socket) as holder:
                left = [item["name"] for item in holder.list()
                        if item["name"] not in self.targets.protected
                        and not item["name"].startswith(self.targets.protected_prefixes)]
                return holder.remove(names=left) if left else 0
        except Error:
            return None

    # -- frame sessions (holderd, control) --------------------------------------------------
    def _unix(self, path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REPLY_TIMEOUT)
        sock.connect(path)
        return sock

    def _replies(self, sock, decoder: FrameDecoder, finals: int, target: str, case: str) -> list[str]:
        """Read until ``finals`` final replies came (an error, or a chunk with more=false); their labels.
        'eof' if the daemon closed the connection; an anomaly if it stayed silent."""
        labels = []
        deadline = time.monotonic() + REPLY_TIMEOUT
        while finals > 0:
            try:
                frame = self._read_frame(sock, decoder, deadline)
            except Error as exc:
                self.tally.anomaly(target, case, f"a reply the client cannot decode: {exc}")
                return labels + ["undecodable"]
            if frame == "no-reply":
                self.tally.anomaly(target, case, f"no reply within {REPLY_TIMEOUT} s")
            if isinstance(frame, str):
                return labels + [frame]
            close_fds(frame.fds)
            body = frame.body
            if body.get("ok") is True:
                if body.get("event") == "lease-granted":
                    labels.append("lease-granted")
                    continue
                if body.get("items") is not None and len(frame.fds) not in (0, len(body["items"])):
                    self.tally.anomaly(target, case, f"{len(frame.fds)} fds for {len(body['items'])} items")
                labels.append("ok")
                if not body.get("more"):
                    finals -= 1
            elif body.get("ok") is False and isinstance(body.get("error"), str) and isinstance(body.get("message"), str):
                labels.append(body["error"])
                finals -= 1
            else:
                self.tally.anomaly(target, case, f"a malformed reply: {str(body)[:200]}")
                return labels + ["malformed"]
        return labels

    def _send(self, sock, data: bytes, fds=()) -> bool:
        """Send; False if the daemon closed the connection. The fds are ours to close after."""
        try:
            send_all(sock, data, fds)
            return True
        except OSError:
            return False
        finally:
            close_fds(fds)

    def _session_holderd(self) -> None:
        self._frame_session("holderd", self.targets.holder_socket)

    def _session_control(self) -> None:
        self._frame_session("control", self.targets.control_socket)

    def _frame_session(self, target: str, path: str) -> None:
        try:
            sock = self._unix(path)
        except OSError as exc:
            self.tally.anomaly(target, "connect", f"cannot connect: {exc}")
            return
        decoder = FrameDecoder(64 << 20)
        cases = ["valid", "mutated", "flipped", "pipelined", "fd-lie", "fd-kinds", "fds-unasked", "many-fds",
                 "too-many-fds"]
        ends = ["close", "close", "truncated", "garbage", "huge-length", "fd-count-over-253", "half-close"]
        try:
            for _ in range(self.rng.randint(1, 5)):
                if not self._frame_case(target, self.rng.choice(cases), sock, decoder):
                    return
            self._frame_end(target, self.rng.choice(ends), sock, decoder)
        finally:
            decoder.close()
            sock.close()

    def _request(self, target: str) -> tuple[dict, list[str]]:
        if target == "holderd":
            return self.holder_request()
        body = {"op": self.rng.choice(["status", "clients", "restore", "backup", "status", self.text(6)])}
        if self.rng.random() < 0.5:
            body["id"] = self.rng.randrange(100)
        return body, []

    def _allowed(self, target: str, body) -> bool:
        if target == "holderd":
            return not self.targets.touches_protected(body)
        return not (isinstance(body, dict) and body.get("op") in CONTROL_FORBIDDEN)

    def _frame_case(self, target: str, case: str, sock, decoder) -> bool:
        """One request (or a few) and its replies; False once the connection is over."""
        rng = self.rng
        if case in ("valid", "mutated", "flipped"):
            body, kinds = self._request(target)
            if case == "mutated":
                body = self.mutate(body)
                if isinstance(body.get("items"), list) and rng.random() < 0.7:
                    kinds = [rng.choice(FD_KINDS) for _ in body["items"]]
            data = encode_frame(body, len(kinds))
            if case == "flipped":
                data = data[:HEADER.size] + self.flip_bytes(data[HEADER.size:])
                try:
                    decoded = json.loads(data[HEADER.size:].decode("utf-8"))
                except ValueError:
                    decoded = None
                if not self._allowed(target, decoded):
                    self.tally.note(target, case, "skipped")
                    return True
            elif not self._allowed(target, body):
                self.tally.note(target, case, "skipped")
                return True
            if not self._send(sock, data, [self.fds.make(k, sock) for k in kinds]):
                self.tally.note(target, case, "eof")
                return False
            labels = self._replies(sock, decoder, 1, target, case)
            self.tally.note(target, case, *labels)
            if case == "valid" and target == "holderd" and set(_answers(labels)) != {"ok"}:
                self.tally.anomaly(target, case, f"a valid {body.get('op')} got {labels}")
            return "eof" not in labels and "no-reply" not in labels
        if case == "pipelined":  # several frames back to back, each with its fds, before any reply
            frames = []
            for _ in range(rng.randint(2, 6)):
                body, kinds = self._request(target)
                if rng.random() < 0.5:
                    body = self.mutate(body)
                if not self._allowed(target, body):
                    body, kinds = {"op": "PING" if target == "holderd" else "status"}, []
                frames.append((encode_frame(body, len(kinds)), [self.fds.make(k, sock) for k in kinds]))
            sent = True
            for data, fds in frames:
                sent = sent and self._send(sock, data, fds)
                close_fds(fds)
            if not sent:
                self.tally.note(target, case, "eof")
                return False
            labels = self._replies(sock, decoder, len(frames), target, case)
            self.tally.note(target, case, *labels)
            return "eof" not in labels and "no-reply" not in labels
        if case in ("fd-lie", "fds-unasked", "many-fds", "fd-kinds"):
            if case == "fd-lie":  # the header announces one count, another comes
                items = [{"name": self.name()} for _ in range(rng.randint(1, 3))]
                announced = rng.choice([len(items), rng.randint(0, 6)])
                kinds = [rng.choice(FD_KINDS) for _ in range(rng.choice([n for n in range(7) if n != announced]))]
                body = {"op": "STORE", "items": items}
            elif case == "fds-unasked":  # fds, rightly announced, with a request that takes none
                body = {"op": rng.choice(["PING", "LIST", "RETRIEVE", "LEASE"])}
                if body["op"] == "LEASE":
                    body["lease"] = FUZZ_PREFIX + "lease"
                kinds = [rng.choice(FD_KINDS) for _ in range(rng.randint(1, 4))]
                announced = len(kinds)
            elif case == "many-fds":  # 253, the most one message carries
                kinds = ["pipe"] * MAX_FDS
                body = {"op": "STORE", "items": [{"name": f"{FUZZ_PREFIX}many/{i}"} for i in range(MAX_FDS)]}
                if rng.random() < 0.3:
                    body = {"op": "LIST"}
                announced = MAX_FDS
            else:  # one of every kind
                kinds = list(FD_KINDS)
                body = {"op": "STORE", "items": [{"name": f"{FUZZ_PREFIX}kind/{k}/{rng.randrange(3)}"} for k in kinds]}
                announced = len(kinds)
            if target == "control":
                body = {"op": "status"}  # chatd's control socket takes no fds: it closes them
            if not self._send(sock, encode_frame(body, announced), [self.fds.make(k, sock) for k in kinds]):
                self.tally.note(target, case, "eof")
                return False
            labels = self._replies(sock, decoder, 1, target, case)
            self.tally.note(target, case, *labels)
            lie = len(kinds) != announced
            if target == "holderd":
                lie = lie or (len(kinds) != len(body["items"]) if body["op"] == "STORE" else bool(kinds))
            want = ["fd-count-mismatch"] if lie else ["ok"]
            if _answers(labels) != want:
                self.tally.anomaly(target, case, f"{body['op']} announcing {announced} fds with "
                                                 f"{len(kinds)} sent got {labels}, not {want}")
            if case == "fd-kinds" and target == "holderd" and _answers(labels) == ["ok"] and rng.random() < 0.5:
                return self._retrieve_kinds(target, sock, decoder, body)
            return "eof" not in labels and "no-reply" not in labels
        if case == "too-many-fds":
            # more than SCM_MAX_FD in one sendmsg: the kernel refuses it, nothing is sent
            fds = [self.fds.make("devnull") for _ in range(MAX_FDS + 1)]
            try:
                socket.send_fds(sock, [HEADER.pack(2, len(fds)) + b"{}"], fds)
                outcome = "sent"
            except OSError as exc:
                outcome = f"kernel refused ({os.strerror(exc.errno)})" if exc.errno else "kernel refused"
            finally:
                close_fds(fds)
            self.tally.note(target, case, outcome)
            if outcome == "sent":
                self.tally.anomaly(target, case, "the kernel took more than 253 fds in one message")
                return False
            return True
        raise ValueError(case)

    def _retrieve_kinds(self, target: str, sock, decoder, stored: dict) -> bool:
        """RETRIEVE what a fd-kinds STORE stored: one fd per name, each with the inode LIST gives."""
        names = [item["name"] for item in stored["items"]]
        self._send(sock, encode_frame({"op": "LIST", "id": "k", "names": names}))
        listed = []
        while True:
            frame = self._frame(sock, decoder)
            if frame is None:
                self.tally.note(target, "fd-kinds-back", "no-reply")
                return False
            listed += frame.body.get("items", [])
            if not frame.body.get("more"):
                break
        self._send(sock, encode_frame({"op": "RETRIEVE", "id": "r", "names": names}))
        frame = self._frame(sock, decoder)
        if frame is None:
            self.tally.note(target, "fd-kinds-back", "no-reply")
            return False
        if not frame.body.get("ok"):
            close_fds(frame.fds)
            code = frame.body.get("error")
            self.tally.note(target, "fd-kinds-back", str(code))
            self.tally.anomaly(target, "fd-kinds-back", f"RETRIEVE of what was just stored refused: {frame.body}")
            return True
        try:
            got = {item["name"]: (item["ino"], os.fstat(fd).st_ino) for item, fd in zip(frame.body["items"], frame.fds)}
        finally:
            close_fds(frame.fds)
        inodes = {item["name"]: item["ino"] for item in listed}
        # a held socket may hang up (its other end closed) between the two: compare what both have
        wrong = [n for n in got if n in inodes and not (got[n][0] == got[n][1] == inodes[n])]
        self.tally.note(target, "fd-kinds-back", "ok" if not wrong else "wrong-inode")
        if wrong:
            self.tally.anomaly(target, "fd-kinds-back", f"inodes differ for {wrong}")
        return True

    @staticmethod
    def _read_frame(sock, decoder: FrameDecoder, deadline: float):
        """The next frame; "eof" or "no-reply" (by ``deadline``) if none. Raises Error if undecodable."""
        while True:
            frame = decoder.next_frame()
            if frame is not None:
                return frame
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data, fds = recv_with_fds(sock)
            except (socket.timeout, BlockingIOError):
                return "no-reply"
            except (ConnectionError, OSError):
                return "eof"
            if not data:
                close_fds(fds)
                return "eof"
            decoder.feed(data, fds)

    def _frame(self, sock, decoder):
        """The next reply, past any event; None if none came."""
        deadline = time.monotonic() + REPLY_TIMEOUT
        while True:
            try:
                frame = self._read_frame(sock, decoder, deadline)
            except Error:
                return None
            if isinstance(frame, str):
                return None
            if not frame.body.get("event"):
                return frame
            close_fds(frame.fds)  # a lease granted meanwhile, not the reply

    def _frame_end(self, target: str, end: str, sock, decoder) -> None:
        rng = self.rng
        if end == "close":
            self.tally.note(target, "end:close", "closed")
            return
        # The daemon keeps the fds of a frame not yet complete, its own connection's among them
        # ("self"), until the frame is whole or its timeout ends the connection.
        if end == "truncated":  # a frame cut anywhere, its fds sent, then gone
            body, kinds = self._request(target)
            kinds = kinds or [rng.choice(FD_KINDS)]
            data = encode_frame(body, len(kinds))
            cut = rng.randrange(1, len(data))
            self._send(sock, data[:cut], [self.fds.make(k, sock) for k in kinds])
            self.tally.note(target, "end:truncated", "closed")
            if rng.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if end == "garbage":
            data = rng.randbytes(rng.randint(1, 300))
            kinds = [rng.choice(FD_KINDS) for _ in range(rng.choice([0, 0, 1, 3]))]
            self._send(sock, data, [self.fds.make(k, sock) for k in kinds])
            self.tally.note(target, "end:garbage", "closed")
            return
        if end == "huge-length":
            length = rng.choice([(1 << 20) + 1, 1 << 30, 2 ** 32 - 1, rng.randint((1 << 20) + 1, 2 ** 32 - 1)])
            if target == "control":
                length = max(length, (1 << 20) + 1)
            self._send(sock, HEADER.pack(length, 0) + rng.randbytes(rng.randint(0, 50)))
            labels = self._replies(sock, decoder, 1, target, "end:huge-length")
            labels += self._eof(sock)
            self.tally.note(target, "end:huge-length", *labels)
            if _answers(labels) != ["frame-too-large", "eof"]:
                self.tally.anomaly(target, "end:huge-length", f"got {labels}, not frame-too-large then the end")
            return
        if end == "fd-count-over-253":
            self._send(sock, HEADER.pack(2, rng.randint(MAX_FDS + 1, 65535)) + b"{}")
            labels = self._replies(sock, decoder, 1, target, "end:fd-count-over-253") + self._eof(sock)
            self.tally.note(target, "end:fd-count-over-253", *labels)
            if _answers(labels) != ["bad-frame", "eof"]:
                self.tally.anomaly(target, "end:fd-count-over-253", f"got {labels}, not bad-frame then the end")
            return
        if end == "half-close":
            sock.shutdown(socket.SHUT_WR)
            labels = self._eof(sock)
            self.tally.note(target, "end:half-close", *labels)
            if labels != ["eof"]:
                self.tally.anomaly(target, "end:half-close", f"got {labels}: it does not end its side")
            return
        raise ValueError(end)

    def _eof(self, sock) -> list[str]:
        deadline = time.monotonic() + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data, fds = recv_with_fds(sock)
            except socket.timeout:
                break
            except OSError:
                return ["eof"]
            close_fds(fds)
            if not data:
                return ["eof"]
        return ["still-open"]

    # -- the line port -----------------------------------------------------------------------
    def line(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(10)
        if kind == 0:
            return rng.randbytes(rng.randint(0, 40))
        if kind == 1:
            return b"MSG " + rng.randbytes(rng.randint(0, 20)).replace(b"\n", b"")  # not UTF-8, mostly
        if kind == 2:
            return rng.choice([b"", b"MSG "]) + b"x" * rng.choice([1, 65530, 65537, 100_000])
        verb = rng.choice(["NICK", "PAIR", "MSG", "WHO", "PING", "QUIT", "nick", "Msg", "DANCE", ""])
        argument = rng.choice(["", " ", " " + self.text(8), f" fz{rng.randrange(50)}", " " + "n" * 40])
        return (verb + argument).encode("utf-8", "surrogatepass") + rng.choice([b"", b"\r"])

    def _tcp(self, port: int) -> socket.socket:
        sock = socket.create_connection((self.targets.host, port), timeout=REPLY_TIMEOUT)
        return sock

    def _session_line(self) -> None:
        rng = self.rng
        case = rng.choice(["lines", "lines", "flood", "half-line", "pair-chat"])
        if case == "pair-chat":
            return self._pair_chat()
        try:
            sock = self._tcp(self.targets.line_port)
        except OSError as exc:
            self.tally.anomaly("line", case, f"cannot connect: {exc}")
            return
        try:
            if case == "flood":  # a lot, never read, then gone
                data = (b"".join(self.line() + b"\n" for _ in range(50)) * rng.randint(1, 20))[:2 << 20]
                sock.settimeout(1.0)
                try:
                    sock.sendall(data)
                    outcome = "sent"
                except socket.timeout:
                    outcome = "held back"  # chatd stopped reading: TCP flow control
                except OSError:
                    outcome = "closed"
                self.tally.note("line", case, outcome)
                return
            lines = [self.line() for _ in range(rng.randint(1, 12))]
            data = b"".join(line + b"\n" for line in lines)
            if case == "half-line":
                data += self.line()[:rng.randint(1, 30)]
            pieces = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1))) if len(data) > 1 else []
            try:
                for a, b in zip([0, *pieces], [*pieces, len(data)]):
                    sock.sendall(data[a:b])
            except OSError:
                self.tally.note("line", case, "closed")
                return
            answers = self._read_lines(sock, 0.05 if rng.random() < 0.7 else 0.3)
            self.tally.note("line", case, *(answers or ["(nothing yet)"]))
        finally:
            _close(sock, rng)

    def _read_lines(self, sock, wait: float) -> list[str]:
        """The first words of what came within ``wait`` seconds ('ERR <code>' in full)."""
        data = _received(sock, wait)
        out = []
        for line in data.split(b"\n")[:-1]:
            words = line.decode("utf-8", "replace").split(" ")
            out.append(" ".join(words[:2]) if words[0] == "ERR" else words[0])
        return out

    def _pair_chat(self) -> None:
        """Two fuzz clients pair and chat: what any two clients must be able to do meanwhile."""
        self._serial += 1
        a_nick, b_nick = f"fzA{self.seed % 1000}x{self._serial}", f"fzB{self.seed % 1000}x{self._serial}"
        from ctl.probe import LineClient

        a = b = None
        try:
            a, b = LineClient(self.targets.line_port), LineClient(self.targets.line_port)
            a.send(f"NICK {a_nick}", f"PAIR {b_nick}")
            b.send(f"NICK {b_nick}", f"PAIR {a_nick}")
            got_a = a.lines(3)
            got_b = b.lines(3)
            a.send("MSG one", "MSG two")
            got = b.lines(2)
            ok = got_a[:2] == [f"OK NICK {a_nick}", f"OK PAIR {b_nick}"] and f"PAIRED {a_nick}" in got_b and \
                got == [f"FROM {a_nick} 1 one", f"FROM {a_nick} 2 two"]
            self.tally.note("line", "pair-chat", "chatted" if ok else "wrong")
            if not ok:
                self.tally.anomaly("line", "pair-chat", f"{got_a} {got_b} {got}")
        except (OSError, EOFError) as exc:
            self.tally.note("line", "pair-chat", "failed")
            self.tally.anomaly("line", "pair-chat", f"two clients could not chat: {exc!r}")
        finally:
            for client in (a, b):
                if client is not None:
                    client.close()

    # -- the web port ------------------------------------------------------------------------
    HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    HEADS = (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
             b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc", b"GET /nope HTTP/1.0\r\n\r\n",
             b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", b"\r\n\r\n")

    def web_frame(self) -> bytes:
        rng = self.rng
        kind = rng.randrange(8)
        mask = rng.randbytes(4)
        if kind <= 2:
            message = rng.choice([{"type": "who"}, {"type": "ping"}, {"type": "nick", "name": f"fzw{rng.randrange(99)}"},
                                  {"type": "msg", "text": self.text()}, {"type": "pair", "peer": self.text(5)},
                                  {"type": self.text(4)}, self.junk()])
            payload = json.dumps(message).encode("utf-8", "surrogatepass")
            if rng.random() < 0.3 and len(payload) > 2:  # in two fragments, a ping between
                cut = rng.randrange(1, len(payload))
                return (ws_frame(1, payload[:cut], fin=False, mask=mask) + ws_frame(9, b"p", mask=rng.randbytes(4))
                        + ws_frame(0, payload[cut:], mask=rng.randbytes(4)))
            return ws_frame(1, payload, mask=mask)
        if kind == 3:
            return ws_frame(rng.choice([9, 10]), rng.randbytes(rng.randint(0, 130)), mask=mask)
        if kind == 4:  # any opcode, fin, reserved bits, mask or none, length in any form
            return ws_frame(rng.randrange(16), rng.randbytes(rng.randint(0, 200)), rng.random() < 0.5,
                            rng.choice([None, mask]), rng.randrange(8), rng.randrange(3))
        if kind == 5:  # a length that is not there, up to 2**64 - 1
            return bytes([rng.randrange(256), 0xFF]) + struct.pack(">Q", rng.choice(
                [2 ** 64 - 1, 2 ** 63, 70000, rng.randrange(2 ** 64)])) + mask
        if kind == 6:
            return ws_frame(1, b"x" * rng.choice([65536, 65537, 200000]), mask=mask)[:rng.randint(14, 70000)]
        return rng.randbytes(rng.randint(1, 40))

    def _session_web(self) -> None:
        rng = self.rng
        case = rng.choice(["handshake+frames", "handshake+frames", "http", "mutated-head", "bytes"])
        if case == "handshake+frames":
            data = self.HANDSHAKE + b"".join(self.web_frame() for _ in range(rng.randint(1, 6)))
        elif case == "http":
            data = rng.choice(self.HEADS)
        elif case == "mutated-head":
            data = self.flip_bytes(rng.choice((self.HANDSHAKE, *self.HEADS)))
        else:
            data = rng.randbytes(rng.randint(1, 500))
        try:
            sock = self._tcp(self.targets.web_port)
        except OSError as exc:
            self.tally.anomaly("web", case, f"cannot connect: {exc}")
            return
        try:
            cut = rng.randint(0, len(data))
            gone_mid_way = rng.random() < 0.25  # disconnect with a request or frame cut short
            try:
                sock.sendall(data[:cut])
                if gone_mid_way:
                    self.tally.note("web", case, "left mid-way")
                    return
                sock.sendall(data[cut:])
            except OSError:
                self.tally.note("web", case, "closed")
                return
            self.tally.note("web", case, *self._web_answers(sock, 0.05 if rng.random() < 0.7 else 0.3))
        finally:
            _close(sock, rng)

    def _web_answers(self, sock, wait: float) -> list[str]:
        """'HTTP <status>', then each WebSocket message's type or close code."""
        data = _received(sock, wait)
        if not data:
            return ["(nothing yet)"]
        head, _, rest = data.partition(b"\r\n\r\n")
        out = [" ".join(head.split(b"\r\n")[0].decode("latin-1").split(" ")[:2])]
        while out[0] == "HTTP/1.1 101" and len(rest) >= 2:
            opcode, length, at = rest[0] & 15, rest[1] & 127, 2
            if length == 126:
                length, at = struct.unpack_from(">H", rest, 2)[0], 4
            elif length == 127:
                length, at = struct.unpack_from(">Q", rest, 2)[0], 10
            payload, rest = rest[at:at + length], rest[at + length:]
            if opcode == 1:
                try:
                    message = json.loads(payload)
                    out.append("ws " + str(message.get("type") if isinstance(message, dict) else "text"))
                except ValueError:
                    out.append("ws text")
            elif opcode == 8:
                out.append(f"ws close {struct.unpack('>H', payload[:2])[0] if len(payload) >= 2 else ''}")
            else:
                out.append({9: "ws ping", 10: "ws pong"}.get(opcode, f"ws opcode {opcode}"))
        return out


# -- after a run: are they still what they were? ------------------------------------------------
def open_fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def holder_items(path: str, prefix: str = "") -> dict:
    """name -> (ino, kind, meta) of what holderd holds for our uid."""
    with HolderClient(path) as holder:
        return {item["name"]: (item["ino"], item["kind"], item["meta"]) for item in holder.list(prefix)}


def store_one_of_each(path: str, prefix: str = "base/") -> list:
    """Store an fd of every kind under ``prefix`` (sockets whose other ends stay open, so none
    hangs up); the objects to keep alive until the end (the other ends, and the maker)."""
    maker = FdMaker()
    kinds = [k for k in FD_KINDS if k != "self"]
    fds = [maker.make(kind) for kind in kinds]
    try:
        with HolderClient(path) as holder:
            holder.store([(f"{prefix}{kind}", kind.encode(), fd) for kind, fd in zip(kinds, fds)])
    finally:
        close_fds(fds)
    return [maker]


@dataclass
class Baseline:
    """What the daemons were before a run: fd counts and holderd's items."""

    pids: dict
    fds: dict
    items: dict

    @classmethod
    def take(cls, holder_socket: str, pids: dict) -> "Baseline":
        return cls(dict(pids), {name: open_fd_count(pid) for name, pid in pids.items()},
                   holder_items(holder_socket))

    def fd_problems(self, slack: int) -> list[str]:
        problems = []
        for name, pid in self.pids.items():
            now = open_fd_count(pid)
            if now > self.fds[name] + slack:
                problems.append(f"{name} has {now} fds open, {self.fds[name]} before (slack {slack})")
        return problems


def survey(holder_socket: str, baseline: Baseline, keep: dict | None = None) -> list[str]:
    """What is wrong now: holderd not serving, not holding what it held (names under ``keep``'s
    prefixes, by inode and kind and meta), or a daemon gone."""
    problems = []
    for name, pid in baseline.pids.items():
        if not os.path.exists(f"/proc/{pid}"):
            problems.append(f"{name} (pid {pid}) is gone")
    try:
        with HolderClient(holder_socket) as holder:
            if holder.ping().get("version") != 1:
                problems.append("holderd's PING is wrong")
            a, b = socket.socketpair()
            try:
                holder.store([("probe/after-fuzz", b"probe", a.fileno())])
                [got] = holder.retrieve("probe/after-fuzz")
                with socket.socket(fileno=got.fd) as back:
                    back.sendall(b"still here")
                b.settimeout(2)
                if b.recv(100) != b"still here" or got.meta != b"probe":
                    problems.append("a STORE/RETRIEVE round trip came back wrong")
                holder.remove(names=["probe/after-fuzz"])
            finally:
                a.close()
                b.close()
        now = holder_items(holder_socket)
        for name, was in baseline.items.items():
            if keep is not None and not name.startswith(tuple(keep)):
                continue
            if now.get(name) != was:
                problems.append(f"holderd's {name} was {was}, is {now.get(name)}")
    except (Error, OSError) as exc:
        problems.append(f"holderd does not serve: {exc}")
    return problems


def settled(baseline: Baseline, slack: int, timeout: float = 15.0) -> list[str]:
    """Wait (the daemons close what the fuzzer left as they notice) until each daemon's fd count
    is back within ``slack`` of its baseline; what is still over after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        problems = baseline.fd_problems(slack)
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.1)


class HonestPair:
    """Two line clients paired on chatd, chatting before, during (untouched) and after a fuzz run:
    every message must arrive, with ``n`` counting on."""

    def __init__(self, port: int, a: str = "honestA", b: str = "honestB"):
        from ctl.probe import LineClient

        self.a, self.b = LineClient(port), LineClient(port)
        self.names = (a, b)
        self.sent = [0, 0]
        self.a.send(f"NICK {a}", f"PAIR {b}")
        assert self.a.lines(2) == [f"OK NICK {a}", f"OK PAIR {b}"]
        self.b.send(f"NICK {b}", f"PAIR {a}")
        assert self.b.lines(3) == [f"OK NICK {b}", f"OK PAIR {a}", f"PAIRED {a}"]
        assert self.a.line() == f"PAIRED {b}"

    def exchange(self, rounds: int = 3) -> list[str]:
        """Messages both ways; what went wrong."""
        problems = []
        try:
            for _ in range(rounds):
                for index, (sender, receiver) in enumerate(((self.a, self.b), (self.b, self.a))):
                    self.sent[index] += 1
                    n = self.sent[index]
                    sender.send(f"MSG honest {n}")
                    got = receiver.line()
                    want = f"FROM {self.names[index]} {n} honest {n}"
                    if got != want:
                        problems.append(f"the honest pair got {got!r}, not {want!r}")
                        return problems
        except (OSError, EOFError) as exc:
            problems.append(f"the honest pair cannot chat: {exc!r}")
        return problems

    def close(self) -> None:
        self.a.close()
        self.b.close()
