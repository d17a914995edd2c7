"""Crash gap at scale, under the real systemd: idle clients by the thousand, a pair that chats, a kill.

    .venv/bin/python bench/scale.py [--sizes 100,1000,10000,ceiling] [--crashes 3] [--json PATH] [--plot PATH]

Boots a systemd in a container (tests/systemd/harness.py), provisions it with
scripts/provision (the units as a user installs them: chatd@1 and chatd@2
taking turns, holderd), and for each size:

1. connects that many idle clients, from several processes (one process holds
   at most ~20,000 fds here), while a pair chats: A sends B a timestamped
   message every 2 ms. It reports the accept rate, the pair's worst one-way
   delay while the others connect, the CPU systemd's PID 1 spent meanwhile, and
   memory per client in the chatd serving, the standby, holderd and PID 1 (RSS
   growth / clients);
2. crashes the chatd serving (``chatctl crash``, a real SIGSEGV) ``--crashes``
   times in each of three modes: the standby up (it has read ahead: each crash
   waits until the new standby has), the standby up while every idle client
   sends PING the moment the crash is asked for (all of them have work), and the
   standby stopped (a cold restart by systemd: the restart timer, a new Python,
   the restore). From the kill on (the earliest of chatd's "crash requested" line just before
   its SIGSEGV, holderd passing the lease, systemd's "Main process exited"), it reads: the first
   message relayed on a restored connection (the pair's); holderd passing the
   lease (its journal line); the restore beginning and serving (its summary:
   the clients with work served, chatd.adoption) and every client adopted; with
   PING, the last PONG; cold, systemd's restart timer and exec -> READY. Then it
   checks every client answers (each sends NICK and waits for OK).

It prints a table, writes the figures as JSON and a PNG plot. ``ceiling`` is
as many clients as chatd's fd limit allows (chatctl status: max_clients), less
a few for the pair and probes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "systemd"), str(ROOT / "tests")]

from harness import BootedSystemd  # noqa: E402
from helpers import free_port, offline_wheels  # noqa: E402

from ctl.launch import wait_until  # noqa: E402
from ctl.probe import LineClient  # noqa: E402

CHATCTL = "/opt/process-backup/bin/chatctl"
#: Each size is crashed this many times in each mode (medians and worst).
CRASHES = 3
MODES = ("standby", "standby, every client active", "cold")
PER_WORKER = 4900


def ask_each(socks: list[socket.socket], line_of, answer_of) -> int:
    """Send each socket its line, all before any answer is read; how many answered as expected."""
    for index, sock in enumerate(socks):
        sock.sendall(line_of(index))
    answered = 0
    for index, sock in enumerate(socks):
        try:
            data, expected = b"", answer_of(index)
            # A line ends in \n; a WebSocket frame (bench/web_scale.py) is as long as the answer expected.
            while len(data) < len(expected) and not data.endswith(b"\n"):
                chunk = sock.recv(100)
                if not chunk:
                    break
                data += chunk
            answered += data == expected
        except OSError:
            pass
    return answered


def idle_worker(port: int, count: int, commands, results) -> None:
    """Hold ``count`` idle connections; on "check", each sends NICK and waits for OK; on "ping",
    each sends PING at once, and the time the last PONG was read is reported."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    socks = []
    for _ in range(count):
        socks.append(socket.create_connection(("127.0.0.1", port), timeout=60))
    results.put(("connected", count))
    tag = os.getpid()
    while True:
        command = commands.get()
        if command == "check":
            results.put(("answered", ask_each(socks, lambda i: f"NICK w{tag}x{i}\n".encode(),
                                              lambda i: f"OK NICK w{tag}x{i}\n".encode())))
        elif command == "ping":
            answered = ask_each(socks, lambda i: b"PING\n", lambda i: b"PONG\n")
            results.put(("pinged", answered, time.time()))
        elif command == "quit":
            for sock in socks:
                sock.sendall(b"QUIT\n")
            for sock in socks:
                sock.close()
            results.put(("closed", count))
            return


