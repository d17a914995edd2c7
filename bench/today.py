"""What users have today, side by side with process-backup: a crash, its gap, what is lost, who is refused.

    .venv/bin/python bench/today.py [--pairs 10] [--crashes 10] [--json PATH] [--plot PATH]

Three ways to run the same chatd, each crashed ``--crashes`` times (SIGKILL) while
``--pairs`` pairs chat (each side sends a numbered message every 5 ms):

- ``no backup``: chatd keeps nothing anywhere (``--no-holderd``, no systemd);
  a crash ends every connection. Its clients do what chat clients do today:
  on EOF or reset they reconnect with exponential backoff (50 ms, doubling,
  at most 1 s), send NICK and PAIR again, and go on numbering; what they try to
  send while disconnected or not yet paired again is lost, and so is what the
  server had not yet relayed;
- ``process-backup, cold``: holderd and one chatd; after the kill a new chatd
  starts 16 ms later, as systemd does (``RestartSec=0``: its timer fires in
  1-2 ms, and the restart job starts the process some 15 ms later, measured by
  bench/cold.py), and restores; clients never reconnect;
- ``process-backup, standby``: holderd and two chatd taking turns
  (``--lease``); the standby takes over at once and a new standby starts.

For each: the gap (kill -> the next message relayed, per pair: median and
worst), messages lost (sent and never received), and connects during the gap
(a new client tries every 2 ms for a second after each kill: refused, or
accepted and answered).

Launched with ctl.launch, no systemd needed; crash timings under systemd are
bench/scale.py's. It prints a table, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chatd.control import instance_socket  # noqa: E402
from ctl import control  # noqa: E402
from ctl.launch import Launcher, wait_for_answer, wait_until  # noqa: E402

RESTART_DELAY = 0.016  # RestartSec=0: the timer (1-2 ms) and the restart job (~15 ms), bench/cold.py


class Client:
    """A chat client as today's are: it reconnects with backoff when its connection ends."""

    def __init__(self, run: "Run", nick: str, partner: str):
        self.run, self.nick, self.partner = run, nick, partner
        self.sent = 0
        self.paired = threading.Event()  # set at the first PAIRED: sending starts then
        self.received: set[int] = set()
        self.arrivals: list[tuple[int, float]] = []
        self.sock = None
        self.connect()
        threading.Thread(target=self._send, daemon=True).start()

    def connect(self) -> None:
        delay = 0.05
        while not self.run.stopping:
            try:
                sock = socket.create_connection(("127.0.0.1", self.run.port), timeout=5)
                sock.sendall(f"NICK {self.nick}\nPAIR {self.partner}\n".encode())
                self.sock = sock
                threading.Thread(target=self._receive, args=(sock,), daemon=True).start()
                return
            except OSError:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _send(self) -> None:
        self.paired.wait(10)
        while not self.run.stopping:
            self.sent += 1
            try:
                self.sock.sendall(f"MSG {self.nick}:{self.sent}:{time.time():.6f}\n".encode())
            except (OSError, AttributeError):
                pass  # lost: nowhere to send it
            time.sleep(0.005)

    def _receive(self, sock) -> None:
        buffer = b""
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"PAIRED "):
                        self.paired.set()
                    if line.startswith(b"FROM "):
                        _, _, _, text = line.split(b" ", 3)
                        number = int(text.split(b":")[1])
                        self.received.add(number)
                        self.arrivals.append((number, time.time()))
        except OSError:
            pass
        if not self.run.stopping and sock is self.sock:
            self.sock = None
            self.connect()


class Run:
    def __init__(self, port: int):
        self.port = port
        self.stopping = False


def connects_during_gap(port: int, seconds: float, outcome: dict) -> None:
    """A new client every 2 ms: refused, or accepted (and answered once a chatd serves)."""
    deadline = time.monotonic() + seconds
    pending = []
    while time.monotonic() < deadline:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"WHO\n")
            pending.append(sock)
        except ConnectionRefusedError:
            outcome["refused"] += 1
        except OSError:
            outcome["failed"] += 1
        time.sleep(0.002)
    for sock in pending:
        try:
            sock.settimeout(10)
            outcome["answered" if sock.recv(100) else "dropped"] += 1
        except OSError:
            outcome["dropped"] += 1
        sock.close()


