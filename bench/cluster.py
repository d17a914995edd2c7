"""Across hosts against one host, through HAProxy against direct: relay rate and latency of chatd hosts.

    .venv/bin/python bench/cluster.py [--pairs 10] [--seconds 5] [--size 100] [--rounds 3]
                                      [--samples 300] [--json PATH] [--plot PATH] [--open] [--no-haproxy]

Starts two chatd hosts (each its own holderd and journal) over a 3-node NATS
JetStream cluster on loopback (ctl.hosts.Hosts, R3; secured, TLS and a key per
host, unless ``--open``), then measures, in the
same run and alternating rounds so that a noisy neighbour hurts both alike:

- *rate*: ``--pairs`` pairs, each side keeping ``--window`` messages of
  ``--size`` bytes on their way (bench/rates.py's Load); the FROM lines
  received in ``--seconds`` after a second of warm-up. *same host, durable*:
  both clients of every pair on h0, their messages stored in the stream before
  they are told (what chatd does in a cluster); *same host, direct*: both on
  h2, started with ``--direct-same-host`` (told at once, as on one host: lost
  with the host); *across hosts*: one on h0, one on h1;
- *latency*: one pair, one message at a time, ``--samples`` times: from the
  MSG written to its FROM line read (median and 99th percentile).

*Through HAProxy* (unless ``--no-haproxy``): each of the three placements again,
every client connecting to a real HAProxy (Debian's, ctl.haproxy, the
configuration the README shows: ``mode tcp``) instead of to its host. To keep
the placement the same, each host has an HAProxy of its own with that host as
its only server (so the pair lands where the direct one does, and the ratio is
HAProxy's hop alone, not leastconn's choice of hosts).

It prints each figure, its ratio to *same host, direct*, and each placement's
ratio through HAProxy to direct, and writes them as JSON and a PNG plot. Needs
nats-server and nats-py (``pip install -e '.[cluster]'``), and haproxy for its rows. On these 2-core machines the three
NATS nodes and two chatds share the cores with the load: compare ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from ctl.haproxy import HAProxy, missing_haproxy  # noqa: E402
from ctl.hosts import Hosts, missing_for_cluster  # noqa: E402
from ctl.launch import wait_until  # noqa: E402
from helpers import free_port  # noqa: E402
from rates import Load  # noqa: E402


class Pair:
    """One pair of blocking line clients for timing single messages."""

    def __init__(self, port_a: int, port_b: int, tag: str):
        self.a = socket.create_connection(("127.0.0.1", port_a), timeout=10)
        self.b = socket.create_connection(("127.0.0.1", port_b), timeout=10)
        self.a.sendall(f"NICK la{tag}\nPAIR lb{tag}\n".encode())
        self.b.sendall(f"NICK lb{tag}\nPAIR la{tag}\n".encode())
        self.buffer = b""
        for sock in (self.a, self.b):
            seen = b""
            while b"PAIRED" not in seen:
                seen += sock.recv(4096)

    def one(self) -> float:
        """Seconds from a message written by a to its line read by b."""
        began = time.perf_counter()
        self.a.sendall(b"MSG ping\n")
        while b"\n" not in self.buffer:
            self.buffer += self.b.recv(4096)
        _, _, self.buffer = self.buffer.partition(b"\n")
        return time.perf_counter() - began

    def close(self) -> None:
        self.a.close()
        self.b.close()


def rate(port_a: int, port_b: int, args) -> float:
    load = Load(port_a, args.pairs, args.size, args.window, port_b=port_b)
    try:
        load.run(1.0)  # warm-up
        return load.run(args.seconds) / args.seconds
    finally:
        load.close()


def latencies(pair: Pair, samples: int) -> list[float]:
    for _ in range(20):
        pair.one()  # warm-up
    return sorted(pair.one() for _ in range(samples))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--window", type=int, default=64, help="messages each sender keeps on their way")
    parser.add_argument("--size", type=int, default=100, help="bytes of text a message")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--plot", metavar="PATH", help="also plot the figures as a PNG")
    parser.add_argument("--no-haproxy", action="store_true", help="no rows through HAProxy")
    parser.add_argument("--open", action="store_true",
                        help="an open NATS cluster (no TLS, no keys) instead of the secured default: what security costs")
    args = parser.parse_args()
    missing = missing_for_cluster()
    if missing:
        print(f"bench/cluster.py: needs {missing}", file=sys.stderr)
        return 2
    haproxy = not args.no_haproxy
    if haproxy and missing_haproxy():
        print(f"bench/cluster.py: {missing_haproxy()}; run with --no-haproxy", file=sys.stderr)
        return 2
    names = ("same host, direct", "same host, durable", "across hosts")
    if haproxy:
        names += tuple(f"{name}, via HAProxy" for name in names)
    figures = {name: {"rate": [], "latency": []} for name in names}
    proxies = []
    with Hosts(3, 3, lease=30.0, secure=not args.open) as hosts:
        try:
            hosts.start("--log-level", "WARNING")
            hosts.hosts[2].chatd.terminate()  # h2 again, telling same-host messages at once
            hosts.hosts[2].chatd.wait(20)
            hosts.restart_chatd(2, "--log-level", "WARNING", "--direct-same-host", wait=True)
            h0, h1, h2 = hosts.ports
            placements = {"same host, direct": (h2, h2), "same host, durable": (h0, h0), "across hosts": (h0, h1)}
            if haproxy:  # each right after its direct counterpart: a round's pair of them sees the same load
                p0, p1, p2 = (proxy_for(hosts, index, proxies) for index in range(3))
                proxied = {"same host, direct": (p2, p2), "same host, durable": (p0, p0), "across hosts": (p0, p1)}
                placements = {name: ports for direct_name, direct_ports in placements.items()
                              for name, ports in ((direct_name, direct_ports),
                                                  (f"{direct_name}, via HAProxy", proxied[direct_name]))}
            pairs = {name: Pair(a, b, str(index)) for index, (name, (a, b)) in enumerate(placements.items())}
            for round_number in range(args.rounds):
                for name, (a, b) in placements.items():
                    figures[name]["rate"].append(rate(a, b, args))
                    figures[name]["latency"] += latencies(pairs[name], args.samples // args.rounds)
                    figures[name].setdefault("round_latency", []).append(
                        statistics.median(figures[name]["latency"][-(args.samples // args.rounds):]))
                    print(f"round {round_number + 1}: {name}: {figures[name]['rate'][-1]:,.0f} msg/s", flush=True)
            for pair in pairs.values():
                pair.close()
        finally:
            for proxy in proxies:
                proxy.close()
    summary = {}
    for name, values in figures.items():
        lat = sorted(values["latency"])
        summary[name] = {"rate": statistics.median(values["rate"]),
                         "latency_ms_median": statistics.median(lat) * 1000,
                         "latency_ms_p99": lat[int(len(lat) * 0.99) - 1] * 1000}
    direct = summary["same host, direct"]
    print(f"\n{'':32}{'relay msg/s':>14}{'latency median':>16}{'p99':>10}")
    for name, row in summary.items():
        print(f"{name:32}{row['rate']:>14,.0f}{row['latency_ms_median']:>13.2f} ms{row['latency_ms_p99']:>7.2f} ms")
    ratios = {}
    for name in names[1:]:
        row = summary[name]
        ratios[name] = {"rate": row["rate"] / direct["rate"],
                        "latency_median": row["latency_ms_median"] / direct["latency_ms_median"],
                        "latency_p99": row["latency_ms_p99"] / direct["latency_ms_p99"]}
        print(f"{name} / same host, direct: rate {ratios[name]['rate']:.2f}x, latency median "
              f"{ratios[name]['latency_median']:.1f}x, p99 {ratios[name]['latency_p99']:.1f}x")
    via_haproxy = {}
    for name in names[:3] if haproxy else ():
        row, direct_row = summary[f"{name}, via HAProxy"], summary[name]
        proxied_figures, direct_figures = figures[f"{name}, via HAProxy"], figures[name]
        via_haproxy[name] = {"rate": row["rate"] / direct_row["rate"],
                             "latency_median": row["latency_ms_median"] / direct_row["latency_ms_median"],
                             "latency_p99": row["latency_ms_p99"] / direct_row["latency_ms_p99"],
                             # each round's proxied figure over the direct one measured just before it
                             # (the same neighbours' load), then their median: steadier on a busy machine
                             "rate_by_round": statistics.median(
                                 p / d for p, d in zip(proxied_figures["rate"], direct_figures["rate"])),
                             "latency_median_by_round": statistics.median(
                                 p / d for p, d in zip(proxied_figures["round_latency"],
                                                       direct_figures["round_latency"]))}
        print(f"{name}: via HAProxy / direct: rate {via_haproxy[name]['rate']:.2f}x (by round "
              f"{via_haproxy[name]['rate_by_round']:.2f}x), latency median {via_haproxy[name]['latency_median']:.2f}x "
              f"(by round {via_haproxy[name]['latency_median_by_round']:.2f}x), p99 {via_haproxy[name]['latency_p99']:.2f}x")
    print(f"({args.pairs} pairs, {args.size}-byte messages)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "ratios": ratios, "via_haproxy": via_haproxy, "args": vars(args),
                       "loadavg": [round(x, 2) for x in os.getloadavg()],
                       "rounds": {name: values["rate"] for name, values in figures.items()}}, f, indent=2)
    if args.plot:
        plot(summary, args.plot, args)
    return 0


def proxy_for(hosts: Hosts, index: int, proxies: list) -> int:
    """An HAProxy (the README's configuration) with host ``index`` as its only server; its line port."""
    host = hosts.hosts[index]
    ports = [free_port()]
    while len(ports) < 2:
        port = free_port()
        if port not in ports and all(port not in (p.line_port, p.web_port) for p in proxies):
            ports.append(port)
    proxy = HAProxy(os.path.join(hosts.workdir, f"haproxy-h{index}"), [(host.port, host.http_port)], *ports,
                    inter_ms=500).start()
    proxies.append(proxy)
    wait_until(lambda: set(proxy.states().values()) == {"UP"}, 30, f"HAProxy to see h{index} UP")
    return proxy.line_port


def plot(summary: dict, path: str, args) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib here: no plot (write --json, plot it with one that has it: bench/cluster.py "
              "--replot JSON PNG)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    placements = [name for name in summary if "via HAProxy" not in name]
    proxied = any("via HAProxy" in name for name in summary)
    xs = range(len(placements))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.4 if proxied else 0.8
    for offset, suffix, label in ((-width / 2 if proxied else 0, "", "direct to the host"),
                                  (width / 2, ", via HAProxy", "via HAProxy")):
        if suffix and not proxied:
            continue
        rows = [summary[name + suffix] for name in placements]
        left.bar([x + offset for x in xs], [r["rate"] for r in rows], width, label=label)
        right.bar([x + offset for x in xs], [r["latency_ms_median"] for r in rows], width, label=f"{label}, median")
        right.scatter([x + offset for x in xs], [r["latency_ms_p99"] for r in rows], marker="_", s=400, color="k")
    for axis in (left, right):
        axis.set_xticks(list(xs), placements)
        axis.legend(loc="upper center")
    left.set_ylabel("relay rate, messages/s")
    left.set_title(f"Relay rate ({args.pairs} pairs, {args.size}-byte messages)")
    right.set_yscale("log")
    right.set_ylabel("one message's latency, ms, log scale (bar median, dash p99)")
    right.set_title("Latency, one message at a time")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--replot":
        with open(sys.argv[2]) as f:
            saved = json.load(f)
        plot(saved["summary"], sys.argv[3], argparse.Namespace(**saved["args"]))
        sys.exit(0)
    sys.exit(main())