class Pair:
    """A sends B a message with its send time every 2 ms; B records when each arrives."""

    def __init__(self, port: int):
        self.a, self.b = LineClient(port, timeout=60), LineClient(port, timeout=60)
        self.a.send("NICK benchA", "PAIR benchB")
        self.b.send("NICK benchB", "PAIR benchA")
        assert self.b.lines(3)[-1] == "PAIRED benchA" and self.a.lines(3)[-1] == "PAIRED benchB"
        self.arrivals: list[tuple[float, float]] = []  # (sent, arrived), wall clock
        self.stop = threading.Event()
        threading.Thread(target=self._send, daemon=True).start()
        threading.Thread(target=self._receive, daemon=True).start()

    def _send(self):
        while not self.stop.is_set():
            try:
                self.a.send(f"MSG {time.time():.6f}")
            except OSError:  # closed under it, at the end
                return
            time.sleep(0.002)

    def _receive(self):
        while not self.stop.is_set():
            try:
                line = self.b.line()
            except (OSError, EOFError):
                return
            if line.startswith("FROM benchA "):
                self.arrivals.append((float(line.split()[3]), time.time()))

    def worst_delay_ms(self, since: float, until: float) -> float:
        delays = [arrived - sent for sent, arrived in self.arrivals if since <= sent <= until]
        return round(max(delays) * 1000, 1) if delays else float("nan")

    def first_after(self, moment: float) -> float | None:
        """When the first message sent after ``moment`` arrived."""
        return next((arrived for sent, arrived in self.arrivals if sent > moment), None)

    def close(self):
        self.stop.set()
        self.a.close(), self.b.close()


