"""Across hosts against one host: relay rate and latency of chatd hosts paired through NATS JetStream.

    .venv/bin/python bench/cluster.py [--pairs 10] [--seconds 5] [--size 100] [--rounds 3]
                                      [--samples 300] [--json PATH] [--open]

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

It prints each figure and its ratio to *same host, direct*. Needs nats-server and
nats-py (``pip install -e '.[cluster]'``). On these 2-core machines the three
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

from ctl.hosts import Hosts, missing_for_cluster  # noqa: E402
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
    parser.add_argument("--open", action="store_true",
                        help="an open NATS cluster (no TLS, no keys) instead of the secured default: what security costs")
    args = parser.parse_args()
    missing = missing_for_cluster()
    if missing:
        print(f"bench/cluster.py: needs {missing}", file=sys.stderr)
        return 2
    names = ("same host, direct", "same host, durable", "across hosts")
    figures = {name: {"rate": [], "latency": []} for name in names}
    with Hosts(3, 3, lease=30.0, secure=not args.open) as hosts:
        hosts.start("--log-level", "WARNING")
        hosts.hosts[2].chatd.terminate()  # h2 again, telling same-host messages at once
        hosts.hosts[2].chatd.wait(20)
        hosts.restart_chatd(2, "--log-level", "WARNING", "--direct-same-host", wait=True)
        h0, h1, h2 = hosts.ports
        placements = {"same host, direct": (h2, h2), "same host, durable": (h0, h0), "across hosts": (h0, h1)}
        pairs = {name: Pair(a, b, str(index)) for index, (name, (a, b)) in enumerate(placements.items())}
        for round_number in range(args.rounds):
            for name, (a, b) in placements.items():
                figures[name]["rate"].append(rate(a, b, args))
                figures[name]["latency"] += latencies(pairs[name], args.samples // args.rounds)
                print(f"round {round_number + 1}: {name}: {figures[name]['rate'][-1]:,.0f} msg/s", flush=True)
        for pair in pairs.values():
            pair.close()
    summary = {}
    for name, values in figures.items():
        lat = sorted(values["latency"])
        summary[name] = {"rate": statistics.median(values["rate"]),
                         "latency_ms_median": statistics.median(lat) * 1000,
                         "latency_ms_p99": lat[int(len(lat) * 0.99) - 1] * 1000}
    direct = summary["same host, direct"]
    print(f"\n{'':20}{'relay msg/s':>14}{'latency median':>16}{'p99':>10}")
    for name, row in summary.items():
        print(f"{name:20}{row['rate']:>14,.0f}{row['latency_ms_median']:>13.2f} ms{row['latency_ms_p99']:>7.2f} ms")
    ratios = {}
    for name in names[1:]:
        row = summary[name]
        ratios[name] = {"rate": row["rate"] / direct["rate"],
                        "latency_median": row["latency_ms_median"] / direct["latency_ms_median"],
                        "latency_p99": row["latency_ms_p99"] / direct["latency_ms_p99"]}
        print(f"{name} / same host, direct: rate {ratios[name]['rate']:.2f}x, latency median "
              f"{ratios[name]['latency_median']:.1f}x, p99 {ratios[name]['latency_p99']:.1f}x")
    print(f"({args.pairs} pairs, {args.size}-byte messages)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "ratios": ratios, "args": vars(args)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
