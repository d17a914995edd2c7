"""Relay and accept rates: chatd with and without its backups, against a plain relay, in one run.

    .venv/bin/python bench/rates.py [--pairs 10] [--seconds 5] [--size 100] [--rounds 3]
                                    [--accepts 6000] [--compare-rev REV] [--journal-file DIR ...]
                                    [--json PATH] [--plot PATH]

Each *target* is started in turn in a scratch directory and given the same
loads. Relay: ``--pairs`` pairs of line clients (in this process, on a
selector), each keeping ``--window`` messages of ``--size`` bytes on their way
to its partner; after a second of warm-up, the ``FROM`` lines received in
``--seconds`` are counted, and divided by the CPU time the relaying process
used meanwhile too (per CPU second: steadier on a busy machine). Accept: ``--accepts`` new clients, from three
processes at once with up to 64 connects in flight each, each client
connecting, sending NICK and waiting for its OK, then gone; the rate is
clients answered per second. Targets:

- ``chatd+holderd``: the product as a user runs it;
- ``chatd``: chatd without holderd (``--no-holderd``; its journal still on);
- ``chatd+holderd, no journal``: the journal's writes switched off
  (``--no-journal``): what the journal costs;
- ``asyncio``: bench/asyncio_relay.py, a minimal relay with no backup at all;
- ``chatd@REV+holderd``: with ``--compare-rev``, chatd and holderd of another
  revision (a git worktree of it), e.g. the one before a change;
- ``chatd+holderd, journal file on FS``: with ``--journal-file DIR`` (once per
  directory), the journal a file (``--state-dir``, a new directory in DIR each
  round) instead of a memfd; FS is the file system DIR is on (tmpfs, ext4 ...).

Rounds alternate the targets so that a noisy neighbour hurts all alike; the
table shows each target's median and its ratio to ``asyncio`` and to
``chatd`` (no holderd), measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctl.launch import Launcher, wait_until  # noqa: E402


class Load:
    """``pairs`` pairs of clients, each keeping ``window`` messages in flight to its partner
    (the b side on ``port_b`` if given: another chatd host)."""

    def __init__(self, port: int, pairs: int, size: int, window: int, port_b: int | None = None):
        self.selector = selectors.DefaultSelector()
        self.message = b"MSG " + b"x" * size + b"\n"
        self.window = window
        self.clients = []
        for index in range(pairs):
            a, b = self._connect(port), self._connect(port_b or port)
            a.sendall(f"NICK a{index}\nPAIR b{index}\n".encode())
            b.sendall(f"NICK b{index}\nPAIR a{index}\n".encode())
            self.clients += [(a, b), (b, a)]
        self.stats = {sock: [0, 0, b""] for pair in self.clients for sock in pair}  # sent, received, pending
        deadline = time.monotonic() + 10
        paired = set()
        while len(paired) < len(self.stats):
            for sock in self.stats:
                try:
                    if b"PAIRED" in sock.recv(65536, socket.MSG_DONTWAIT):
                        paired.add(sock)
                except BlockingIOError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("the load's clients did not pair")
        for sock in self.stats:
            self.selector.register(sock, selectors.EVENT_READ)

    @staticmethod
    def _connect(port: int) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        return sock

    def run(self, seconds: float) -> int:
        """Relay for ``seconds``; the messages delivered meanwhile."""
        delivered = 0
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for sender, receiver in self.clients:
                state = self.stats[sender]
                if not state[2] and state[0] - self.stats[receiver][1] < self.window:
                    state[2] = self.message * 16
                    state[0] += 16
                if state[2]:
                    try:
                        written = sender.send(state[2])
                        state[2] = state[2][written:]
                    except BlockingIOError:
                        pass
            for key, _ in self.selector.select(0.001):
                try:
                    data = key.fileobj.recv(1 << 18)
                except BlockingIOError:
                    continue
                lines = data.count(b"\n")
                self.stats[key.fileobj][1] += lines
                delivered += lines
        return delivered

    def close(self) -> None:
        for sock in self.stats:
            sock.close()


def file_system(directory: str) -> str:
    """The type of the file system ``directory`` is on (the longest mount point above it)."""
    path, best = os.path.realpath(directory), ("", "?")
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            _, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, kind)
    return best[1]


def cpu_seconds(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_target(name: str, launcher: Launcher, revision_root: str | None, journal_dir: str | None = None) -> int:
    """Start the target; its port (the relaying process is ``launcher.chatd``).
    ``journal_dir``: where its journal file goes (--state-dir)."""
    if name == "asyncio":
        proc = launcher.chatd = launcher.spawn("asyncio", "bench.asyncio_relay", "0")
        return int(wait_until(lambda: _first_line(launcher, proc), 10, "the asyncio relay"))
    if revision_root:
        # Another revision's daemons: its own code first on the path.
        launcher.env["PYTHONPATH"] = revision_root
        launcher.start_holderd()
        module = "chatd" if os.path.exists(os.path.join(revision_root, "chatd", "__main__.py")) else "chatd.server"
        launcher.chatd = launcher.spawn("chatd", module, "--port", "0", "--control", launcher.control_socket,
                                        "--holder", launcher.holder_socket)
        return launcher.wait_chatd()["port"]
    if name.startswith("chatd+holderd"):
        launcher.start_holderd()
        options = ["--no-journal"] if "no journal" in name else []
        if journal_dir is not None:
            options += ["--state-dir", tempfile.mkdtemp(prefix="chatd-state-", dir=journal_dir)]
        launcher.start_chatd(*options)
    else:
        launcher.start_chatd("--no-holderd")
    return launcher.port


def _first_line(launcher: Launcher, proc) -> str | None:
    logs = [name for name in os.listdir(launcher.workdir) if name.startswith("asyncio")]
    with open(os.path.join(launcher.workdir, sorted(logs)[-1])) as log:
        line = log.readline().strip()
    if proc.poll() is not None:
        raise RuntimeError(f"the asyncio relay exited: {line}")
    return line if line.isdigit() else None


def measure(name: str, args, revision_root: str | None, journal_dir: str | None = None) -> tuple[float, float, float]:
    """(messages relayed a second, the same per second of the relay's own CPU time, clients
    accepted and answered a second). Per CPU second: what the work costs, whatever share of the
    cores a busy machine leaves the relay (a rate alone swings with the neighbours)."""
    with Launcher() as launcher:
        try:
            port = start_target(name, launcher, revision_root, journal_dir)
            load = Load(port, args.pairs, args.size, args.window)
            try:
                load.run(1.0)
                cpu = cpu_seconds(launcher.chatd.pid)
                delivered = load.run(args.seconds)
                cpu = cpu_seconds(launcher.chatd.pid) - cpu
            finally:
                load.close()
            return delivered / args.seconds, delivered / max(cpu, 0.01), accept_rate(port, args.accepts)
        finally:
            launcher.close()  # before its state directory goes: chatd seals its journal as it stops
            if journal_dir is not None:
                for made in os.listdir(journal_dir):
                    if made.startswith("chatd-state-"):
                        shutil.rmtree(os.path.join(journal_dir, made), ignore_errors=True)


def _accept_worker(port: int, count: int, tag: int, ready, go, results) -> None:
    """Connect ``count`` clients, up to 64 connects at once (non-blocking), each sending NICK;
    count the OKs. Many in flight, so that the server, not this side, sets the pace."""
    import resource
    import selectors

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    ready.put(tag)
    go.wait()
    selector = selectors.DefaultSelector()
    started = answered = 0
    pending = {}
    while answered < count:
        while started < count and len(pending) < 64:
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            pending[sock] = f"NICK n{tag}x{started}\n".encode()
            selector.register(sock, selectors.EVENT_WRITE)
            started += 1
        for key, mask in selector.select(1.0):
            sock = key.fileobj
            if mask & selectors.EVENT_WRITE:
                sock.send(pending[sock])
                selector.modify(sock, selectors.EVENT_READ)
            elif sock.recv(100).startswith(b"OK NICK"):
                answered += 1
                selector.unregister(sock)
                del pending[sock]
                # A reset, not a FIN: tens of thousands of this side's TIME_WAIT sockets would
                # make every later connect() hunt for a free port, and that would be measured.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
    results.put((time.monotonic(), answered))


def accept_rate(port: int, total: int, workers: int = 3) -> float:
    import multiprocessing

    ready, results, go = multiprocessing.Queue(), multiprocessing.Queue(), multiprocessing.Event()
    procs = [multiprocessing.Process(target=_accept_worker, args=(port, total // workers, tag, ready, go, results))
             for tag in range(workers)]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=30)
    began = time.monotonic()
    go.set()
    finished = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(30)
    return sum(answered for _, answered in finished) / (max(stamp for stamp, _ in finished) - began)


def worktree(revision: str) -> str:
    directory = tempfile.mkdtemp(prefix="relay-rev-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", directory, revision], check=True,
                   capture_output=True)
    return directory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--accepts", type=int, default=6000, help="clients a round of the accept test connects")
    parser.add_argument("--compare-rev", metavar="REV", help="also run chatd and holderd of this git revision")
    parser.add_argument("--journal-file", metavar="DIR", action="append", default=[],
                        help="also run chatd+holderd with its journal a file in a new directory in DIR "
                        "(--state-dir); once per directory, e.g. /dev/shm (tmpfs) and /var/lib (the units')")
    parser.add_argument("--json", metavar="PATH", default=os.path.join(ROOT, "bench", "results", "rates.json"))
    parser.add_argument("--plot", metavar="PATH", default=os.path.join(ROOT, "bench", "results", "rates.png"),
                        help="a bar chart of the medians")
    args = parser.parse_args()
    targets = ["chatd+holderd", "chatd", "chatd+holderd, no journal", "asyncio"]
    revision_root = None
    if args.compare_rev:
        revision_root = worktree(args.compare_rev)
        targets.append(f"chatd@{args.compare_rev}+holderd")
    journal_dirs = {}
    for directory in args.journal_file:
        name = f"chatd+holderd, journal file on {file_system(directory)} ({directory})"
        journal_dirs[name] = directory
        targets.append(name)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    per_cpu: dict[str, list[float]] = {name: [] for name in targets}
    accepts: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for round_number in range(args.rounds):
            for name in targets:
                relayed, relayed_per_cpu, accepted = measure(name, args, revision_root if "@" in name else None,
                                                             journal_dirs.get(name))
                rates[name].append(relayed)
                per_cpu[name].append(relayed_per_cpu)
                accepts[name].append(accepted)
                print(f"round {round_number + 1}: {name:>28}: {relayed:10,.0f} messages/s "
                      f"({relayed_per_cpu:,.0f} per CPU second), {accepted:8,.0f} accepts/s", flush=True)
    finally:
        if revision_root:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", revision_root], capture_output=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    accept_medians = {name: statistics.median(values) for name, values in accepts.items()}
    print(f"\n{args.pairs} pairs, {args.size}-byte messages, {args.window} in flight per client, "
          f"{args.seconds:g} s x {args.rounds} rounds; {args.accepts} new clients a round\n")
    print("| target | messages/s | vs asyncio | vs no holderd | accepts/s | vs asyncio | vs no holderd |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, median in medians.items():
        accept = accept_medians[name]
        print(f"| {name} | {median:,.0f} | {median / medians['asyncio']:.2f}x | {median / medians['chatd']:.2f}x "
              f"| {accept:,.0f} | {accept / accept_medians['asyncio']:.2f}x | {accept / accept_medians['chatd']:.2f}x |")
    if journal_dirs:
        # Round by round, each file against the memfd of the same round: the neighbours' noise shared.
        def ratios(of: dict[str, list[float]], name: str) -> list[float]:
            return [file / memfd for file, memfd in zip(of[name], of["chatd+holderd"])]

        print("\n| journal | relay vs memfd, per round | median | per CPU second vs memfd, per round | median "
              "| accepts vs memfd, median |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name in journal_dirs:
            relay, cpu = ratios(rates, name), ratios(per_cpu, name)
            print(f"| {name.split(', ', 1)[1]} | {', '.join(f'{r:.2f}' for r in relay)} | "
                  f"{statistics.median(relay):.2f}x | {', '.join(f'{r:.2f}' for r in cpu)} | "
                  f"{statistics.median(cpu):.2f}x | {statistics.median(ratios(accepts, name)):.2f}x |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "relay": rates, "relay_medians": medians, "relay_per_cpu_second": per_cpu,
                       "accepts": accepts, "accept_medians": accept_medians}, out, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
        left.barh(list(medians), list(medians.values()), color="#6a8caf")
        left.set_xlabel("messages relayed per second (median)")
        left.set_title(f"{args.pairs} pairs, {args.size}-byte messages")
        right.barh(list(accept_medians), list(accept_medians.values()), color="#9bbb59")
        right.set_xlabel("new clients accepted and answered per second")
        right.set_yticklabels([])
        figure.tight_layout()
        figure.savefig(args.plot, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
