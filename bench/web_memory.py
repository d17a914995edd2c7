"""Memory per client: a WebSocket client against a line client, in chatd and in holderd.

    .venv/bin/python bench/web_memory.py [--clients 2000] [--rounds 3] [--json PATH]

Each round starts holderd and chatd afresh, once for each kind of client (the
kinds alternating, round by round): one client of that kind first (so that the
web path's lazy imports, h11 and wsproto, are not counted per client), then
``--clients`` idle clients of that kind, each named (``NICK`` / ``{"type":
"nick"}``) and answered before the next connects (a web client: the HTTP
upgrade and its nick in one write, then the ``101`` and the ``ok``). The
resident (RSS) and proportional (PSS) sizes of chatd and holderd, from
``/proc/PID/smaps_rollup``, and the anonymous and shared parts of the RSS
(``/proc/PID/status``: the heap, and the journal's memfd), are read before and after (after a second of
quiet); per client is the difference over ``--clients``. Kernel memory (the
sockets themselves, and the copies of them in flight that holderd keeps) is in
neither: it is the same for both kinds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctl.launch import Launcher  # noqa: E402

UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def masked_text_frame(text: str) -> bytes:
    """A client's text frame (its mask all zero bytes: valid, and the payload stays readable)."""
    payload = text.encode()
    assert len(payload) < 126
    return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload


SIZES = ("Rss", "Pss", "RssAnon", "RssShmem")


def sizes_kib(pid: int) -> dict[str, int]:
    """Rss and Pss of process ``pid`` (smaps_rollup), and of its Rss the anonymous memory (the
    Python heap) and the shared (the journal's memfd): /proc/PID/status; in KiB."""
    found = {}
    for path in (f"/proc/{pid}/smaps_rollup", f"/proc/{pid}/status"):
        with open(path) as sizes:
            for line in sizes:
                name, _, rest = line.partition(":")
                if name in SIZES:
                    found[name] = int(rest.split()[0])
    return found


def connect(kind: str, port: int, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    if kind == "web":
        sock.sendall(UPGRADE + masked_text_frame(json.dumps({"type": "nick", "name": name})))
        answer = b'"type":"ok"'
    else:
        sock.sendall(f"NICK {name}\n".encode())
        answer = b"OK NICK"
    received = b""
    while answer not in received:
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"chatd closed {kind} client {name}: {received!r}")
        received += data
    return sock


def measure(kind: str, clients: int) -> dict[str, float]:
    """Bytes per client of chatd's and holderd's RSS and PSS."""
    with Launcher() as launcher:
        launcher.start_holderd()
        launcher.start_chatd()
        port = launcher.http_port if kind == "web" else launcher.port
        socks = [connect(kind, port, "first")]
        try:
            time.sleep(1)
            before = {"chatd": sizes_kib(launcher.chatd.pid), "holderd": sizes_kib(launcher.holderd.pid)}
            socks += [connect(kind, port, f"c{index}") for index in range(clients)]
            time.sleep(1)
            after = {"chatd": sizes_kib(launcher.chatd.pid), "holderd": sizes_kib(launcher.holderd.pid)}
        finally:
            for sock in socks:
                sock.close()
        return {f"{process} {size}": (after[process][size] - before[process][size]) * 1024 / clients
                for process in before for size in SIZES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", metavar="PATH", default=os.path.join(ROOT, "bench", "results", "web-memory.json"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.clients + 100:
        parser.error(f"{args.clients} clients need that many open files here: raise the hard limit "
                     f"(ulimit -Hn, now {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    kinds = ["line", "web"]
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for round_number in range(args.rounds):
        for kind in kinds if round_number % 2 == 0 else kinds[::-1]:
            per_client = measure(kind, args.clients)
            results[kind].append(per_client)
            print(f"round {round_number + 1}: {kind:>4}: " + ", ".join(f"{name} {value:,.0f} B"
                                                                       for name, value in per_client.items()),
                  flush=True)
    columns = list(results["line"][0])
    print(f"\n{args.clients:,} idle named clients, {args.rounds} rounds; bytes per client, median (range)\n")
    print("| client | " + " | ".join(columns) + " |")
    print("| --- | " + " | ".join("---" for _ in columns) + " |")
    for kind in kinds:
        cells = []
        for column in columns:
            values = [result[column] for result in results[kind]]
            cells.append(f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})")
        print(f"| {kind} | " + " | ".join(cells) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "bytes_per_client": results}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
