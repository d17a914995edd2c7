"""Host loss: every session of a lost host resumed on the surviving hosts, for 100 / 1,000 / 5,000 sessions.

    .venv/bin/python bench/host_loss.py [--sizes 100,1000,5000] [--paired] [--jitter 1.0]
                                        [--per-worker 2500] [--json PATH] [--plot PATH]

For each size, a fresh cluster (ctl.hosts.Hosts: 3 chatd hosts, each its own
holderd and journal, over a 3-node NATS JetStream cluster, R3, secured):

1. ``size`` session clients connect to h0 from worker processes (at most
   ``--per-worker`` each: one process may hold 20,000 fds here), each ``NICK
   s<w>x<i>``, ``SESSION``, and keeps its token. They are *idle* (no peer) by
   default; with ``--paired`` each is paired with a plain client on h1 or h2
   (round robin), held by the same worker, so the session's entry has a target.
2. Meanwhile ``--streams`` pairs stream across the surviving hosts (a on h1, b
   on h2, and the other way round), a message with its send time every 5 ms.
3. h0 is lost (``Hosts.lose_host``: chatd and holderd SIGKILLed). Each session
   client sees its connection end, waits a random ``0..--jitter`` seconds (the
   spread of clients' backoff behind a load balancer), connects to h1 or h2 (round
   robin over the surviving ports) and says ``RESUME <token> 0``. ``ERR busy <s>``
   (the resume gate, ``--resume-rate``): it says it again after a random wait up
   to ``s`` (full jitter), on the same connection; a refused or closed connection:
   it connects to the next surviving host after 0.2 s.

Measured from the loss (just before the SIGKILLs): each client's ``RESUMED``
(median, 99th percentile, worst: the worst is "every session resumed"); the
*answer* time, from its last ``RESUME`` said to its ``RESUMED`` (the takeover's
own cost: 3 KV round trips, a claim and a stream read, plus queueing); how many
``ERR busy`` were said, and the streaming pairs' worst delay from the loss to
the last RESUMED (and before the loss, for reference). A size whose resumes do
not all finish within ``--deadline`` seconds is reported with what resumed by then.
Writes the rows as JSON and a PNG plot (resume times' distribution per size).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctl.hosts import Hosts, missing_for_cluster  # noqa: E402

STREAM_EVERY = 0.005


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


class Session:
    __slots__ = ("nick", "sock", "buffer", "token", "peer", "resumed_at", "retry_at", "reconnect_at", "tries",
                 "busy", "port_turn", "failed", "closed_at", "asked_at")

    def __init__(self, nick: str):
        self.nick = nick
        self.sock: socket.socket | None = None
        self.buffer = b""
        self.token = ""
        self.peer: socket.socket | None = None
        self.resumed_at = self.retry_at = self.reconnect_at = self.closed_at = self.asked_at = None
        self.tries = self.busy = 0
        self.port_turn = 0
        self.failed = ""


def read_lines(sock: socket.socket, holder) -> list[str] | None:
    """Lines now readable on ``sock`` (its partial line kept in holder.buffer); None at EOF or error."""
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return []
    except OSError:
        return None
    if not data:
        return None
    holder.buffer += data
    *whole, holder.buffer = holder.buffer.split(b"\n")
    return [line.decode(errors="replace") for line in whole]


def connect_all(port: int, lines_of, last: str, count: int, batch: int = 200) -> list[tuple[socket.socket, list[str]]]:
    """``count`` connections to ``port``, each sent lines_of(i), each read until a line beginning ``last`` came;
    at most ``batch`` waiting at once (SESSION is a KV write each)."""
    done: list[tuple[socket.socket, list[str]] | None] = [None] * count
    selector = selectors.DefaultSelector()
    started = 0
    waiting = 0

    class Holder:
        buffer = b""

    while started < count or waiting:
        while started < count and waiting < batch:
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(lines_of(started))
            sock.setblocking(False)
            holder = Holder()
            holder.lines = []
            holder.index = started
            selector.register(sock, selectors.EVENT_READ, holder)
            started += 1
            waiting += 1
        for key, _ in selector.select(60):
            holder = key.data
            lines = read_lines(key.fileobj, holder)
            if lines is None:
                raise ConnectionError(f"connection {holder.index} to {port} ended while setting up: {holder.lines}")
            holder.lines += lines
            if any(line.startswith(last) for line in holder.lines):
                selector.unregister(key.fileobj)
                key.fileobj.setblocking(True)
                done[holder.index] = (key.fileobj, holder.lines)
                waiting -= 1
    return done


def worker(number: int, count: int, home: int, others: list[int], paired: bool, jitter: float, deadline: float,
           seed: int, commands, results) -> None:
    """Hold ``count`` session clients on port ``home``; after the loss, resume each on ``others``."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    rng = random.Random(seed * 1009 + number)
    sessions = [Session(f"s{number}x{index}") for index in range(count)]
    try:
        if paired:
            peers = []
            for turn, port in enumerate(others):
                chosen = [s for index, s in enumerate(sessions) if index % len(others) == turn]
                made = connect_all(port, lambda i, c=chosen: f"NICK p{c[i].nick[1:]}\nPAIR {c[i].nick}\n".encode(),
                                   "OK PAIR", len(chosen))
                for session, (sock, _) in zip(chosen, made):
                    session.peer = sock
                    peers.append(sock)
        made = connect_all(home, lambda i: (f"NICK {sessions[i].nick}\n"
                                            + (f"PAIR p{sessions[i].nick[1:]}\n" if paired else "")
                                            + "SESSION\n").encode(),
                           "SESSION ", count)
        for session, (sock, lines) in zip(sessions, made):
            session.sock = sock
            tokens = [line.split()[1] for line in lines if line.startswith("SESSION ")]
            if not tokens:
                raise RuntimeError(f"{session.nick}: no SESSION in {lines}")
            session.token = tokens[0]
    except Exception as exc:  # noqa: BLE001: told to the parent, which stops the run
        results.put(("error", number, repr(exc)))
        return
    results.put(("ready", number, count))
    command = commands.get()
    if command[0] != "lose":
        return
    lost_at = command[1]
    selector = selectors.DefaultSelector()
    for session in sessions:
        session.sock.setblocking(False)
        selector.register(session.sock, selectors.EVENT_READ, session)
        session.port_turn = rng.randrange(len(others))
    if paired:  # peers' lines (UNPAIRED, PAIRED) are drained, not read
        class Drain:
            buffer = b""
        drain = Drain()
        for sock in peers:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, drain)
    remaining = count
    end = lost_at + deadline
    while remaining and time.monotonic() < end:
        for key, _ in selector.select(0.01):
            session = key.data
            if not isinstance(session, Session):
                lines = read_lines(key.fileobj, session)
                session.buffer = b""
                if lines is None:
                    selector.unregister(key.fileobj)
                continue
            lines = read_lines(key.fileobj, session)
            if lines is None:  # the host is gone (or the new one closed it): connect again after jitter
                selector.unregister(key.fileobj)
                key.fileobj.close()
                session.sock = None
                if session.resumed_at is None:
                    now = time.monotonic()
                    if session.closed_at is None:
                        session.closed_at = now - lost_at
                        session.reconnect_at = now + rng.uniform(0, jitter)
                    else:
                        session.reconnect_at = now + 0.2
                else:
                    session.failed = "closed after RESUMED"
                continue
            for line in lines:
                if line.startswith("RESUMED ") and session.resumed_at is None:
                    session.resumed_at = time.monotonic() - lost_at
                    remaining -= 1
                elif line.startswith("ERR busy "):
                    session.busy += 1
                    session.retry_at = time.monotonic() + rng.uniform(0, int(line.split()[2]))
                elif line.startswith("ERR ") and session.resumed_at is None:
                    if not session.failed:
                        session.failed = line
                    if "unknown-session" in line:
                        remaining -= 1
                        session.resumed_at = float("nan")
        now = time.monotonic()
        for session in sessions:
            if session.reconnect_at is not None and now >= session.reconnect_at:
                session.reconnect_at = None
                port = others[session.port_turn % len(others)]
                session.port_turn += 1
                session.tries += 1
                try:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                except OSError:
                    session.reconnect_at = now + 0.2
                    continue
                sock.sendall(f"RESUME {session.token} 0\n".encode())
                session.asked_at = time.monotonic() - lost_at
                sock.setblocking(False)
                session.sock, session.buffer = sock, b""
                selector.register(sock, selectors.EVENT_READ, session)
            elif session.retry_at is not None and now >= session.retry_at and session.sock is not None:
                session.retry_at = None
                try:
                    session.sock.sendall(f"RESUME {session.token} 0\n".encode())
                    session.asked_at = time.monotonic() - lost_at
                except OSError:
                    pass
    results.put(("done", number, [s.resumed_at for s in sessions],
                 [s.resumed_at - s.asked_at for s in sessions if s.resumed_at is not None and s.asked_at is not None], [s.closed_at for s in sessions],
                 sum(s.busy for s in sessions), sum(s.tries for s in sessions),
                 [s.failed for s in sessions if s.failed][:5], sum(1 for s in sessions if s.failed)))
    commands.get()  # "quit": held open until the parent has read the streams
    for session in sessions:
        if session.sock is not None:
            session.sock.close()
        if session.peer is not None:
            session.peer.close()


