"""Relay rate over WebSocket: chatd's web path against its own line path and a `websockets` relay.

    .venv/bin/python bench/web_rates.py [--pairs 12] [--loads 3] [--sizes 100 16384] [--seconds 4]
                                        [--rounds 3] [--window 32] [--compare-rev REV] [--targets NAME ...]
                                        [--py-spy DIR] [--json PATH]

Each *target* is started in turn in a scratch directory and given the same
load: ``--pairs`` pairs of clients spread over ``--loads`` processes (so that
the load is not what sets the pace), each client keeping ``--window`` messages
of ``--size`` bytes of text on their way to its partner (a sender waits for its
partner to have received the oldest before sending more). The web clients are
the ``websockets`` library's (asyncio, no compression, as a browser would have
none with chatd); the line clients are asyncio streams. After a second of
warm-up, the messages received in ``--seconds`` are counted, and divided by the
CPU time the relaying process used meanwhile too (per CPU second: what the work
costs, whatever share of the 2 cores the load and the neighbours leave it).
Targets:

- ``chatd web``: chatd+holderd (journal on), the clients on its web port (``/ws``,
  JSON messages: README "The web chat");
- ``chatd line``: the same, the clients on its line port (``MSG``/``FROM``);
- ``websockets``: bench/websockets_relay.py, a minimal relay on the ``websockets``
  library speaking the same JSON messages, no backup;
- ``asyncio line``: bench/asyncio_relay.py, the line baseline of bench/rates.py;
- ``chatd@REV web``, ``chatd@REV line``: with ``--compare-rev``, chatd and holderd
  of another revision (a git worktree of it): a change's before and after in one run.

Rounds alternate the targets (and the sizes) so that a noisy neighbour hurts all
alike; the tables show each target's median, range, and its ratios to
``websockets`` and to ``chatd line``, measured in the same run; the JSON keeps
every round. With ``--py-spy DIR``, ``py-spy record`` samples the relaying
process through each measurement (its collapsed stacks in DIR, one file a
target, size and round): where the time goes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.rates import cpu_seconds, worktree  # noqa: E402
from ctl.launch import Launcher, wait_until  # noqa: E402

TARGETS = ["chatd web", "chatd line", "websockets", "asyncio line"]
#: py-spy beside this Python (the venv's), else the one on the PATH.
PY_SPY = next((path for path in (os.path.join(os.path.dirname(sys.executable), "py-spy"),) if os.path.exists(path)),
              "py-spy")
#: Where a sample's innermost Python frame is, by file: the parts the time is told by.
PARTS = (("(wsproto/", "wsproto"), ("(h11/", "h11"), ("(json/", "JSON"), ("chatd/rings.py", "journal"),
         ("chatd/journal.py", "journal"), ("chatd/protocols/web.py", "web codec"),
         ("chatd/protocols/line.py", "line codec"), ("chatd/room.py", "room"), ("fdkeep/", "fdkeep (I/O)"))


def where_time_goes(path: str) -> dict[str, float]:
    """Share of py-spy's samples (collapsed stacks) by the part their innermost frame is in
    (a C function counts for the Python that called it: json.loads's work is JSON's)."""
    parts, total = {}, 0
    with open(path) as samples:
        for line in samples:
            stack, _, count = line.rstrip().rpartition(" ")
            innermost = stack.rsplit(";", 1)[-1]
            part = next((name for marker, name in PARTS if marker in innermost), "other (chatd's server, loop)")
            parts[part] = parts.get(part, 0) + int(count)
            total += int(count)
    return {part: count / total for part, count in sorted(parts.items(), key=lambda item: -item[1])}


# -- the load (each in its own process) -----------------------------------------------------------
class Counter:
    def __init__(self):
        self.received = 0


async def web_pair(port: int, name: str, size: int, window: int, counter: Counter):
    """Two WebSocket clients, paired; their (sender, receiver, connection) loops to run."""
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/ws"
    a = await connect(url, compression=None, max_size=None, open_timeout=10)
    b = await connect(url, compression=None, max_size=None, open_timeout=10)
    for me, peer, conn in ((f"a{name}", f"b{name}", a), (f"b{name}", f"a{name}", b)):
        await conn.send(json.dumps({"type": "nick", "name": me}))
        await conn.send(json.dumps({"type": "pair", "peer": peer}))
    for conn in (a, b):
        while b'"paired"' not in await asyncio.wait_for(conn.recv(decode=False), 10):
            pass
    message = json.dumps({"type": "msg", "text": "x" * size})
    credit = {a: asyncio.Semaphore(window), b: asyncio.Semaphore(window)}

    async def send(conn):
        while True:
            await credit[conn].acquire()
            await conn.send(message)

    async def receive(conn, partner):
        while True:
            if (await conn.recv(decode=False)).startswith(b'{"type":"from"'):
                counter.received += 1
                credit[partner].release()

    return [send(a), send(b), receive(a, b), receive(b, a)], [a.transport, b.transport]


async def line_pair(port: int, name: str, size: int, window: int, counter: Counter):
    """Two line clients, paired; their loops to run."""
    a_reader, a = await asyncio.open_connection("127.0.0.1", port, limit=1 << 18)
    b_reader, b = await asyncio.open_connection("127.0.0.1", port, limit=1 << 18)
    a.write(f"NICK a{name}\nPAIR b{name}\n".encode())
    b.write(f"NICK b{name}\nPAIR a{name}\n".encode())
    for reader in (a_reader, b_reader):
        while not (await asyncio.wait_for(reader.readline(), 10)).startswith(b"PAIRED"):
            pass
    message = b"MSG " + b"x" * size + b"\n"
    credit = {a: asyncio.Semaphore(window), b: asyncio.Semaphore(window)}

    async def send(writer):
        while True:
            await credit[writer].acquire()
            writer.write(message)
            await writer.drain()

    async def receive(reader, partner):
        while True:
            if (await reader.readline()).startswith(b"FROM"):
                counter.received += 1
                credit[partner].release()

    return [send(a), send(b), receive(a_reader, b), receive(b_reader, a)], [a.transport, b.transport]


def load_process(kind: str, port: int, pairs: list[int], size: int, window: int, ready, start_at, results):
    """Connect and pair ``pairs``; then count the messages received between the times the main
    process sends (monotonic clock: the same in every process)."""

    async def run():
        counter = Counter()
        make = web_pair if kind == "web" else line_pair
        loops, transports = [], []
        for index in pairs:
            pair_loops, pair_transports = await make(port, str(index), size, window, counter)
            loops += pair_loops
            transports += pair_transports
        ready.put(len(pairs))
        begin, end = await asyncio.get_running_loop().run_in_executor(None, start_at.get, True, 60)
        tasks = [asyncio.ensure_future(loop) for loop in loops]
        await asyncio.sleep(max(begin - time.monotonic(), 0))
        first = counter.received
        await asyncio.sleep(max(end - time.monotonic(), 0))
        results.put(counter.received - first)
        for task in tasks:
            task.cancel()
        for transport in transports:
            transport.abort()  # not a polite close: the next target is waiting

    asyncio.run(run())


def measure(kind: str, port: int, server_pid: int, args, size: int, profile: str | None = None) -> tuple[float, float]:
    """(messages delivered a second, per second of the relaying process's CPU time); with
    ``profile`` (a path), py-spy's samples of the relaying process meanwhile."""
    ready, results = multiprocessing.Queue(), multiprocessing.Queue()
    starts = [multiprocessing.Queue() for _ in range(args.loads)]
    procs = [multiprocessing.Process(target=load_process, daemon=True, args=(
        kind, port, list(range(tag, args.pairs, args.loads)), size, args.window, ready, starts[tag], results))
        for tag in range(args.loads)]
    for proc in procs:
        proc.start()
    try:
        for _ in procs:
            ready.get(timeout=60)
        begin = time.monotonic() + args.warmup
        end = begin + args.seconds
        for start in starts:
            start.put((begin, end))
        time.sleep(max(begin - time.monotonic(), 0))
        spy = None
        if profile:
            spy = subprocess.Popen([PY_SPY, "record", "--pid", str(server_pid), "--duration", str(int(args.seconds)),
                                    "--rate", "200", "--format", "raw", "--nonblocking", "--output", profile],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cpu = cpu_seconds(server_pid)
        time.sleep(max(end - time.monotonic(), 0))
        cpu = cpu_seconds(server_pid) - cpu
        delivered = sum(results.get(timeout=60) for _ in procs)
        if spy is not None:
            spy.wait(30)
    finally:
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return delivered / args.seconds, delivered / max(cpu, 0.01)


def _printed_port(launcher: Launcher, proc, prefix: str) -> int | None:
    logs = sorted(name for name in os.listdir(launcher.workdir) if name.startswith(prefix))
    with open(os.path.join(launcher.workdir, logs[-1])) as log:
        line = log.readline().strip()
    if proc.poll() is not None:
        raise RuntimeError(f"{prefix} exited: {line}")
    return int(line) if line.isdigit() else None


def run_target(name: str, args, size: int, revision_root: str | None, profile: str | None = None
               ) -> tuple[float, float]:
    with Launcher() as launcher:
        if name in ("websockets", "asyncio line"):
            module = "websockets_relay" if name == "websockets" else "asyncio_relay"
            proc = launcher.chatd = launcher.spawn(module, f"bench.{module}", "0")
            port = wait_until(lambda: _printed_port(launcher, proc, module), 10, name)
        else:
            if revision_root:
                launcher.env["PYTHONPATH"] = revision_root  # that revision's code first
            launcher.start_holderd()
            launcher.start_chatd()
            port = launcher.http_port if name.endswith("web") else launcher.port
        kind = "web" if name in ("websockets",) or name.endswith("web") else "line"
        return measure(kind, port, launcher.chatd.pid, args, size, profile)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--loads", type=int, default=3, help="load processes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 16384], help="message sizes, bytes of text")
    parser.add_argument("--window", type=int, default=32, help="messages in flight per client")
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare-rev", metavar="REV", help="also run chatd and holderd of this revision")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=TARGETS)
    parser.add_argument("--py-spy", metavar="DIR", help="profile the relay of each measurement into DIR (py-spy, "
                        "on the PATH)")
    parser.add_argument("--json", metavar="PATH", default=os.path.join(ROOT, "bench", "results", "web-rates.json"))
    args = parser.parse_args()
    targets = list(args.targets)
    revision_root = None
    if args.compare_rev:
        revision_root = worktree(args.compare_rev)
        targets += [f"chatd@{args.compare_rev} web", f"chatd@{args.compare_rev} line"]
    rates = {size: {name: [] for name in targets} for size in args.sizes}
    per_cpu = {size: {name: [] for name in targets} for size in args.sizes}
    try:
        for round_number in range(args.rounds):
            # Each round in another order: the targets share the slow and the quiet moments alike.
            order = targets[round_number % len(targets):] + targets[:round_number % len(targets)]
            for size in args.sizes:
                for name in order:
                    profile = None
                    if args.py_spy:
                        os.makedirs(args.py_spy, exist_ok=True)
                        profile = os.path.join(args.py_spy, f"{name.replace(' ', '-')}-{size}-{round_number + 1}.txt")
                    rate, rate_per_cpu = run_target(name, args, size, revision_root if "@" in name else None,
                                                    profile)
                    rates[size][name].append(rate)
                    per_cpu[size][name].append(rate_per_cpu)
                    print(f"round {round_number + 1}: {size:>6} B {name:>20}: {rate:9,.0f} messages/s "
                          f"({rate_per_cpu:,.0f} per CPU second)", flush=True)
    finally:
        if revision_root:
            subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", revision_root], capture_output=True)
    print(f"\n{args.pairs} pairs over {args.loads} load processes, {args.window} messages in flight per client, "
          f"{args.seconds:g} s x {args.rounds} rounds; median (range)\n")
    print("| size | target | messages/s | per CPU second of the relay | vs websockets (per CPU s) "
          "| vs chatd line (per CPU s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in args.sizes:
        medians = {name: statistics.median(values) for name, values in rates[size].items()}
        cpu_medians = {name: statistics.median(values) for name, values in per_cpu[size].items()}

        def ratio(name, base):
            if base not in medians:
                return "-"
            return f"{medians[name] / medians[base]:.2f}x ({cpu_medians[name] / cpu_medians[base]:.2f}x)"

        for name in targets:
            print(f"| {size:,} B | {name} | {summary(rates[size][name])} | {summary(per_cpu[size][name])} "
                  f"| {ratio(name, 'websockets')} | {ratio(name, 'chatd line')} |")
    profiles = {}
    if args.py_spy:
        print("\n| size | target | where the relay's time goes (py-spy samples, all rounds) |\n| --- | --- | --- |")
        for size in args.sizes:
            for name in targets:
                if not name.startswith("chatd"):
                    continue
                stem = os.path.join(args.py_spy, f"{name.replace(' ', '-')}-{size}-")
                shares = {}
                for round_number in range(args.rounds):
                    if os.path.exists(f"{stem}{round_number + 1}.txt"):
                        for part, share in where_time_goes(f"{stem}{round_number + 1}.txt").items():
                            shares[part] = shares.get(part, 0) + share / args.rounds
                profiles[f"{size} {name}"] = shares
                print(f"| {size:,} B | {name} | " + ", ".join(f"{part} {share:.0%}" for part, share in shares.items())
                      + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as out:
            json.dump({"args": vars(args), "relay": rates, "relay_per_cpu_second": per_cpu, "profiles": profiles},
                      out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
