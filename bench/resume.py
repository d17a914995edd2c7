"""A crowd comes back: every session's connection cut at once, every client resumes at once.

    .venv/bin/python bench/resume.py [--sessions 1000] [--rates 500,1000000] [--json out.json]

Starts holderd and chatd (ctl.launch), makes ``--sessions`` line clients in pairs,
each named, paired and with a session (chatd.sessions), has each pair chat once,
then resets every connection at the same instant, as a proxy restart or a host's
network change would. Each client connects again at once and says ``RESUME``;
one told ``ERR busy <s>`` tries again after a random wait up to ``s`` (full
jitter). Once resumed, it sends its peer one message. Measured for each client,
from the cut: when its ``RESUMED`` came, and when its peer's first message came
(the chat going again: that needs both to be back). Once per ``--rates``
(chatd's ``--resume-rate``; a huge one is no gate at all). Prints a table row per
rate: median, 99th percentile and worst of both, in ms, and how many were told busy.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import socket
import statistics
import struct
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctl.launch import Launcher  # noqa: E402


class Client:
    def __init__(self, port: int, nick: str, peer: str):
        self.port, self.nick, self.peer = port, nick, peer
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buffer = b""
        self.token = ""
        self.resumed_at = self.message_at = None
        self.retry_at = None

    def lines(self) -> list[str]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError(f"{self.nick}: chatd closed the connection")
        self.buffer += data
        *whole, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in whole]

    def expect(self, count: int) -> list[str]:
        got = []
        while len(got) < count:
            got += self.lines()
        return got


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def crowd(sessions: int, rate: float, seed: int) -> dict:
    rng = random.Random(seed)
    with Launcher() as launcher:
        launcher.start_holderd()
        launcher.start_chatd("--resume-rate", str(rate))
        clients = []
        for index in range(sessions // 2):
            a, b = Client(launcher.port, f"a{index}", f"b{index}"), Client(launcher.port, f"b{index}", f"a{index}")
            a.sock.sendall(f"NICK a{index}\nPAIR b{index}\nSESSION\n".encode())
            b.sock.sendall(f"NICK b{index}\nPAIR a{index}\nSESSION\n".encode())
            clients += [a, b]
        for client in clients:
            lines = client.expect(4)  # OK NICK, OK PAIR, PAIRED (one of the two: after OK PAIR), SESSION
            client.token = next(line.split()[1] for line in lines if line.startswith("SESSION "))
        for client in clients:
            client.sock.sendall(b"MSG hello\n")
        for client in clients:
            assert client.expect(1)[0].startswith("FROM "), "each pair chatted once"
        # The cut: every connection reset at the same instant.
        cut = time.monotonic()
        for client in clients:
            client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.sock.close()
        selector = selectors.DefaultSelector()
        for client in clients:
            client.sock = socket.create_connection(("127.0.0.1", launcher.port), timeout=30)
            client.sock.setblocking(False)
            client.buffer = b""
            client.sock.sendall(f"RESUME {client.token} 1\n".encode())
            selector.register(client.sock, selectors.EVENT_READ, client)
        busy, deadline = 0, time.monotonic() + 300
        while any(c.message_at is None for c in clients) and time.monotonic() < deadline:
            for key, _ in selector.select(0.01):
                client = key.data
                try:
                    lines = client.lines()
                except BlockingIOError:
                    continue
                for line in lines:
                    if line.startswith("ERR busy "):
                        busy += 1
                        client.retry_at = time.monotonic() + rng.uniform(0, int(line.split()[2]))
                    elif line.startswith("RESUMED "):
                        client.resumed_at = time.monotonic() - cut
                        client.sock.sendall(b"MSG back\n")
                    elif line.startswith("FROM ") and client.message_at is None:
                        client.message_at = time.monotonic() - cut
            now = time.monotonic()
            for client in clients:
                if client.retry_at is not None and now >= client.retry_at:
                    client.retry_at = None
                    client.sock.sendall(f"RESUME {client.token} 1\n".encode())
        for client in clients:
            client.sock.close()
    resumed = [c.resumed_at * 1000 for c in clients if c.resumed_at is not None]
    chatting = [c.message_at * 1000 for c in clients if c.message_at is not None]
    row = {"sessions": sessions, "resume_rate": rate, "busy": busy, "resumed": len(resumed),
           "chatting": len(chatting)}
    for name, values in (("resumed", resumed), ("chatting", chatting)):
        if values:
            row.update({f"{name}_median_ms": round(statistics.median(values), 1),
                        f"{name}_p99_ms": round(percentile(values, 0.99), 1),
                        f"{name}_worst_ms": round(max(values), 1)})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000, help="clients, in pairs (default %(default)s)")
    parser.add_argument("--rates", default="500,1000000",
                        help="chatd's --resume-rate for each run, comma-separated (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = [crowd(args.sessions, float(rate), args.seed) for rate in args.rates.split(",")]
    columns = ("sessions", "resume_rate", "busy", "resumed_median_ms", "resumed_p99_ms", "resumed_worst_ms",
               "chatting_median_ms", "chatting_p99_ms", "chatting_worst_ms")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row.get(c, '—'):,}" if isinstance(row.get(c), (int, float)) else str(row.get(c, "—"))
                                for c in columns) + " |")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=2)
    return 0 if all(row["chatting"] == row["sessions"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