def streamer(pairs: int, port_a: int, port_b: int, commands, results) -> None:
    """``pairs`` pairs streaming across hosts: each sender writes its send time every 5 ms; every
    arrival is recorded as (sent, delay), monotonic clock (shared by the processes of one machine)."""
    arrivals: list[tuple[float, float]] = []
    socks = []
    for index in range(pairs):
        a_port, b_port = (port_a, port_b) if index % 2 == 0 else (port_b, port_a)
        a = socket.create_connection(("127.0.0.1", a_port), timeout=30)
        b = socket.create_connection(("127.0.0.1", b_port), timeout=30)
        a.sendall(f"NICK ta{index}\nPAIR tb{index}\n".encode())
        b.sendall(f"NICK tb{index}\nPAIR ta{index}\n".encode())
        for sock in (a, b):
            seen = b""
            while b"PAIRED" not in seen:
                seen += sock.recv(4096)
        socks.append((a, b))
    stop = threading.Event()

    def receive(sock):
        buffer = b""
        while not stop.is_set():
            try:
                data = sock.recv(65536)
            except OSError:
                return
            if not data:
                return
            now = time.monotonic()
            buffer += data
            *whole, buffer = buffer.split(b"\n")
            for line in whole:
                if line.startswith(b"FROM "):
                    sent = float(line.split()[3])
                    arrivals.append((sent, now - sent))

    threads = [threading.Thread(target=receive, args=(b,), daemon=True) for _, b in socks]
    for thread in threads:
        thread.start()
    results.put(("streaming",))
    sent = 0
    while commands.empty():
        for a, _ in socks:
            a.sendall(f"MSG {time.monotonic():.6f}\n".encode())
            sent += 1
        time.sleep(STREAM_EVERY)
    commands.get()
    time.sleep(0.5)  # the last ones arrive
    stop.set()
    results.put(("arrivals", sent, arrivals))
    for a, b in socks:
        a.close()
        b.close()


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far, in seconds (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes(hosts: Hosts, workers: list) -> dict[str, int]:
    """The pids whose CPU the recovery is charged: the surviving chatds and holderds, the NATS
    nodes, this bench's clients."""
    pids = {}
    for index in (1, 2):
        pids[f"h{index} chatd"] = hosts.hosts[index].chatd.pid
        pids[f"h{index} holderd"] = hosts.hosts[index].holderd.pid
    for node in hosts.nats.nodes:
        pids[f"nats {node.name}"] = node.proc.pid
    for number, (proc, _) in enumerate(workers):
        pids[f"clients {number}"] = proc.pid
    return pids


def watch(hosts: Hosts, lost_at: float, stop: threading.Event, samples: list) -> None:
    """Every 0.25 s until ``stop``: the surviving hosts' takeovers by step (chatd.keeper.Step), their
    forwards in flight and stashed messages (chatctl status), as (seconds since the loss, host, counts)."""
    while not stop.wait(0.25):
        for index in (1, 2):
            try:
                status = hosts.status(index)
            except Exception:  # noqa: BLE001: a slow answer is a missed sample
                continue
            cluster = status.get("cluster") or {}
            steps: dict[str, int] = {}
            for step in (cluster.get("takeovers") or {}).values():
                steps[step] = steps.get(step, 0) + 1
            samples.append((round(time.monotonic() - lost_at, 2), f"h{index}",
                            {"takeovers": steps, "forwards_in_flight": cluster.get("forwards_in_flight"),
                             "stashed": cluster.get("stashed"), "members_elsewhere": cluster.get("members_elsewhere")}))


def wait_for(results, kind: str, count: int, timeout: float) -> list:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        item = results.get(timeout=max(0.1, deadline - time.monotonic()))
        if item[0] == "error":
            raise RuntimeError(f"worker {item[1]}: {item[2]}")
        if item[0] == kind:
            got.append(item)
    return got


def one_size(size: int, args) -> dict:
    workdir = None
    if args.keep:  # kept for its logs (Hosts removes only a directory it made)
        workdir = os.path.join(args.keep, f"size-{size}")
        os.makedirs(workdir, exist_ok=True)
    with Hosts(3, 3, lease=args.lease, workdir=workdir) as hosts:
        hosts.start("--log-level", "WARNING", "--resume-rate", str(args.resume_rate))
        home, others = hosts.ports[0], hosts.ports[1:]
        context = multiprocessing.get_context("fork")
        results = context.Queue()
        stream_commands = context.Queue()
        workers = []
        count = -(-size // args.per_worker)
        began = time.monotonic()
        for number in range(count):
            share = size // count + (number < size % count)
            commands = context.Queue()
            proc = context.Process(target=worker, args=(number, share, home, others, args.paired, args.jitter,
                                                        args.deadline, args.seed, commands, results), daemon=True)
            proc.start()
            workers.append((proc, commands))
        try:
            wait_for(results, "ready", count, 600)
            setup = time.monotonic() - began
            print(f"{size}: {size} sessions on h0 in {setup:.1f} s", flush=True)
            stream = context.Process(target=streamer, args=(args.streams, others[0], others[1], stream_commands,
                                                            results), daemon=True)
            stream.start()
            wait_for(results, "streaming", 1, 60)
            time.sleep(2.0)  # the streams' delay before the loss, for reference
            load_at_loss = round(os.getloadavg()[0], 2)
            lost_at = time.monotonic()
            for _, commands in workers:
                commands.put(("lose", lost_at))
            pids = processes(hosts, workers)
            cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            spy = None
            if args.py_spy:  # sampled: the surviving h1's chatd, from the loss for the resumes' length
                spy = subprocess.Popen([args.py_spy, "record", "-p", str(hosts.hosts[1].chatd.pid), "-r", "50",
                                        "-f", "raw", "-o", f"{args.json or 'host_loss'}.h1-{size}.pyspy.txt",
                                        "--nonblocking", "-d", str(int(args.spy_seconds))],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            hosts.lose_host(0)
            killed = time.monotonic() - lost_at
            watching = threading.Event()
            samples: list = []
            watcher = threading.Thread(target=watch, args=(hosts, lost_at, watching, samples), daemon=True)
            watcher.start()
            done = wait_for(results, "done", count, args.deadline + 60)
            recovered = time.monotonic() - lost_at
            cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
            watching.set()
            watcher.join(10)
            if spy is not None:
                spy.wait(args.spy_seconds + 30)
            stream_commands.put("stop")
            _, sent, arrivals = wait_for(results, "arrivals", 1, 60)[0]
            for _, commands in workers:
                commands.put("quit")
            status = {f"h{i}": hosts.status(i) for i in (1, 2)} if args.verbose else {}
        finally:
            for proc, commands in workers:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
    resumed, answered, closed, busy, tries, failures, failed = [], [], [], 0, 0, [], 0
    for _, _, times, answers, closes, b, t, f, nf in done:
        resumed += [x for x in times if x is not None and x == x]
        answered += [x for x in answers if x == x]
        closed += [x for x in closes if x is not None]
        busy, tries, failures, failed = busy + b, tries + t, failures + f, failed + nf
    last = max(resumed) if resumed else args.deadline
    before = [delay for sent_at, delay in arrivals if lost_at - 2.0 <= sent_at < lost_at]
    during = [delay for sent_at, delay in arrivals if lost_at <= sent_at <= lost_at + last]
    row = {"sessions": size, "paired": args.paired, "jitter_s": args.jitter, "resume_rate": args.resume_rate,
           "workers": count, "setup_s": round(setup, 1), "kill_ms": round(killed * 1000, 1),
           "resumed": len(resumed), "not_resumed": size - len(resumed), "busy": busy, "connects": tries,
           "failed": failed, "failures": failures[:5],
           "stream_pairs": args.streams, "stream_sent": sent, "stream_received": len(arrivals)}
    if closed:
        row["saw_close_worst_ms"] = round(max(closed) * 1000, 1)
    if resumed:
        row.update({"resumed_median_ms": round(statistics.median(resumed) * 1000, 1),
                    "resumed_p99_ms": round(percentile(resumed, 0.99) * 1000, 1),
                    "resumed_worst_ms": round(last * 1000, 1),
                    "resumes_per_s": round(len(resumed) / last, 1),
                    "answer_median_ms": round(statistics.median(answered) * 1000, 1),
                    "answer_p99_ms": round(percentile(answered, 0.99) * 1000, 1),
                    "answer_worst_ms": round(max(answered) * 1000, 1)})
    if before:
        row["stream_before_worst_ms"] = round(max(before) * 1000, 1)
        row["stream_before_median_ms"] = round(statistics.median(before) * 1000, 2)
    if during:
        row["stream_during_worst_ms"] = round(max(during) * 1000, 1)
        row["stream_during_median_ms"] = round(statistics.median(during) * 1000, 2)
        row["stream_during_p99_ms"] = round(percentile(during, 0.99) * 1000, 1)
    row["loadavg_at_loss"] = load_at_loss  # others' work on this machine too (2 cores)
    row["cpu_s"] = cpu  # from the loss to the last worker's report, per process
    row["cpu_window_s"] = round(recovered, 2)
    row["cpu_total_s"] = round(sum(cpu.values()), 2)
    row["resumed_s"] = sorted(round(x, 4) for x in resumed)
    row["survivors"] = samples
    if status:
        row["status"] = status
    return row


def label(row: dict, short: bool = False) -> str:
    """A row's name in the plot: its size, and what differs from the defaults."""
    extra = [*(["paired"] if row["paired"] else []),
             *([f"gate {row['resume_rate']:g}/s"] if row["resume_rate"] != 500 else []),
             *([row["run"]] if row.get("run") else [])]
    if short:
        return "\n".join([f"{row['sessions']:,}", *extra])
    return f"{row['sessions']:,} sessions" + (f" ({', '.join(extra)})" if extra else "")


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    for row in rows:
        times = row["resumed_s"]
        if times:
            left.plot(times, [100 * (i + 1) / row["sessions"] for i in range(len(times))], label=label(row))
    left.set_xlabel("seconds since h0 was lost")
    left.set_ylabel("% of h0's sessions RESUMED on h1/h2")
    left.set_title("Host loss: sessions resumed elsewhere")
    left.grid(alpha=0.3)
    left.legend()
    labels = [label(r, short=True) for r in rows]
    xs = range(len(rows))
    right.bar([x - 0.2 for x in xs], [r.get("stream_before_worst_ms", 0) for r in rows], 0.4, label="before the loss")
    right.bar([x + 0.2 for x in xs], [r.get("stream_during_worst_ms", 0) for r in rows], 0.4,
              label="loss -> last RESUMED")
    right.set_xticks(list(xs), labels)
    right.set_xlabel("sessions on the lost host")
    right.set_ylabel("worst delay, ms")
    right.set_title("Pairs streaming h1 <-> h2: worst delay")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    parser.add_argument("--paired", action="store_true", help="each session paired with a client on h1/h2")
    parser.add_argument("--jitter", type=float, default=1.0, help="seconds: each client waits 0..this to reconnect")
    parser.add_argument("--resume-rate", type=float, default=500.0, help="chatd's --resume-rate (its default 500)")
    parser.add_argument("--lease", type=float, default=3.0, help="Hosts' --host-lease, seconds")
    parser.add_argument("--streams", type=int, default=4, help="pairs streaming across h1 and h2")
    parser.add_argument("--per-worker", type=int, default=2500, help="session clients a worker process holds")
    parser.add_argument("--deadline", type=float, default=180.0, help="seconds after the loss to give up waiting")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="run the hosts in DIR/size-N and keep it (their logs)")
    parser.add_argument("--py-spy", metavar="BINARY", help="py-spy: sample h1's chatd after the loss (raw stacks)")
    parser.add_argument("--spy-seconds", type=float, default=25.0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH")
    args = parser.parse_args()
    missing = missing_for_cluster()
    if missing:
        print(f"bench/host_loss.py: needs {missing}", file=sys.stderr)
        return 2
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        rows.append(one_size(size, args))
        print({k: v for k, v in rows[-1].items() if k not in ("resumed_s", "survivors")}, flush=True)
        if args.json:
            with open(args.json, "w") as out:
                # One run a line: each holds every session's time (the plot's), thousands of numbers.
                out.write("[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n")
    columns = ("sessions", "resumed", "busy", "resumed_median_ms", "resumed_p99_ms", "resumed_worst_ms",
               "resumes_per_s", "answer_median_ms", "answer_p99_ms", "stream_before_worst_ms", "stream_during_worst_ms")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "—")) for c in columns) + " |")
    if args.plot:
        try:
            plot(rows, args.plot)
        except ImportError:
            print("no matplotlib here: no plot (bench/host_loss.py --replot JSON PNG with one that has it)")
    return 0 if all(row["not_resumed"] == 0 for row in rows) else 1


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--replot":
        with open(sys.argv[2]) as f:
            plot(json.load(f), sys.argv[3])
        sys.exit(0)
    sys.exit(main())
