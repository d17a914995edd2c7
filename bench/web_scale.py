"""Browsers across a crash, under the real systemd: idle WebSocket clients by the thousand against
as many line clients, a web pair and a line pair chatting, a kill.

    .venv/bin/python bench/web_scale.py [--sizes 100,1000,10000] [--crashes 3] [--json PATH] [--plot PATH]

The machinery is bench/scale.py's (a booted systemd in a container, provisioned
with scripts/provision: chatd@1 and chatd@2 taking turns, holderd; its crash,
its reading of the kill from the journals, its idle-client workers); this adds
the web side. Two pairs chat all along, each sending its partner a timestamped
message every 2 ms: a line pair (``MSG``) and a web pair (two WebSocket
clients, ``{"type": "msg"}``). For each size, first that many idle *line*
clients, then (those gone) that many idle *web* clients (raw WebSocket
connections: the HTTP upgrade and a ``nick`` in one write, from several
processes, at most 4,900 each), and for each, the serving chatd is crashed
(``chatctl crash``, a real SIGSEGV) ``--crashes`` times in two modes: the
standby up (it has read ahead) and the standby stopped (a cold restart by
systemd). The moment the crash is asked for, every idle client sends its
protocol's ping (``PING``; ``{"type": "ping"}``, answered through the room and
the journal like any command, README "The web chat"). Read from the kill:

- the line pair's and the web pair's first message relayed;
- every idle client answered (the last ``PONG`` / ``pong`` read);
- then every idle client is checked again (a nick, and its ``OK``/``ok``).

Before each crash it waits (at most 45 s) for the machine's 1-minute load to fall
below 2.5, and records the load it crashed at: neighbours' work on these 2 cores
stretches a crash gap many times over. It prints a table (median, worst in brackets), writes the figures as JSON
(after each size and kind: a later failure keeps what was measured) and a PNG
plot.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import scale  # noqa: E402  (puts tests/ and tests/systemd on the path too)
from bench.scale import BootedSystemd, cell, chatctl, crash_and_measure, free_port, median_and_worst  # noqa: E402
from chatd.protocols.web import text_frame  # noqa: E402
from ctl.launch import wait_until  # noqa: E402

MODES = ("standby", "cold")
KINDS = ("line", "web")
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


def masked_frame(message: dict) -> bytes:
    """A client's text frame of one JSON command (its mask all zero bytes: valid, and cheap)."""
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) < 126:
        return bytes((0x81, 0x80 | len(payload))) + b"\0\0\0\0" + payload
    return struct.pack(">BBH", 0x81, 0x80 | 126, len(payload)) + b"\0\0\0\0" + payload


def server_frame(message: dict) -> bytes:
    """chatd's frame of one event, byte for byte (compact JSON, one unmasked text frame)."""
    return text_frame(json.dumps(message, separators=(",", ":")).encode())


def web_connect(port: int, name: str, timeout: float = 60) -> socket.socket:
    """A WebSocket connection upgraded and named (its 101 and ``ok`` read)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(UPGRADE + masked_frame({"type": "nick", "name": name}))
    expected = server_frame({"type": "ok", "command": "nick", "name": name})
    received = b""
    while not received.endswith(expected):
        data = sock.recv(4096)
        if not data:
            raise ConnectionError(f"chatd closed web client {name}: {received!r}")
        received += data
    return sock


def web_idle_worker(port: int, count: int, commands, results) -> None:
    """bench/scale.py's idle_worker for WebSocket clients, the same commands on its queue:
    "check" (each sends a nick and waits for its ok), "ping" (each sends a ping at once; the
    time the last pong was read is reported), "quit"."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    tag = os.getpid()
    socks = [web_connect(port, f"w{tag}x{index}") for index in range(count)]
    results.put(("connected", count))
    pong = server_frame({"type": "pong"})
    while True:
        command = commands.get()
        if command == "check":
            results.put(("answered", scale.ask_each(
                socks, lambda i: masked_frame({"type": "nick", "name": f"w{tag}y{i}"}),
                lambda i: server_frame({"type": "ok", "command": "nick", "name": f"w{tag}y{i}"}))))
        elif command == "ping":
            answered = scale.ask_each(socks, lambda i: masked_frame({"type": "ping"}), lambda i: pong)
            results.put(("pinged", answered, time.time()))
        elif command == "quit":
            for sock in socks:
                sock.sendall(masked_frame({"type": "quit"}))
            for sock in socks:
                sock.close()
            results.put(("closed", count))
            return


