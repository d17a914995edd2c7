"""The cold path: how long a crash lasts with no standby, step by step, per unit setting.

    .venv/bin/python bench/cold.py [--crashes 7] [--settings NAME,...] [--clients 100] [--json PATH]

Boots a systemd 252 in a container (tests/systemd/harness.py), provisions it
with scripts/provision (the units as a user installs them), connects
``--clients`` idle clients, and for each setting, a drop-in
(``chatd@.service.d/bench-cold.conf``, then ``daemon-reload``), as many
crashes as ``--crashes``:

1. **cold**: the standby stopped (``systemctl stop`` of the instance that does
   not serve), then ``chatctl crash`` (a real SIGSEGV) of the one serving. From
   the journal: the kill (PID 1's "Main process exited") -> the restart timer
   fires ("Scheduled restart job") -> the restart job runs ("Starting"), and
   "Starting" -> READY ("Started": exec, the sandbox, Python, imports, the
   restore), the restore itself (chatd's "restored ... in N ms"), and kill ->
   READY in all;
2. **standby**: the standby started again, then crashes: kill -> the standby's
   restore done (what a client waits), kill -> the crashed one "Starting" and
   READY again as the next standby; to see whether a faster restart slows the
   takeover (both compete for this machine's 2 cores).

``--crashes`` rounds of each; a round crashes once under every setting, in a
new random order (load from elsewhere on the machine falls on all alike), each
crash a random 0.3-1.3 s after the last one serves again (so it falls anywhere
in sd-event's 250 ms wake-up grid). Then, inside the container, with the
installed venv: Python's start-up (``python -c pass``), chatd's imports at
start and the web codec's, medians of 15 runs, and the slowest imports
(``python -X importtime``).

Prints a table (medians, worst in brackets) and writes every figure to
bench/results/cold.json. Every client and crash is bounded; the container
goes when the run ends, however it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "systemd"), str(ROOT / "tests"), str(ROOT / "bench")]

from harness import BootedSystemd  # noqa: E402
from helpers import free_port  # noqa: E402
from scale import CHATCTL, chatctl, provision, serving_unit, wheels_dir  # noqa: E402

from ctl.launch import wait_until  # noqa: E402

UNITS = ("chatd@1", "chatd@2")
DROP_IN = "/etc/systemd/system/chatd@.service.d/bench-cold.conf"
VENV_PYTHON = "/opt/process-backup/bin/python"

#: What a unit can set, each a drop-in over the installed chatd@.service.
#: TimerSlackNSec= is the kernel's timer slack of chatd's process, not of PID 1:
#: measured here to show it leaves the restart timer as it is.
SANDBOX_OFF = ("PrivateTmp=no", "PrivateDevices=no", "ProtectSystem=no", "ProtectHome=no",
               "ProtectKernelTunables=no", "ProtectKernelModules=no", "ProtectKernelLogs=no",
               "ProtectControlGroups=no", "ProtectClock=no", "ProtectHostname=no", "ProtectProc=default",
               "ProcSubset=all")
SETTINGS = {
    "RestartSec=100ms": ("RestartSec=100ms",),
    "RestartSec=100ms TimerSlackNSec=1ns": ("RestartSec=100ms", "TimerSlackNSec=1ns"),
    "RestartSec=1ms": ("RestartSec=1ms",),
    "RestartSec=0": ("RestartSec=0",),
    "RestartSec=0 without the mount sandbox": ("RestartSec=0",) + SANDBOX_OFF,
}


def first(entries: list[tuple[float, str, str]], unit: str, after: float, needle: str) -> tuple[float, str]:
    """(time, message) of ``unit``'s first journal line at or after ``after`` that holds ``needle``."""
    for stamp, about, message in entries:
        if about == unit and stamp >= after and needle in message:
            return stamp, message
    raise LookupError(f"{unit}: no {needle!r} in the journal after the crash")


def container_now(machine) -> str:
    return machine.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:-3]