def pid1_cpu(machine) -> float:
    with open(f"/proc/{machine.pid1}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0])


def host_pid(machine, unit: str) -> int:
    """A unit's main process as this side sees it: the process under the container's PID 1
    whose innermost pid (NSpid) is the one systemd reports."""
    inner = int(machine.show(unit, "MainPID"))
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                nspid = next(line.split()[1:] for line in status if line.startswith("NSpid:"))
        except (OSError, StopIteration):
            continue
        if len(nspid) == 2 and int(nspid[1]) == inner and _under(int(entry), machine.pid1):
            return int(entry)
    raise RuntimeError(f"{unit}'s process (pid {inner} inside) not found")


def _under(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as stat:
                pid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def chatctl(machine, *args: str) -> dict:
    return json.loads(machine.run(CHATCTL, *args, "--json").stdout)


def serving_unit(machine) -> str:
    pid = chatctl(machine, "status")["chatd"]["pid"]
    return next(unit for unit in ("chatd@1", "chatd@2") if int(machine.show(unit, "MainPID")) == pid)


def crash_and_measure(machine, pair: Pair, clients: int, cold: bool, commands=(), results=None) -> dict:
    """One crash of the serving chatd (``chatctl crash``: SIGSEGV), standby up or (``cold``) stopped.
    With ``commands``, every idle client sends PING the moment the crash is asked for, and
    the time until the last PONG is read (kill -> every client served)."""
    unit = serving_unit(machine)
    standby = "chatd@2" if unit == "chatd@1" else "chatd@1"
    if cold:
        machine.systemctl("stop", standby)
    since = machine.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:-3]
    old = chatctl(machine, "status")["chatd"]["pid"]
    machine.run(CHATCTL, "crash")
    for queue in commands:
        queue.put("ping")

    def restored():
        try:
            status = chatctl(machine, "status")["chatd"]
        except Exception:
            return None
        return status if status.get("pid") != old and status.get("serving") else None

    status = wait_until(restored, 120, "a chatd to serve again", interval=0.05)
    pinged = [results.get(timeout=300) for _ in commands]
    status = wait_until(lambda: (lambda s: s if s["restore"].get("all_adopted_ms") is not None else None)(
        chatctl(machine, "status")["chatd"]), 120, "every client adopted", interval=0.1)
    time.sleep(0.5)
    entries = machine.journal_entries("chatd@*", since)
    # The kill: the first sign of it. chatd's own line just before its SIGSEGV, holderd passing the
    # lease as its sockets close, systemd's "Main process exited" (only once it is reaped): each is
    # stamped when the journal got it, so the earliest is the nearest to the kill.
    exited = next(stamp for stamp, _, message in entries if "Main process exited" in message)
    passed = [stamp for stamp, _, message in machine.journal_entries("holderd", since)
              if "lease chatd passes" in message and stamp >= exited - 1]
    asked = [stamp for stamp, _, message in entries if "crash requested" in message]
    died = min([exited, *passed[:1], *asked[:1]])
    restore = status["restore"]
    first = pair.first_after(died)
    result = {
        "kill_to_first_relayed_ms": round((first - died) * 1000, 1) if first else None,
        "kill_to_served_ms": round((restore["began_at"] + restore["milliseconds"] / 1000 - died) * 1000, 1),
        "kill_to_all_adopted_ms": round((restore["began_at"] + restore["all_adopted_ms"] / 1000 - died) * 1000, 1),
        "kill_to_restore_began_ms": round((restore["began_at"] - died) * 1000, 1),
        "holderd_passed_lease_ms": round((passed[0] - died) * 1000, 1) if passed and not cold else None,
        "restore_ms": restore["milliseconds"],
        "restore_parts_ms": restore.get("parts"),
        "adopted_at_once": restore.get("adopted_at_once"),
        "clients_back": status["clients"],
        "killed_at": died,  # wall clock: other pairs' first message after it (bench/web_scale.py)
    }
    if commands:
        result["kill_to_every_client_answered_ms"] = round((max(at for _, _, at in pinged) - died) * 1000, 1)
        result["answered_ping"] = sum(count for _, count, _ in pinged)
    if cold:
        started = [stamp for stamp, _, message in entries if message.startswith("Starting chatd@") and stamp > exited]
        ready = [stamp for stamp, _, message in entries if message.startswith("Started chatd@") and stamp > died]
        result["restart_timer_ms"] = round((started[0] - died) * 1000, 1) if started else None
        result["exec_to_ready_ms"] = round((ready[0] - started[0]) * 1000, 1) if started and ready else None
        machine.systemctl("start", standby)
    wait_until(lambda: all(machine.show(u, "ActiveState") == "active" for u in ("chatd@1", "chatd@2")), 30,
               "both chatd processes up again")
    if clients:  # the next crash finds a standby that has read ahead, as in steady operation
        wait_until(lambda: (chatctl(machine, "status").get("instances") or [{}]) and all(
            (i.get("role") != "standby" or (i.get("prepared") or {}).get("records", 0) >= clients)
            for i in chatctl(machine, "status").get("instances", [])), 60, "the new standby to have read ahead")
    return result


def median_and_worst(values: list) -> dict:
    values = [v for v in values if v is not None]
    return {"median": round(statistics.median(values), 1), "worst": max(values)} if values else None


class IdleWorkers:
    """``size`` idle clients of chatd on ``port``, spread over worker processes (``worker``, e.g.
    :func:`idle_worker`, :data:`PER_WORKER` clients each), told what to do by queue."""

    def __init__(self, worker, port: int, size: int):
        self.commands, self.results, self.workers = [], multiprocessing.Queue(), []
        for start in range(0, size, PER_WORKER):
            queue = multiprocessing.Queue()
            process = multiprocessing.Process(target=worker, args=(port, min(PER_WORKER, size - start), queue,
                                                                   self.results), daemon=True)
            process.start()
            self.commands.append(queue)
            self.workers.append(process)
        for _ in self.workers:
            assert self.results.get(timeout=600)[0] == "connected"

    def check(self) -> int:
        """Each client asks chatd once more; how many were answered."""
        for queue in self.commands:
            queue.put("check")
        return sum(self.results.get(timeout=300)[1] for _ in self.workers)

    def stop(self, machine, others: int) -> None:
        """Every client leaves; wait until chatd holds only the ``others``."""
        for queue in self.commands:
            queue.put("quit")
        for _ in self.workers:
            self.results.get(timeout=300)
        for worker in self.workers:
            worker.join(30)
        wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] <= others, 120, "the idle clients to leave")


