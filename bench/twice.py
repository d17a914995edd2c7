"""Two crashes in a row: the gap when the chatd taking over dies too, before any chatd stands by.

    .venv/bin/python bench/twice.py [--rounds 5] [--idle 300] [--delays 0,2,5,20,100]
                                    [--restart-delay 0] [--json PATH]

Theory of operation
-------------------
holderd and two chatd taking turns (``--lease``), as ``chatd@1``/``chatd@2``
run under systemd, with a pair A/B and ``--idle`` clients that only stay
connected (so the restore has some work). Each round of a row:

- ``one crash``: the serving chatd is SIGKILLed; the standby takes over. The
  baseline.
- ``two crashes, +D ms``: the serving chatd is SIGKILLed, then D ms later the
  one taking over is SIGKILLed too: before the lease reaches it, in its restore,
  or just after, depending on D. Nobody stands by now: a fresh ``chatd --lease``
  is started ``--restart-delay`` ms after the second kill (0: at once, as systemd
  does with chatd@'s ``RestartSec=0``, some 16 ms after the exit) and restores
  from what holderd keeps.

Right after the last kill A sends one message; the gap is from the first kill
(and from the last) until B has it. Each round ends with the pair checked (n
counting on, nothing lost: the bench exits 1 otherwise) and two chatd taking
turns again. Where each second death landed is read from the dead chatd's log
(``granted the lease``, ``restored``). It prints one row per case, median and
worst in ms, and writes them as JSON with ``--json``.

Launched with ctl.launch in a scratch directory: no systemd, no root. On a
loaded machine the figures grow; compare the rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from chatd.control import instance_socket  # noqa: E402
from ctl import control  # noqa: E402
from ctl.launch import Launcher, wait_for_answer, wait_until  # noqa: E402
from ctl.probe import LineClient  # noqa: E402


class Turns:
    """Two chatd --lease on one launcher: which serves, which stands by, by instance name."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.serving = self.start("1", "serving")
        self.standby = self.start("2", "standby")

    def start(self, instance: str, role: str | None):
        """``chatd --lease --instance INSTANCE``; with ``role``, wait until it answers so."""
        launcher = self.launcher
        proc = launcher.spawn("chatd", "chatd", "--port", str(launcher.port or 0),
                              "--http-port", str(launcher.http_port or 0), "--control", launcher.control_socket,
                              "--holder", launcher.holder_socket, "--lease", "--instance", instance)
        proc.instance = instance
        if role is not None:
            path = instance_socket(launcher.control_socket, instance)
            status = wait_for_answer(proc, lambda: control.call("status", path), 30, f"chatd {instance}")
            wait_until(lambda: control.call("status", path)["role"] == role, 30, f"chatd {instance} as {role}")
            if role == "serving":
                launcher.port, launcher.http_port = status["port"], status["http_port"]
        return proc

    def serving_now(self, proc) -> None:
        """``proc`` serves (at the well-known socket); a new standby behind it, on the other instance."""
        wait_for_answer(proc, lambda: control.call("status", self.launcher.control_socket)["pid"] == proc.pid, 30,
                        "the new chatd to serve")
        self.serving = proc
        self.standby = self.start("2" if proc.instance == "1" else "1", "standby")


def landed(launcher: Launcher, proc) -> str:
    with open(launcher.log_path(proc), errors="replace") as log:
        text = log.read()
    return "after" if "restored " in text else "in restore" if "granted the lease" in text else "before lease"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds per case (default %(default)s)")
    parser.add_argument("--idle", type=int, default=300, help="idle clients besides the pair (default %(default)s)")
    parser.add_argument("--delays", default="0,2,5,20,100",
                        help="ms from the first kill to the second, comma-separated (default %(default)s)")
    parser.add_argument("--restart-delay", type=float, default=0.0,
                        help="ms from the second kill to the fresh chatd's start (default %(default)s: at once; "
                             "chatd@'s RestartSec=0 restarts some 16 ms after the exit)")
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON here")
    args = parser.parse_args()
    delays = [float(d) for d in args.delays.split(",") if d]
    cases = [("one crash", None)] + [(f"two crashes, +{d:g} ms", d) for d in delays]
    rows, problems = [], 0
    with Launcher() as launcher:
        launcher.start_holderd()
        turns = Turns(launcher)
        a, b = LineClient(launcher.port, timeout=30), LineClient(launcher.port, timeout=30)
        a.send("NICK A", "PAIR B")
        b.send("NICK B", "PAIR A")
        assert a.lines(3) == ["OK NICK A", "OK PAIR B", "PAIRED B"] and b.lines(3)[-1] == "PAIRED A"
        idle = [socket.create_connection(("127.0.0.1", launcher.port)) for _ in range(args.idle)]
        wait_until(lambda: launcher.control("status")["clients"] == args.idle + 2, 30, "the idle clients")
        sent = 0
        try:
            for name, delay in cases:
                from_first, from_last, where = [], [], []
                for _ in range(args.rounds):
                    first, second = turns.serving, turns.standby
                    killed_at = time.monotonic()
                    first.send_signal(signal.SIGKILL)
                    last_at = killed_at
                    if delay is not None:
                        time.sleep(delay / 1000)
                        last_at = time.monotonic()
                        second.send_signal(signal.SIGKILL)
                        time.sleep(args.restart_delay / 1000)
                        fresh = turns.start(first.instance, None)
                    sent += 1
                    a.send(f"MSG {sent}")
                    line = b.line()
                    relayed_at = time.monotonic()
                    if line != f"FROM A {sent} {sent}":
                        problems += 1
                        print(f"  expected FROM A {sent} {sent}, got {line!r}", file=sys.stderr)
                    from_first.append((relayed_at - killed_at) * 1000)
                    from_last.append((relayed_at - last_at) * 1000)
                    first.wait(10)
                    if delay is None:
                        turns.serving_now(second)
                    else:
                        second.wait(10)
                        where.append(landed(launcher, second))
                        turns.serving_now(fresh)
                row = {"case": name, "rounds": args.rounds,
                       "kill_to_relayed_median_ms": round(statistics.median(from_first), 1),
                       "kill_to_relayed_worst_ms": round(max(from_first), 1),
                       "last_kill_to_relayed_median_ms": round(statistics.median(from_last), 1),
                       "second_death_landed": {w: where.count(w) for w in sorted(set(where))}}
                rows.append(row)
                print(f"{name:24} kill -> relayed {row['kill_to_relayed_median_ms']:7.1f} ms median, "
                      f"{row['kill_to_relayed_worst_ms']:7.1f} worst; last kill -> relayed "
                      f"{row['last_kill_to_relayed_median_ms']:7.1f} median"
                      + (f"; second death: {row['second_death_landed']}" if where else ""), flush=True)
            clients = launcher.control("status")["clients"]
            if clients != args.idle + 2:
                problems += 1
                print(f"  {clients} clients served at the end, not {args.idle + 2}", file=sys.stderr)
        finally:
            for sock in idle:
                sock.close()
            a.close()
            b.close()
    print(f"with {args.idle + 2} clients, {args.rounds} rounds a case, the fresh chatd started "
          f"{args.restart_delay:g} ms after the second kill; problems: {problems}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"idle": args.idle, "restart_delay_ms": args.restart_delay, "rows": rows,
                       "problems": problems}, out, indent=1)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
