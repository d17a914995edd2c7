"""The fuzzer's bus mode: forged and garbled forwards, directory entries and host leases published
into NATS JetStream while honest pairs chat across chatd hosts.

Theory of operation
-------------------
:class:`BusFuzzer` connects to the cluster's NATS servers with nats-py, as any
program that can reach a NATS port can (issue 25 items 1-2 take that away;
until then it needs no credentials), and publishes, chosen by a seeded
:class:`random.Random` (the same seed plays the same cases):

* into the stream, on ``chat.<host>.<receiver>`` (and subjects of more tokens):
  random bytes, headers with bytes flipped, batches cut short, a header field
  replaced by JSON of any type, lengths that lie (longer, shorter, negative,
  past 8 bytes), texts over a line (with a true length), texts that are not
  UTF-8, a field too many, another version, counts past the journal's 8 bytes,
  names that are no nick, texts with line breaks (``\\nPAIRED mallory``), a good
  forward batched with a bad one, an empty message; and valid forwards that
  lie about their sender: to an honest receiver from someone it is not paired
  with, to a nick nobody holds, and to the *decoy pair*;
* into the nicks bucket (``$KV.chatd_nicks.<key>``): garbage and JSON of the
  wrong shape over the **honest members' own entries** (their hosts must put
  them back, and the other hosts keep the last entry they read), garbage,
  another version's entries, valid entries of made-up nicks on made-up hosts,
  huge values, deletes and odd ``KV-Operation`` headers under made-up keys, and
  keys that are no nick (``a.b``, ``%``, 65 characters);
* into the hosts bucket (``$KV.chatd_hosts.<key>``): garbage over the real
  hosts' leases (never read: the watch reads keys and headers only), leases and
  deletes of made-up hosts, odd ``KV-Operation`` values, keys that are no host.

**What is not sent, and why.** Nothing here authenticates a publisher yet, so a
*well-formed* lie about an honest member is believed: a valid forward naming an
honest pair (with a high ``k`` it would make the receiver drop the real ones as
seen), a valid entry naming another host for an honest nick, a ``DEL`` of an
honest nick or of a real host's lease. Those are forgeries, items 1-2 of issue
25, not bad input; the fuzzer never sends them to honest members. Instead it
forges onto a **decoy pair** (two clients paired across hosts, not counted
with the honest ones) and counts how many forged messages the decoy's receiver
got (:attr:`BusTally.forged_delivered`): today all that the room takes, which
says what auth must close, while the honest pairs' accounting stays exact.

Each case is tallied (:class:`testkit.fuzz.Tally`, target ``stream``,
``nicks`` or ``hosts``) with what NATS said (``stored``, or its error) and, for
forwards and entries, what chatd's own decoder makes of it
(``chatd.forwards.chat_forwards``, ``chatd.bus.payloads.read_entry``): ``refused
<kind>`` or ``valid``. Whether the daemons lived through it, and the honest
pairs' exactly-once accounting, are the caller's (tests/process/test_fuzz.py,
bench/fuzz.py ``--bus``).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

from chatd.bus.payloads import BusPayloadError, read_entry
from chatd.forwards import chat_forwards, encode_forward
from chatd.room import Forward
from testkit.fuzz import Tally

#: Made-up nicks and hosts are these, numbered below FAKE_KEYS (so the buckets stay small).
FAKE_PREFIX = "fz"
FAKE_KEYS = 40
#: At most this many cases a second (the honest pairs share the stream and the nodes' disks).
MAX_RATE = 300.0
#: A huge text's size: over a line, under NATS's max_payload (1 MiB).
HUGE = (70_000, 300_000)


@dataclass
class BusTargets:
    servers: list[str]
    hosts: list[str]
    #: The honest members' nicks: never sent a well-formed lie.
    honest: frozenset
    #: (sender, receiver, the receiver's host) of the decoy pair; None: no decoy.
    decoy: tuple[str, str, str] | None = None
    stream_subject: str = "chat"
    nick_bucket: str = "chatd_nicks"
    host_bucket: str = "chatd_hosts"


@dataclass
class BusTally(Tally):
    #: Valid forwards forged onto the decoy pair, and how many of them the fuzzer published.
    forged_to_decoy: int = 0
    forged_delivered: int = 0
    forged_texts: list = field(default_factory=list)


class BusFuzzer:
    def __init__(self, targets: BusTargets, seed: int):
        self.targets = targets
        self.rng = random.Random(seed)
        self.tally = BusTally()
        self._forged_k = 10 ** 6

    # -- what to send ------------------------------------------------------------------------
    def junk(self, depth: int = 0):
        """Any JSON value (and a lone surrogate), nested at most 3 deep."""
        rng = self.rng
        kind = rng.randrange(9 if depth < 3 else 6)
        if kind == 6:
            return [self.junk(depth + 1) for _ in range(rng.randrange(3))]
        if kind == 7:
            return {str(rng.randrange(99)): self.junk(depth + 1) for _ in range(rng.randrange(3))}
        if kind == 8:
            return "\ud800"
        if kind == 5:
            return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
        return [None, True, rng.randint(-2 ** 70, 2 ** 70), rng.random() * 1e6, ""][kind]

    def nick(self) -> str:
        return f"{FAKE_PREFIX}{self.rng.randrange(FAKE_KEYS)}"

    def honest_nick(self) -> str:
        return self.rng.choice(sorted(self.targets.honest))

    def host(self) -> str:
        return self.rng.choice(self.targets.hosts)

    def text(self, low: int = 0, high: int = 80) -> str:
        return "".join(self.rng.choice("abcdefgh ünï€😀") for _ in range(self.rng.randint(low, high)))

    def forward(self, receiver: str | None = None, sender: str | None = None, k: int | None = None,
                text: str | None = None) -> Forward:
        rng = self.rng
        return Forward(0, self.host(), receiver or self.nick(), sender or self.nick(), rng.randrange(1, 2 ** 63),
                       k if k is not None else rng.randrange(1, 1000), text if text is not None else self.text())

    @staticmethod
    def header(forward: Forward) -> dict:
        return {"from": forward.sender_nick, "to": forward.receiver, "inc": forward.incarnation, "k": forward.k,
                "host": forward.host, "len": len(forward.text.encode())}

    @staticmethod
    def wire(header: dict, text: bytes) -> bytes:
        return json.dumps(header, separators=(",", ":")).encode() + b"\n" + text

    def flip(self, data: bytes, end: int | None = None) -> bytes:
        data = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            at = self.rng.randrange(end or len(data)) if data else 0
            if data:
                data[at] ^= 1 << self.rng.randrange(8)
        return bytes(data)

    def stream_case(self) -> tuple[str, str, bytes]:
        """(case, receiver of the subject, payload)."""
        rng = self.rng
        case = rng.choice(["random-bytes", "garbled-header", "truncated", "wrong-type", "lying-length",
                           "huge-text", "non-utf8", "extra-field", "wrong-version", "huge-counts", "bad-names",
                           "line-break-text", "batch-one-bad", "empty", "forged-stranger", "forged-nobody",
                           "forged-decoy"])
        forward = self.forward()
        header = self.header(forward)
        text = forward.text.encode()
        receiver = forward.receiver
        if case == "random-bytes":
            return case, receiver, rng.randbytes(rng.randrange(1, 2000))
        if case == "garbled-header":
            good = encode_forward(forward)
            return case, receiver, self.flip(good, good.index(b"\n"))
        if case == "truncated":
            good = b"".join(encode_forward(self.forward(receiver)) for _ in range(rng.randint(1, 3)))
            return case, receiver, good[:rng.randrange(len(good))]
        if case == "wrong-type":
            header[rng.choice(sorted(header))] = self.junk()
            return case, receiver, self.wire(header, text)
        if case == "lying-length":
            header["len"] = rng.choice([len(text) + rng.randint(1, 1000), max(len(text) - rng.randint(1, 5), -1),
                                        -rng.randint(1, 2 ** 31), 2 ** 64, 2 ** 70])
            return case, receiver, self.wire(header, text)
        if case == "huge-text":
            huge = b"x" * rng.randint(*HUGE)
            header["len"] = len(huge)
            return case, receiver, self.wire(header, huge)
        if case == "non-utf8":
            bad = text + rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80abc"])
            header["len"] = len(bad)
            return case, receiver, self.wire(header, bad)
        if case == "extra-field":
            header[rng.choice(["sig", "x", "from2", ""])] = self.junk()
            return case, receiver, self.wire(header, text)
        if case == "wrong-version":
            header["v"] = rng.choice([2, 0, "1", 1.5, True, None, -1, 2 ** 64])
            return case, receiver, self.wire(header, text)
        if case == "huge-counts":
            header[rng.choice(["inc", "k"])] = rng.choice([2 ** 64, 2 ** 100, -1, 10 ** 30])
            return case, receiver, self.wire(header, text)
        if case == "bad-names":
            header[rng.choice(["from", "to", "host"])] = rng.choice(["a.b", "", "x" * 65, "é", "a b", ">", "*"])
            return case, receiver, self.wire(header, text)
        if case == "line-break-text":
            evil = forward.text + rng.choice(["\n", "\r\n", "\x1b[2J", "\x00"]) + "PAIRED mallory"
            return case, receiver, encode_forward(self.forward(receiver, text=evil))
        if case == "batch-one-bad":
            return case, receiver, encode_forward(self.forward(receiver)) + rng.randbytes(rng.randrange(1, 100))
        if case == "empty":
            return case, receiver, b""
        if case == "forged-stranger":
            # To an honest receiver, well-formed, from someone it is not paired with: the room drops it.
            receiver = self.honest_nick()
            sender = rng.choice([self.nick(), self.honest_nick()])
            sender = sender if sender != self._partner(receiver) else self.nick()
            return case, receiver, encode_forward(self.forward(receiver, sender, k=rng.choice([1, 2 ** 62])))
        if case == "forged-nobody":
            return case, receiver, encode_forward(self.forward(receiver, k=2 ** 62))
        # forged-decoy: believed today (no auth): counted, never mixed with the honest pairs
        if self.targets.decoy is None:
            return "forged-nobody", receiver, encode_forward(self.forward(receiver))
        sender, receiver, host = self.targets.decoy
        self._forged_k += 1
        forged = f"forged {self._forged_k}"
        self.tally.forged_to_decoy += 1
        self.tally.forged_texts.append(forged)
        return case, receiver, encode_forward(Forward(0, host, receiver, sender, 4242, self._forged_k, forged))

    def _partner(self, nick: str) -> str:
        """The honest partner of ``nick`` (testkit.soak names pairs a<i>/b<i>)."""
        return {"a": "b", "b": "a"}.get(nick[:1], "") + nick[1:]

    def entry_case(self) -> tuple[str, str, bytes, dict | None]:
        """(case, key, value, headers) for the nicks bucket."""
        rng = self.rng
        case = rng.choice(["garbage-over-honest", "wrong-shape-over-honest", "garbage", "wrong-shape",
                           "other-version", "made-up-member", "huge-value", "delete-made-up", "odd-operation",
                           "bad-key"])
        if case == "garbage-over-honest":
            return case, self.honest_nick(), rng.randbytes(rng.randrange(0, 300)), None
        if case == "wrong-shape-over-honest":
            value = rng.choice([{"host": self.junk()}, {"host": self.host(), "target": self.junk() or 5},
                                {"host": self.host(), "target": None, "extra": 1}, [self.host()], self.junk()])
            value = json.dumps(value).encode()
            if self._verdict(lambda: read_entry(value)) == "decoder: valid":
                value = b"\xff" + value  # a valid entry over an honest member's would be a forgery
            return case, self.honest_nick(), value, None
        if case == "garbage":
            return case, self.nick(), rng.randbytes(rng.randrange(0, 300)), None
        if case == "wrong-shape":
            return case, self.nick(), json.dumps({"host": self.junk(), "target": self.junk()}).encode(), None
        if case == "other-version":
            return case, self.nick(), json.dumps({"v": 2, "host": self.host()}).encode(), None
        if case == "made-up-member":
            # a made-up host (its lease forged below, now and then) naming an honest member
            value = {"host": self.nick(), "target": rng.choice([None, self.honest_nick(), self.nick()])}
            return case, self.nick(), json.dumps(value).encode(), None
        if case == "huge-value":
            return case, self.nick(), b"{" + rng.randbytes(rng.randint(*HUGE)), None
        if case == "delete-made-up":
            return case, self.nick(), b"", {"KV-Operation": rng.choice(["DEL", "PURGE"])}
        if case == "odd-operation":
            value = json.dumps({"host": self.nick(), "target": None}).encode()
            return case, self.nick(), value, {"KV-Operation": rng.choice(["del", "DELETE", "", "PUT", "\x7f"])}
        key = rng.choice(["a.b", "é", "%25", "x" * 65, "-.-", "fz1.fz2"])
        return "bad-key", key, rng.randbytes(rng.randrange(0, 50)), None

    def lease_case(self) -> tuple[str, str, bytes, dict | None]:
        """(case, key, value, headers) for the hosts bucket."""
        rng = self.rng
        case = rng.choice(["garbage-over-real", "made-up-lease", "garbage-made-up", "delete-made-up",
                           "odd-operation-real", "bad-key"])
        if case == "garbage-over-real":
            return case, self.host(), rng.randbytes(rng.randrange(0, 300)), None
        if case == "made-up-lease":
            return case, self.nick(), json.dumps({"host": self.nick(), "pid": 1, "since": time.time()}).encode(), None
        if case == "garbage-made-up":
            return case, self.nick(), rng.randbytes(rng.randrange(0, 300)), None
        if case == "delete-made-up":
            return case, self.nick(), b"", {"KV-Operation": rng.choice(["DEL", "PURGE"])}
        if case == "odd-operation-real":
            return case, self.host(), b"{}", {"KV-Operation": rng.choice(["del", "DELETE", "", "purge", "\x01"])}
        return "bad-key", rng.choice(["a.b", "é", "%", "x" * 65]), b"{}", None

    # -- sending -----------------------------------------------------------------------------
    def run(self, seconds: float, cases: int | None = None) -> BusTally:
        """Publish cases for ``seconds`` (at most ``cases`` of them, :data:`MAX_RATE` a second)."""
        began = time.monotonic()
        asyncio.run(self._run(seconds, cases))
        self.tally.seconds += time.monotonic() - began
        return self.tally

    async def _run(self, seconds: float, cases: int | None) -> None:
        import nats

        nc = await nats.connect(self.targets.servers, name="busfuzz", connect_timeout=3, max_reconnect_attempts=3)
        js = nc.jetstream(timeout=5)
        deadline = time.monotonic() + seconds
        count = 0
        try:
            while time.monotonic() < deadline and (cases is None or count < cases):
                count += 1
                await self._one(js)
                await asyncio.sleep(1 / MAX_RATE)
        finally:
            await nc.close()

    async def _one(self, js) -> None:
        rng = self.rng
        targets = self.targets
        roll = rng.random()
        if roll < 0.55:
            case, receiver, payload = self.stream_case()
            host = self.targets.decoy[2] if case == "forged-decoy" else self.host()
            if case != "forged-decoy" and rng.random() < 0.1:
                receiver += rng.choice([".x", ".a.b"])  # more tokens: still on the host's subject
            target, subject, headers = "stream", f"{targets.stream_subject}.{host}.{receiver}", None
            verdict = self._verdict(lambda: chat_forwards(1, payload))
        else:
            bucket_is_nicks = roll < 0.85
            case, key, payload, headers = self.entry_case() if bucket_is_nicks else self.lease_case()
            target = "nicks" if bucket_is_nicks else "hosts"
            bucket = targets.nick_bucket if bucket_is_nicks else targets.host_bucket
            subject = f"$KV.{bucket}.{key}"
            verdict = self._verdict(lambda: read_entry(payload)) if bucket_is_nicks and not headers \
                else "value unread" if not bucket_is_nicks else "a delete or odd operation"
        self.tally.sessions[target] += 1
        try:
            await js.publish(subject, payload, headers=headers, timeout=5)
            said = "stored"
        except Exception as exc:  # what NATS says is what this case got: tallied, not raised
            said = f"NATS: {type(exc).__name__}"
        self.tally.note(target, case, said, verdict)

    @staticmethod
    def _verdict(decode) -> str:
        try:
            decode()
            return "decoder: valid"
        except BusPayloadError as exc:
            return f"decoder: refused {exc.kind}"


# -- a run against a cluster ----------------------------------------------------------------------
#: Complaint lines a chatd may write for refused payloads: the first of each (what, kind) there
#: is (8 kinds of stream message, 5 of directory entry, 1 each of nick change and host lease)...
COMPLAINT_KINDS = 15
#: ... and a line that sums each up at most every chatd.bus.payloads.COMPLAIN_EVERY seconds.
COMPLAINT = "is not chatd's"
COMPLAINT_SUM = " more refused for "


@dataclass
class BusRun:
    fuzz: BusTally
    honest: object  # testkit.soak.Tally
    problems: list[str]
    #: Per host: complaint lines in its chatds' logs, and how many chatd processes wrote them.
    complaints: dict[str, tuple[int, int]]
    restarted: str | None
    #: The complaint lines of the first host's log, as a sample.
    said: list[str] = field(default_factory=list)

    def report(self) -> str:
        forged = (f"forged onto the decoy pair: {self.fuzz.forged_to_decoy} published, "
                  f"{self.fuzz.forged_delivered} delivered (no auth on the bus yet: issue 25 items 1-2)")
        logged = ", ".join(f"{host} {lines} lines ({processes} chatd)" for host, (lines, processes)
                           in sorted(self.complaints.items()))
        return "\n".join([self.fuzz.table(), forged, f"complaints logged: {logged}",
                          f"honest pairs: {self.honest.row()}",
                          f"chatd restarted mid-fuzz: {self.restarted or 'none'}",
                          "h0's complaint lines:", *[f"  {line[:230]}" for line in self.said],
                          "problems: " + ("; ".join(self.problems) if self.problems else "none")])


def run_against(cluster, seconds: float, seed: int, pairs: int = 6, restart: bool = True,
                settle: float = 60.0) -> BusRun:
    """Honest pairs stream across ``cluster``'s hosts (ctl.hosts.Hosts, 2 or more) while a
    :class:`BusFuzzer` publishes for ``seconds``; halfway, if ``restart``, one chatd is killed
    and restarted (it reads the garbage again, from its cursor and from the buckets). Then:
    the honest pairs' tally, the decoy's forged deliveries, every daemon up and connected."""
    from ctl.probe import LineClient
    from testkit import soak

    problems: list[str] = []
    decoy_a, decoy_b = LineClient(cluster.ports[0], timeout=15), LineClient(cluster.ports[1], timeout=15)
    decoy_a.send("NICK decoyA", "PAIR decoyB")
    decoy_b.send("NICK decoyB", "PAIR decoyA")
    if decoy_b.lines(3)[-1] != "PAIRED decoyA" or decoy_a.lines(3)[-1] != "PAIRED decoyB":
        raise AssertionError("the decoy pair did not pair across hosts")
    traffic = soak.Traffic(cluster.ports, pairs, seed=seed)
    traffic.start()
    deadline = time.monotonic() + 30
    while not all(client.paired for client in traffic.clients.values()):
        if time.monotonic() > deadline:
            traffic.finish(0)
            raise TimeoutError("the honest pairs did not pair within 30 s")
        time.sleep(0.01)
    targets = BusTargets(list(cluster.nats.urls), [f"h{i}" for i in range(len(cluster.hosts))],
                         honest=frozenset(traffic.clients), decoy=("decoyA", "decoyB", "h1"))
    fuzzer = BusFuzzer(targets, seed)
    restarted = None
    try:
        fuzzer.run(seconds / 2 if restart else seconds)
        if restart:
            index = len(cluster.hosts) - 1
            chatd = cluster.hosts[index].chatd
            chatd.kill()
            chatd.wait(20)
            cluster.restart_chatd(index, wait=True)
            restarted = f"h{index} (SIGKILL, restarted with --restore)"
            fuzzer.run(seconds / 2)
        # Garbage over an honest member's entry is written over by its host: no nick stays wedged.
        problems += asyncio.run(_entries_unreadable(targets, sorted(traffic.clients) + ["decoyA", "decoyB"]))
    except BaseException:
        traffic.finish(0)
        raise
    honest = traffic.finish(settle)
    # The decoy: what was forged onto it arrived (today), and a real message still does.
    forged = set(fuzzer.tally.forged_texts)
    got = []
    while not decoy_b.silent_for(3):
        got.append(decoy_b.line())
    fuzzer.tally.forged_delivered = sum(1 for line in got if line.split(" ", 3)[-1] in forged)
    decoy_a.send("MSG real after the forgeries")
    last = decoy_b.line()
    if not (last.startswith("FROM decoyA ") and last.endswith(" real after the forgeries")):
        problems.append(f"the decoy pair's real message did not arrive after the forgeries: {last!r}")
    decoy_a.close(), decoy_b.close()
    # Every daemon up, every chatd serving and connected.
    for index, host in enumerate(cluster.hosts):
        for name, proc in (("holderd", host.holderd), ("chatd", host.chatd)):
            if proc.poll() is not None:
                problems.append(f"h{index}'s {name} died: {proc.returncode}")
        try:
            status = cluster.status(index)
            if status["role"] != "serving" or not status["cluster"]["connected"]:
                problems.append(f"h{index} is not serving and connected: {status['role']}, "
                                f"{status['cluster']['connected']}")
        except Exception as exc:
            problems.append(f"h{index}'s chatd does not answer: {exc!r}")
    for node in cluster.nats.nodes:
        if node.proc is None or node.proc.poll() is not None:
            problems.append(f"NATS node {node.name} died")
    # Said once per kind, not once per message.
    complaints, said = {}, []
    for index, host in enumerate(cluster.hosts):
        found = [line for line in host.logs().splitlines() if COMPLAINT in line or
                 COMPLAINT_SUM in line]
        said = said or found
        lines = len(found)
        processes = 2 if restarted and restarted.startswith(f"h{index} ") else 1
        complaints[f"h{index}"] = (lines, processes)
        most = COMPLAINT_KINDS * processes * (2 + int(seconds // 60))
        if lines > most:
            problems.append(f"h{index} logged {lines} complaint lines, more than {most}: not once per kind")
    if honest.problems():
        problems.append(f"the honest pairs: {honest.row()} {honest.notes[:5]}")
    return BusRun(fuzzer.tally, honest, problems, complaints, restarted, said)


async def _entries_unreadable(targets: BusTargets, nicks: list[str], timeout: float = 15.0) -> list[str]:
    """The honest members whose directory entries are still not chatd's ``timeout`` s after the
    fuzzing (garbage over them must have been written over by their hosts): a nick wedged."""
    import nats

    nc = await nats.connect(targets.servers, connect_timeout=3)
    try:
        kv = await nc.jetstream(timeout=5).key_value(targets.nick_bucket)
        deadline = time.monotonic() + timeout
        while True:
            wedged = []
            for nick in nicks:
                try:
                    host, _ = read_entry((await kv.get(nick)).value)
                    if host not in targets.hosts:
                        wedged.append(f"{nick}: names {host}")
                except BusPayloadError as exc:
                    wedged.append(f"{nick}: {exc}")
                except Exception as exc:
                    wedged.append(f"{nick}: {type(exc).__name__}")
            if not wedged or time.monotonic() > deadline:
                return [f"directory entries not put back: {'; '.join(wedged)}"] if wedged else []
            await asyncio.sleep(0.5)
    finally:
        await nc.close()