def measure_size(machine, port: int, size: int, pair: Pair, crashes_each: int = CRASHES) -> dict:
    cpu_before = pid1_cpu(machine)
    serving_pid = host_pid(machine, serving_unit(machine))
    holderd_pid = host_pid(machine, "holderd")
    standby_pid = host_pid(machine, "chatd@2" if serving_unit(machine) == "chatd@1" else "chatd@1")
    rss_before = {"chatd": rss_kib(serving_pid), "holderd": rss_kib(holderd_pid), "pid1": rss_kib(machine.pid1),
                  "standby": rss_kib(standby_pid)}
    began = time.time()
    idle = IdleWorkers(idle_worker, port, size)
    wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] >= size + 2, 300, f"{size} clients accepted")
    connected = time.time()
    row = {
        "clients": size,
        "accepts_per_s": round(size / (connected - began)),
        "pair_worst_delay_while_connecting_ms": pair.worst_delay_ms(began, connected),
        "pid1_cpu_s": round(pid1_cpu(machine) - cpu_before, 3),
    }
    time.sleep(1)
    for name, pid in (("chatd", serving_pid), ("holderd", holderd_pid), ("pid1", machine.pid1)):
        row[f"{name}_bytes_per_client"] = round((rss_kib(pid) - rss_before[name]) * 1024 / size)
    time.sleep(2)  # the bundles get packed in the background (one a 0.2 s)
    standby_pid = host_pid(machine, "chatd@2" if serving_unit(machine) == "chatd@1" else "chatd@1")
    row["standby_bytes_per_client"] = round((rss_kib(standby_pid) - rss_before["standby"]) * 1024 / size)
    for mode in MODES:
        crashes = []
        for _ in range(crashes_each):
            crash = crash_and_measure(machine, pair, size, cold=mode == "cold",
                                      commands=idle.commands if mode == "standby, every client active" else (),
                                      results=idle.results)
            if mode != "standby, every client active":
                crash["answered"] = idle.check()
            print(f"  {size} clients, {mode}: {crash}", flush=True)
            crashes.append(crash)
        row[mode] = {"crashes": crashes, **{key: median_and_worst([c.get(key) for c in crashes]) for key in (
            "kill_to_first_relayed_ms", "kill_to_served_ms", "kill_to_all_adopted_ms", "kill_to_restore_began_ms",
            "holderd_passed_lease_ms", "restore_ms", "kill_to_every_client_answered_ms", "restart_timer_ms",
            "exec_to_ready_ms")}}
        row[mode]["answered"] = min(c.get("answered", c.get("answered_ping", 0)) for c in crashes)
    idle.stop(machine, others=2)
    return row


def wheels_dir() -> Path:
    directory = Path("/tmp/process-backup-bench-wheels")
    directory.mkdir(exist_ok=True)
    offline_wheels(directory)
    directory.chmod(0o755)
    return directory


