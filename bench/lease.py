"""Lease passing: how soon the waiter holds holderd's lease after its holder is SIGKILLed.

    .venv/bin/python bench/lease.py [--rounds 20] [--json PATH]

Starts holderd in a scratch directory (ctl.launch). Each round, a holder
process asks for a lease and this process waits in line; the holder is killed
with SIGKILL and the time until the grant arrives here is taken. Two kinds of
holder take turns:

- ``plain``: the holder alone. Its death ends its connection: holderd hears
  the hang-up (usually first) or its pidfd;
- ``forked``: the holder forked a child that keeps a copy of the lease's
  connection, alive after the kill: only the pidfd says the holder is gone
  (before holderd watched pidfds, the lease waited for the child to exit).

For each, the table gives the median and the worst of: kill -> grant read by
the waiter (ms), and holderd's own share, from its loop noticing the event to
the grant sent (us, from its log line), and what holderd heard first.
Bounded: ``--rounds`` rounds of each kind, 10 s at most for each grant.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ctl.launch import Launcher, wait_until  # noqa: E402
from holderd.client import Lease  # noqa: E402

HOLDER = """
import os, sys
from holderd.client import Lease
lease = Lease(sys.argv[1])
assert lease.request(), "the holder was not granted the lease"
child = os.fork() if sys.argv[2] == "forked" else 1
if child == 0:
    sys.stdin.read()  # the connection lives on in this child until stdin closes
    os._exit(0)
print("holding", flush=True)
sys.stdin.read()
"""

PASSED = re.compile(r"lease (\S+) passes to .* is gone: (.*) first; granted (\d+) us after holderd noticed")


def one_round(launcher: Launcher, name: str, kind: str) -> float:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, name, kind], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=launcher.env, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        waiter = Lease(name, launcher.holder_socket)
        assert waiter.request() is False
        killed_at = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        deadline = killed_at + 10
        while (left := deadline - time.monotonic()) > 0:
            select.select([waiter.fileno()], [], [], left)
            answer = waiter.poll()
            if answer is not None:
                break
        took = time.monotonic() - killed_at
        assert answer == "granted", f"no grant within 10 s ({answer})"
        waiter.close()
        return took * 1000
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()  # a forked child reads EOF and exits
        holder.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each kind (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    args = parser.parse_args()
    taken: dict[str, list[float]] = {"plain": [], "forked": []}
    with Launcher() as launcher:
        launcher.start_holderd()
        log_path = launcher.log_path(launcher.holderd)
        for number in range(args.rounds):
            for kind in taken:
                name = f"{kind}-{number}"
                taken[kind].append(one_round(launcher, name, kind))
                wait_until(lambda: f"lease {name} passes" in open(log_path).read(), 5, "holderd's log line")
        passed = {match[0]: match for match in PASSED.findall(open(log_path).read())}
    results = {}
    print(f"{'holder':8} {'kill->grant ms':>22} {'holderd noticed->sent us':>26}  heard first")
    for kind, times in taken.items():
        mine = [passed[f"{kind}-{number}"] for number in range(args.rounds)]
        inside = [int(match[2]) for match in mine]
        first = {seen: sum(1 for match in mine if match[1] == seen) for seen in sorted({m[1] for m in mine})}
        results[kind] = {"kill_to_grant_ms": times, "noticed_to_sent_us": inside, "first": first}
        print(f"{kind:8} {statistics.median(times):10.2f} (max {max(times):7.2f}) "
              f"{statistics.median(inside):12.0f} (max {max(inside):7d})  "
              + ", ".join(f"{seen}: {count}" for seen, count in first.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