def crash_once(machine, clients: int, cold: bool) -> dict:
    """``chatctl crash`` the chatd serving; wait for a chatd to serve again and for both units to
    be where they were (with the standby: both active); read the steps from the journal."""
    crashed = serving_unit(machine)
    other = UNITS[1] if crashed == UNITS[0] else UNITS[0]
    old = chatctl(machine, "status")["chatd"]["pid"]
    since = container_now(machine)
    machine.run(CHATCTL, "crash")

    def serving_again():
        try:
            status = chatctl(machine, "status")["chatd"]
        except Exception:
            return None
        return status if status.get("pid") != old and status.get("serving") else None

    # Asked after the restart, not during it: each chatctl is a Python process, which would
    # take a core from the restart being measured.
    time.sleep(1.2)
    status = wait_until(serving_again, 60, "a chatd to serve again", interval=0.1)
    if status["clients"] < clients:
        raise AssertionError(f"only {status['clients']} of {clients} clients back after the crash")
    units = (crashed,) if cold else UNITS
    wait_until(lambda: all(machine.show(unit, "SubState") == "running" for unit in units), 30, "the units up again")
    entries = machine.journal_entries("chatd@*", since)
    killed, _ = first(entries, crashed, 0, "Main process exited")
    ready, _ = first(entries, crashed, killed, "Started ")
    steps = {"kill_to_ready_ms": ms(ready - killed)}
    if cold:
        timer, _ = first(entries, crashed, killed, "Scheduled restart job")
        starting, _ = first(entries, crashed, timer, "Starting ")
        restored, line = first(entries, crashed, starting, "INFO restored ")
        restore = restore_ms(line)
        # chatd logs nothing before its restore: the restore's begin is its end less its length.
        restore_began = restored - restore / 1000
        steps.update(restart_timer_ms=ms(timer - killed), timer_to_starting_ms=ms(starting - timer),
                     starting_to_ready_ms=ms(ready - starting), starting_to_restore_ms=ms(restore_began - starting),
                     restore_ms=restore, restored_to_ready_ms=ms(ready - restored))
    else:
        takeover, line = first(entries, other, killed, "INFO restored ")
        starting, _ = first(entries, crashed, killed, "Starting ")
        steps.update(kill_to_takeover_ms=ms(takeover - killed), restore_ms=restore_ms(line),
                     kill_to_starting_ms=ms(starting - killed))
    return steps


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def restore_ms(message: str) -> float:
    """The figure in chatd's "restored N clients ... in X ms" line."""
    return float(message.split(" in ", 1)[1].split(" ms", 1)[0])


def use_setting(machine, lines: tuple[str, ...]) -> None:
    machine.run("mkdir", "-p", os.path.dirname(DROP_IN))
    machine.run("sh", "-c", f"cat > {DROP_IN}", input="[Service]\n" + "\n".join(lines) + "\n")
    machine.systemctl("daemon-reload")
    machine.systemctl("reset-failed", *UNITS, check=False)


def measure(machine, chosen: list[str], clients: int, crashes: int) -> dict:
    """``crashes`` rounds, cold then with the standby; each round crashes once under every
    setting, in a new random order, so that load from elsewhere on the machine falls on all alike."""
    results = {name: {"cold": [], "standby": []} for name in chosen}
    for case in ("cold", "standby"):
        serving = serving_unit(machine)
        standby = UNITS[1] if serving == UNITS[0] else UNITS[0]
        if case == "cold":
            machine.systemctl("stop", standby)
        else:
            machine.systemctl("start", standby)
            wait_until(lambda: all(machine.show(unit, "SubState") == "running" for unit in UNITS), 30,
                       "both chatd up")
        for round_ in range(crashes):
            for name in random.sample(chosen, len(chosen)):
                use_setting(machine, SETTINGS[name])
                # Spaced: the crash lands anywhere in sd-event's 250 ms grid, and neither unit
                # nears StartLimitBurst=20 in 10 s.
                time.sleep(random.uniform(0.3, 1.3))
                results[name][case].append(crash_once(machine, clients, cold=case == "cold"))
            print(f"  {case}, round {round_ + 1} of {crashes} done", flush=True)
    return results


