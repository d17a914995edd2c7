"""A NATS node's death under chat: how long pairs across hosts hear nothing, and where the time goes.

    .venv/bin/python bench/nats_stall.py [--kills 5] [--pairs 6] [--every 0.02] [--json PATH]
                                         [--chatd-kill] [--nats-server PATH]

Three chatd hosts over a 3-node JetStream cluster on loopback (ctl.hosts.Hosts,
R3). ``--pairs`` pairs, each across two hosts, each side sending one message
every ``--every`` seconds, the send time in its text. Then ``--kills`` times:
the node leading the stream is SIGKILLed; the bench watches the surviving
nodes' monitors for the stream's new leader and each receiver for its first
message *sent after the kill*; then the node is started again and the cluster
let settle. With ``--chatd-kill`` one chatd is also SIGKILLed and restarted
right after the node (a host restarted while the stream has no leader).

Per kill it prints: the elections (kill -> a new leader seen for the stream,
and for every group chatd uses: the buckets' streams and JetStream's meta
group, which places the consumers a restarted chatd makes), each receiver's stall
(kill -> its first message sent after the kill), and what is ours: the stall
past the last election. Then medians and worsts over the kills.
The election is nats-server's (raft); what follows it is chatd's and nats-py's
(reconnects, publish retries, the ordered consumer remade).
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctl.hosts import Hosts, missing_for_cluster  # noqa: E402

STREAM = "CHATD"
#: Every stream chatd uses: the messages', and the buckets' (nicks, host leases).
STREAMS = (STREAM, "KV_chatd_nicks", "KV_chatd_hosts")
#: The JetStream meta group, which places consumers: chatd makes ordered consumers after a restart.
META = "meta"


class Chatter:
    """Pairs across hosts, each side sending its clock every ``every`` seconds; arrivals kept."""

    def __init__(self, ports: list[int], pairs: int, every: float):
        self.every = every
        self.sockets: dict[str, socket.socket] = {}
        #: Receiver nick -> [(arrived, sent)], monotonic seconds.
        self.arrivals: dict[str, list[tuple[float, float]]] = {}
        for index in range(pairs):
            a, b = f"a{index}", f"b{index}"
            for nick, partner, port in ((a, b, ports[index % 3]), (b, a, ports[(index + 1) % 3])):
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(f"NICK {nick}\nPAIR {partner}\n".encode())
                self.sockets[nick] = sock
                self.arrivals[nick] = []
        for nick, sock in self.sockets.items():
            seen = b""
            deadline = time.monotonic() + 30
            while b"PAIRED" not in seen:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{nick} did not pair within 30 s: {seen!r}")
                seen += sock.recv(4096)
            sock.setblocking(False)
        self._stop = threading.Event()
        self._buffers = {nick: b"" for nick in self.sockets}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for nick, sock in self.sockets.items():
            selector.register(sock, selectors.EVENT_READ, nick)
        next_send = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_send:
                for sock in self.sockets.values():
                    try:
                        sock.send(f"MSG {now:.6f}\n".encode())
                    except (BlockingIOError, OSError):
                        pass  # a full send buffer: this one is skipped, the clock goes on
                next_send = now + self.every
            for key, _ in selector.select(max(0.0, next_send - time.monotonic())):
                self._read(key.data, key.fileobj)
        selector.close()

    def _read(self, nick: str, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, OSError):
            return
        arrived = time.monotonic()
        buffer = self._buffers[nick] + data
        *lines, self._buffers[nick] = buffer.split(b"\n")
        with self._lock:
            for line in lines:
                words = line.split()
                if len(words) >= 4 and words[0] == b"FROM":
                    self.arrivals[nick].append((arrived, float(words[3])))

    def first_sent_after(self, moment: float) -> dict[str, float | None]:
        """Each receiver: seconds from ``moment`` to its first arrival of a message sent after it."""
        with self._lock:
            return {nick: next((arrived - moment for arrived, sent in got if sent > moment), None)
                    for nick, got in self.arrivals.items()}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.sockets.values():
            sock.close()


def watch_leaders(hosts: Hosts, dead: int, since: float, limit: float) -> dict[str, float | None]:
    """Each stream (the messages', and the two buckets') and the meta group: seconds from ``since``
    until a surviving node names a leader for it other than ``dead``."""
    elected: dict[str, float | None] = {stream: None for stream in (*STREAMS, META)}
    while time.monotonic() - since < limit and None in elected.values():
        for stream in STREAMS:
            if elected[stream] is None:
                leader = hosts.nats.stream_leader(stream)
                if leader is not None and leader != dead:
                    elected[stream] = time.monotonic() - since
        if elected[META] is None:
            leader = hosts.nats.meta_leader()
            if leader is not None and leader != hosts.nats.nodes[dead].name:
                elected[META] = time.monotonic() - since
        time.sleep(0.05)
    return elected


def one_kill(hosts: Hosts, chatter: Chatter, chatd_kill: bool, limit: float = 60.0) -> dict:
    leader = hosts.nats.stream_leader(STREAM)
    killed_at = time.monotonic()
    hosts.nats.kill(leader)
    if chatd_kill:
        chatd = hosts.hosts[1].chatd
        chatd.send_signal(signal.SIGKILL)
        chatd.wait(20)
        hosts.restart_chatd(1)
    elected = watch_leaders(hosts, leader, killed_at, limit)
    election = elected[STREAM]
    all_elected = None if None in elected.values() else max(elected.values())
    deadline = killed_at + limit
    while time.monotonic() < deadline:
        stalls = chatter.first_sent_after(killed_at)
        if all(value is not None for value in stalls.values()):
            break
        time.sleep(0.1)
    stalls = chatter.first_sent_after(killed_at)
    hosts.nats.restart(leader, wait=True)
    time.sleep(3)  # the restarted node catches up; the next kill finds a settled cluster
    known = [value for value in stalls.values() if value is not None]
    return {"node": leader, "election_s": election, "all_elections_s": all_elected, "elections_s": elected,
            "stalls_s": stalls,
            "stall_median_s": statistics.median(known) if known else None,
            "stall_worst_s": max(known) if len(known) == len(stalls) else None,
            "receivers_silent": len(stalls) - len(known)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--every", type=float, default=0.02, help="seconds between one side's messages")
    parser.add_argument("--chatd-kill", action="store_true", help="also SIGKILL and restart h1's chatd at each kill")
    parser.add_argument("--nats-server", metavar="PATH", help="the nats-server binary (default: Debian's)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    missing = missing_for_cluster()
    if missing:
        print(f"bench/nats_stall.py: needs {missing}", file=sys.stderr)
        return 2
    kills = []
    with Hosts(3, 3, lease=30.0) as hosts:
        if args.nats_server:
            hosts.nats.binary = args.nats_server
        hosts.start("--log-level", "WARNING")
        chatter = Chatter(hosts.ports, args.pairs, args.every)
        try:
            time.sleep(2)
            for number in range(args.kills):
                row = one_kill(hosts, chatter, args.chatd_kill)
                kills.append(row)
                elections = row["all_elections_s"]
                ours = (row["stall_worst_s"] - elections) if elections is not None and row["stall_worst_s"] else None
                row["past_elections_s"] = ours
                print(f"kill {number + 1} (n{row['node']}): the stream's election {fmt(row['election_s'])}, every "
                      f"stream's {fmt(elections)}; stall median {fmt(row['stall_median_s'])}, worst "
                      f"{fmt(row['stall_worst_s'])}, past the elections {fmt(ours)}, silent receivers "
                      f"{row['receivers_silent']}", flush=True)
        finally:
            chatter.close()
    summary = {}
    for key in ("election_s", "all_elections_s", "stall_median_s", "stall_worst_s", "past_elections_s"):
        values = [row[key] for row in kills if row[key] is not None]
        summary[key] = {"median": statistics.median(values) if values else None,
                        "worst": max(values) if values else None}
    print(f"\nover {len(kills)} kills: every stream's election median {fmt(summary['all_elections_s']['median'])}"
          f" worst {fmt(summary['all_elections_s']['worst'])}; a receiver's stall median "
          f"{fmt(summary['stall_median_s']['median'])}, worst {fmt(summary['stall_worst_s']['worst'])}; past the "
          f"elections median {fmt(summary['past_elections_s']['median'])}, worst "
          f"{fmt(summary['past_elections_s']['worst'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kills": kills, "summary": summary, "args": vars(args)}, f, indent=2)
    return 0


def fmt(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