class WebSocketReader:
    """The JSON messages of a server's unmasked frames on a blocking socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _need(self, count: int) -> None:
        while len(self.buffer) < count:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("chatd closed the WebSocket")
            self.buffer += data

    def message(self) -> dict:
        self._need(2)
        length, header = self.buffer[1] & 0x7F, 2
        if length >= 126:
            size = 2 if length == 126 else 8
            self._need(2 + size)
            length, header = int.from_bytes(self.buffer[2:2 + size], "big"), 2 + size
        self._need(header + length)
        payload, self.buffer = self.buffer[header:header + length], self.buffer[header + length:]
        return json.loads(payload)


class WebPair(scale.Pair):
    """bench/scale.py's Pair over WebSocket: A sends B ``{"type": "msg"}`` with its send time
    every 2 ms; B records when each ``from`` arrives."""

    def __init__(self, port: int):
        self.a, self.b = web_connect(port, "webA"), web_connect(port, "webB")
        self.a.sendall(masked_frame({"type": "pair", "peer": "webB"}))
        self.b.sendall(masked_frame({"type": "pair", "peer": "webA"}))
        self.reader = WebSocketReader(self.b)
        while self.reader.message()["type"] != "paired":
            pass
        self.arrivals: list[tuple[float, float]] = []
        self.stop = threading.Event()
        threading.Thread(target=self._drain_a, daemon=True).start()  # A's own acks must not fill its buffer
        threading.Thread(target=self._send, daemon=True).start()
        threading.Thread(target=self._receive, daemon=True).start()

    def _drain_a(self):
        while not self.stop.is_set():
            try:
                if not self.a.recv(65536):
                    return
            except OSError:
                return

    def _send(self):
        while not self.stop.is_set():
            try:
                self.a.sendall(masked_frame({"type": "msg", "text": f"{time.time():.6f}"}))
            except OSError:  # closed under it, at the end
                return
            time.sleep(0.002)

    def _receive(self):
        while not self.stop.is_set():
            try:
                message = self.reader.message()
            except (OSError, EOFError, ValueError):
                return
            if message.get("type") == "from" and message.get("from") == "webA":
                self.arrivals.append((float(message["text"]), time.time()))


KEYS = ("line_pair_first_relayed_ms", "web_pair_first_relayed_ms", "kill_to_every_client_answered_ms",
        "kill_to_served_ms", "kill_to_all_adopted_ms", "restore_ms")


def quiet_enough(below: float = 2.5, patience: float = 45) -> None:
    """Wait (at most ``patience`` s) for the machine's 1-minute load to fall ``below``: other
    work on these 2 cores (neighbours' tests) stretches a crash gap many times over."""
    deadline = time.monotonic() + patience
    while os.getloadavg()[0] >= below and time.monotonic() < deadline:
        time.sleep(1)


def measure(machine, ports: dict[str, int], kind: str, size: int, pairs: dict[str, scale.Pair],
            crashes_each: int) -> dict:
    """``size`` idle clients of ``kind`` held, and each mode's crashes, as in bench/scale.py."""
    worker_of = {"line": scale.idle_worker, "web": web_idle_worker}[kind]
    began = time.time()
    idle = scale.IdleWorkers(worker_of, ports[kind], size)
    wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] >= size + 4, 300, f"{size} clients accepted")
    row = {"kind": kind, "clients": size, "connects_per_s": round(size / (time.time() - began))}
    time.sleep(2)  # the bundles get packed in the background, the standby reads ahead
    for mode in MODES:
        crashes = []
        for _ in range(crashes_each):
            quiet_enough()
            load = os.getloadavg()[0]
            crash = crash_and_measure(machine, pairs["line"], size, cold=mode == "cold", commands=idle.commands,
                                      results=idle.results)
            crash["loadavg_1min"] = round(load, 2)
            crash["line_pair_first_relayed_ms"] = crash["kill_to_first_relayed_ms"]
            first = pairs["web"].first_after(crash["killed_at"])
            crash["web_pair_first_relayed_ms"] = round((first - crash["killed_at"]) * 1000, 1) if first else None
            crash["answered"] = idle.check()
            print(f"  {size} {kind} clients, {mode}: " + ", ".join(
                f"{key} {crash.get(key)}" for key in (*KEYS, "answered_ping", "answered", "loadavg_1min")), flush=True)
            crashes.append(crash)
        row[mode] = {"crashes": crashes, **{key: median_and_worst([c.get(key) for c in crashes]) for key in KEYS},
                     "answered_ping": min(c["answered_ping"] for c in crashes),
                     "answered": min(c["answered"] for c in crashes),
                     "loadavg_1min": [c["loadavg_1min"] for c in crashes]}
    idle.stop(machine, others=4)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--crashes", type=int, default=3, help="crashes per size, kind and mode (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "web-scale.json"))
    parser.add_argument("--plot", metavar="PATH", default=str(ROOT / "bench" / "results" / "web-scale.png"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ports = {"line": free_port(), "web": free_port()}
    wheels = scale.wheels_dir()
    rows = []
    with BootedSystemd(binds=[str(ROOT), str(wheels)], boot_timeout=120) as machine:
        if not scale.provision(machine, wheels, ports["line"], http_port=ports["web"]):
            return 1
        max_clients = chatctl(machine, "status")["chatd"]["max_clients"]
        print(f"chatd's max_clients: {max_clients:,}", flush=True)
        pairs = {"line": scale.Pair(ports["line"]), "web": WebPair(ports["web"])}
        try:
            for size in (int(text) for text in args.sizes.split(",")):
                for kind in KINDS:
                    print(f"{size} idle {kind} clients ...", flush=True)
                    rows.append(measure(machine, ports, kind, size, pairs, args.crashes))
                    os.makedirs(os.path.dirname(args.json), exist_ok=True)
                    with open(args.json, "w") as out:
                        json.dump({"max_clients": max_clients, "rows": rows}, out, indent=2)
        except BaseException:
            print(machine.run("journalctl", "-u", "chatd@*", "-u", "holderd", "-n", "60", "--no-pager",
                              check=False).stdout)
            raise
        finally:
            for pair in pairs.values():
                pair.close()
    print_table(rows)
    plot(rows, args.plot)
    return 0


def print_table(rows: list[dict]) -> None:
    print("\n| idle clients | mode | kill -> line pair's next message | kill -> web pair's next message "
          "| kill -> every idle client answered (all ping at once) | restore (served) | answered after |")
    print("|" + " --- |" * 7)
    for row in rows:
        for mode in MODES:
            m = row[mode]
            print(f"| {row['clients']:,} {row['kind']} | {mode} | {cell(m['line_pair_first_relayed_ms'])} ms "
                  f"| {cell(m['web_pair_first_relayed_ms'])} ms | {cell(m['kill_to_every_client_answered_ms'])} ms "
                  f"| {cell(m['restore_ms'])} ms | {m['answered']:,} of {row['clients']:,} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for kind, color in (("line", "tab:blue"), ("web", "tab:orange")):
        kind_rows = [row for row in rows if row["kind"] == kind]
        clients = [row["clients"] for row in kind_rows]
        for mode, style in (("standby", "o-"), ("cold", "s--")):
            for key, label, alpha in (("web_pair_first_relayed_ms", "web pair's next message", 1.0),
                                      ("kill_to_every_client_answered_ms", "every idle client answered", 0.5)):
                values = [(row[mode][key] or {}).get("median") for row in kind_rows]
                axes.plot(clients, values, style, color=color, alpha=alpha,
                          label=f"{kind} idle clients, {mode}: kill -> {label}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("idle clients held (line or WebSocket)")
    axes.set_ylabel("ms (median of the crashes)")
    loads = [load for row in rows for mode in MODES for load in row[mode].get("loadavg_1min", [])]
    axes.set_title("chatd crash gap under systemd: WebSocket clients against line clients"
                   + (f"\n(1-minute load at the crashes {min(loads):g}-{max(loads):g} on 2 cores)" if loads else ""),
                   fontsize=10)
    axes.legend(fontsize=6)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