def provision(machine, wheels: Path, port: int, http_port: int | None = None) -> bool:
    """scripts/provision in the container, as a user runs it: True once both chatd are up (it
    returns before they are), False, with its output printed, if it failed."""
    options = f"--port {port}" + (f" --http-port {http_port}" if http_port else "")
    result = machine.run("bash", str(ROOT / "scripts" / "provision"), "--source", str(ROOT), "--wheels",
                         str(wheels), "--chatd-options", options, "--no-selftest", check=False, timeout=900)
    if result.returncode != 0:
        print(result.stdout, result.stderr)
        return False
    wait_until(lambda: all(machine.show(unit, "SubState") == "running" for unit in ("chatd@1", "chatd@2")), 60,
               "both chatd up")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000,ceiling")
    parser.add_argument("--crashes", type=int, default=CRASHES, help="crashes per size and mode (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "scale.json"))
    parser.add_argument("--plot", metavar="PATH", default=str(ROOT / "bench" / "results" / "scale.png"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = free_port()
    wheels = wheels_dir()
    rows = []
    with BootedSystemd(binds=[str(ROOT), str(wheels)], boot_timeout=120) as machine:
        if not provision(machine, wheels, port):
            return 1
        ceiling = chatctl(machine, "status")["chatd"]["max_clients"] - 10
        pair = Pair(port)
        try:
            for text in args.sizes.split(","):
                size = ceiling if text == "ceiling" else int(text)
                print(f"{size} idle clients ...", flush=True)
                rows.append(measure_size(machine, port, size, pair, args.crashes))
                os.makedirs(os.path.dirname(args.json), exist_ok=True)
                with open(args.json, "w") as out:  # after each size: a later failure keeps what was measured
                    json.dump(rows, out, indent=2)
        except BaseException:
            print(machine.run("journalctl", "-u", "chatd@*", "-u", "holderd", "-n", "60", "--no-pager",
                              check=False).stdout)
            raise
        finally:
            pair.close()
    print_table(rows)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump(rows, out, indent=2)
    plot(rows, args.plot)
    return 0


def cell(figure: dict | None) -> str:
    """A figure as a table shows it: the median, the worst in brackets."""
    return "-" if not figure else f"{figure['median']:g} ({figure['worst']:g})"


def print_table(rows: list[dict]) -> None:
    """Two tables: the crash gap per mode (median, worst in brackets, over the crashes), and
    the parts of a standby takeover; then the costs of holding the clients."""
    print("\n| clients | mode | kill -> first relayed | kill -> served (restore done) | kill -> every client "
          "adopted | kill -> every client answered (all send at once) | answered |")
    print("|" + " --- |" * 7)
    for row in rows:
        for mode in MODES:
            m = row[mode]
            print(f"| {row['clients']:,} | {mode} | {cell(m['kill_to_first_relayed_ms'])} ms "
                  f"| {cell(m['kill_to_served_ms'])} ms | {cell(m['kill_to_all_adopted_ms'])} ms "
                  f"| {cell(m['kill_to_every_client_answered_ms'])} ms | {m['answered']:,} |")
    print("\n| clients | holderd passes the lease | restore begins | restore (served) | cold: restart timer "
          "| cold: exec -> READY |")
    print("|" + " --- |" * 6)
    for row in rows:
        standby, cold = row["standby"], row["cold"]
        print(f"| {row['clients']:,} | {cell(standby['holderd_passed_lease_ms'])} ms "
              f"| {cell(standby['kill_to_restore_began_ms'])} ms | {cell(standby['restore_ms'])} ms "
              f"| {cell(cold['restart_timer_ms'])} ms | {cell(cold['exec_to_ready_ms'])} ms |")
    print("\n| clients | PID 1 CPU while they connect | accepts/s | pair worst delay while others connect "
          "| bytes/client: chatd serving, standby, holderd, PID 1 |")
    print("|" + " --- |" * 5)
    for row in rows:
        print(f"| {row['clients']:,} | {row['pid1_cpu_s']} s | {row['accepts_per_s']:,} "
              f"| {row['pair_worst_delay_while_connecting_ms']} ms | {row['chatd_bytes_per_client']}, "
              f"{row['standby_bytes_per_client']}, {row['holderd_bytes_per_client']}, {row['pid1_bytes_per_client']} |")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = [row["clients"] for row in rows]
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for mode, style in (("standby", "o-"), ("standby, every client active", "^-"), ("cold", "s--")):
        for key, label, alpha in (("kill_to_first_relayed_ms", "first message relayed", 1.0),
                                  ("kill_to_all_adopted_ms", "every client adopted", 0.5),
                                  ("kill_to_every_client_answered_ms", "every client answered", 0.5)):
            values = [(row[mode][key] or {}).get("median") for row in rows]
            if any(v is not None for v in values):
                axes.plot(clients, values, style, alpha=alpha, label=f"kill -> {label} ({mode})")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("idle clients held")
    axes.set_ylabel("ms (median of the crashes)")
    axes.set_title("chatd crash gap under systemd 252 (standby reads ahead vs cold restart)")
    axes.legend(fontsize=7)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