def python_parts(machine, runs: int = 15) -> dict:
    """Python's start-up, chatd's imports at start, and the web codec's (which chatd imports
    only for a web client, or while it stands by), as the installed venv runs them."""
    def median_ms(code: str) -> float:
        times = []
        for _ in range(runs):
            began = time.perf_counter()
            machine.run(VENV_PYTHON, "-c", code)
            times.append(time.perf_counter() - began)
        return round(statistics.median(times) * 1000, 1)

    start = "import chatd.main; from chatd.protocols import web_unavailable; web_unavailable()"
    bare = median_ms("pass")
    with_chatd = median_ms(start)
    with_web = median_ms(start + "; import chatd.protocols.web")
    report = machine.run(VENV_PYTHON, "-X", "importtime", "-c", start).stderr
    rows = []
    for line in report.splitlines()[1:]:
        self_us, cumulative_us, name = line.removeprefix("import time:").split("|")
        rows.append({"module": name.strip(), "self_ms": int(self_us) / 1000, "cumulative_ms": int(cumulative_us) / 1000,
                     "depth": (len(name) - len(name.lstrip())) // 2})
    slowest = sorted(rows, key=lambda row: row["self_ms"], reverse=True)[:12]
    return {"python_c_pass_ms": bare, "chatd_start_imports_ms": round(with_chatd - bare, 1),
            "web_codec_imports_ms": round(with_web - with_chatd, 1), "slowest_imports_self": slowest,
            "note": "medians of whole runs through nsenter into the container (its cost is in python_c_pass_ms)"}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({max(values):.0f})"


def print_table(results: dict) -> None:
    print("\nmedian (worst) in ms, per setting:")
    print("| setting | cold: kill -> restart timer fires | -> Starting | Starting -> READY | of it the restore "
          "| kill -> READY | standby: kill -> takeover done | kill -> crashed one Starting | kill -> it is READY |")
    print("|" + " --- |" * 9)
    for name, figures in results["settings"].items():
        cold, warm = figures["cold"], figures["standby"]
        columns = [summary([c[key] for c in cold]) for key in ("restart_timer_ms", "timer_to_starting_ms",
                                                              "starting_to_ready_ms", "restore_ms", "kill_to_ready_ms")]
        columns += [summary([w[key] for w in warm]) for key in
                    ("kill_to_takeover_ms", "kill_to_starting_ms", "kill_to_ready_ms")]
        print(f"| {name} | " + " | ".join(columns) + " |")
    parts = results["python"]
    print(f"\nin the container: python -c pass {parts['python_c_pass_ms']} ms; chatd's imports at start "
          f"{parts['chatd_start_imports_ms']} ms more; the web codec's {parts['web_codec_imports_ms']} ms more. "
          "Slowest imports at start (self):")
    for row in parts["slowest_imports_self"][:8]:
        print(f"  {row['module']}: {row['self_ms']:.1f} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=7, help="crashes per setting and case (default %(default)s)")
    parser.add_argument("--clients", type=int, default=100, help="idle clients held (default %(default)s)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="which of the settings, comma-separated (default: all)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "cold.json"))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.settings.split(",")]
    unknown = [name for name in chosen if name not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; the settings are: {', '.join(SETTINGS)}")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    wheels = wheels_dir()
    results = {"crashes": args.crashes, "clients": args.clients, "settings": {}}
    idle = []
    with BootedSystemd(binds=[str(ROOT), str(wheels)], boot_timeout=120) as machine:
        if not provision(machine, wheels, port):
            return 1
        try:
            idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(args.clients)]
            wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] >= args.clients, 60, "the clients in")
            crash_once(machine, args.clients, cold=False)  # warm-up: page cache, first restart
            results["load_before"] = os.getloadavg()
            results["settings"] = measure(machine, chosen, args.clients, args.crashes)
            results["load_after"] = os.getloadavg()
            results["python"] = python_parts(machine)
        except BaseException:
            print(machine.run("journalctl", "-u", "chatd@*", "-u", "holderd", "-n", "60", "--no-pager",
                              check=False).stdout)
            raise
        finally:
            for sock in idle:
                sock.close()
    print_table(results)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(results, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