def start_variant(launcher: Launcher, variant: str):
    if variant == "no backup":
        launcher.start_chatd("--no-holderd")
        return [launcher.chatd]
    launcher.start_holderd()
    if variant == "process-backup, cold":
        launcher.start_chatd()
        return [launcher.chatd]
    first = launcher.spawn("chatd", "chatd", "--port", "0", "--http-port", "-1", "--control",
                           launcher.control_socket, "--holder", launcher.holder_socket, "--lease")
    launcher.port = wait_for_answer(first, lambda: launcher.control("status"), 15, "chatd")["port"]
    return [first, start_standby(launcher)]


def start_standby(launcher: Launcher):
    proc = launcher.spawn("chatd", "chatd", "--port", str(launcher.port), "--http-port", "-1", "--control",
                          launcher.control_socket, "--holder", launcher.holder_socket, "--lease")
    own = instance_socket(launcher.control_socket, str(proc.pid))  # --instance defaults to the pid
    wait_for_answer(proc, lambda: control.call("status", own), 15, "standby")
    return proc


def measure(variant: str, pairs: int, crashes: int) -> dict:
    with Launcher() as launcher:
        procs = start_variant(launcher, variant)
        run = Run(launcher.port)
        clients = []
        for index in range(pairs):
            clients += [Client(run, f"a{index}", f"b{index}"), Client(run, f"b{index}", f"a{index}")]
        time.sleep(1)
        gaps, doors = [], {"refused": 0, "failed": 0, "answered": 0, "dropped": 0}
        for _ in range(crashes):
            serving = procs[0]
            door = threading.Thread(target=connects_during_gap, args=(launcher.port, 1.0, doors))
            killed = time.time()
            serving.send_signal(signal.SIGKILL)
            door.start()
            serving.wait(10)
            if variant == "process-backup, standby":
                procs = [procs[1], start_standby(launcher)]
            else:
                time.sleep(RESTART_DELAY)
                launcher.start_chatd(*(["--no-holderd"] if variant == "no backup" else ["--restore"]), wait=False)
                procs = [launcher.chatd]
            door.join()
            wait_until(lambda: all(any(stamp > killed + 1.0 for _, stamp in c.arrivals) for c in clients), 30,
                       "every client to receive again")
            for client in clients:
                after = [stamp for number, stamp in client.arrivals if stamp > killed]
                gaps.append((min(after) - killed) * 1000)
            time.sleep(0.5)
        run.stopping = True
        time.sleep(1.0)
        sent = sum(c.sent for c in clients)
        received = sum(len(c.received) for c in clients)
        by_nick = {c.nick: c for c in clients}
        lost = sum(len(set(range(1, c.sent - 50)) - by_nick[c.partner].received) for c in clients)
    return {"variant": variant, "gap_median_ms": round(statistics.median(gaps), 1), "gap_worst_ms": round(max(gaps), 1),
            "sent": sent, "received": received, "lost": lost, **{f"connects_{key}": value for key, value in doors.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--crashes", type=int, default=10)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "today.json"))
    parser.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "results", "today.png"))
    args = parser.parse_args()
    rows = []
    for variant in ("no backup", "process-backup, cold", "process-backup, standby"):
        rows.append(measure(variant, args.pairs, args.crashes))
        print(rows[-1], flush=True)
    print(f"\n{args.pairs} pairs, a message each way every 5 ms, {args.crashes} SIGKILLs\n")
    print("| variant | gap, median | gap, worst | messages lost | connects during the gap: refused | answered |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['variant']} | {row['gap_median_ms']} ms | {row['gap_worst_ms']} ms | {row['lost']:,} of "
              f"{row['sent']:,} | {row['connects_refused']} | {row['connects_answered']} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(rows, out, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    names = [row["variant"] for row in rows]
    axes[0].barh(names, [row["gap_median_ms"] for row in rows], color="#6a8caf")
    axes[0].set_xlabel("kill -> next message relayed, median (ms)")
    axes[1].barh(names, [row["lost"] for row in rows], color="#c0504d")
    axes[1].set_xlabel("messages lost")
    axes[1].set_yticklabels([])
    figure.tight_layout()
    figure.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
