"""Fuzz a live holderd and chatd for a while; then check they still serve and hold what they held.

    .venv/bin/python bench/fuzz.py [--seconds 60] [--seed N] [--slack 2]
    .venv/bin/python bench/fuzz.py --bus [--seconds 300] [--seed N] [--hosts 3] [--pairs 10]

``--bus``: the bus instead (testkit/busfuzz.py): ``--hosts`` chatd hosts over a
3-node NATS cluster (ctl.hosts), honest pairs streaming across hosts while
forged and garbled forwards, directory entries and host leases are published
into NATS; halfway one chatd is killed and restarted. Checks that the honest
pairs' messages all arrived exactly once, every daemon is up and connected,
no honest member's entry stays unreadable, refusals are logged once per kind;
prints what the decoy pair was made to believe (no auth on the bus yet).

Starts holderd and chatd (ctl.launch, in a scratch directory, no root needed),
stores one fd of every kind in holderd, pairs two honest line clients, then
plays random and mutated sessions (testkit/fuzz.py) against holderd's socket,
chatd's line and web ports and its control socket for ``--seconds``. Prints
what was sent and what each got, by case; then checks:

- both daemons alive, holderd answers PING and a STORE/RETRIEVE round trip;
- holderd still holds every fd it held before (names, inodes, kinds, meta);
- the honest pair still chats, ``n`` counting on, and two new clients can;
- each daemon's open fd count is back within ``--slack`` of what it was.

Exits 1 if anything is wrong (and prints the daemons' logs). The same seed
plays the same sessions (how many fit in the time varies): pass the printed
``--seed`` to replay a run.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testkit.fuzz import Baseline, Fuzzer, HonestPair, Targets, settled, store_one_of_each, survey  # noqa: E402
from ctl.launch import Launcher  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    parser.add_argument("--seed", type=int, help="the random seed (default: a new one, printed)")
    parser.add_argument("--slack", type=int, default=2, help="fds a daemon may have opened for good (default 2)")
    parser.add_argument("--bus", action="store_true", help="fuzz the bus of a cluster instead (see above)")
    parser.add_argument("--hosts", type=int, default=3, help="with --bus: chatd hosts, 2 or more (default 3)")
    parser.add_argument("--pairs", type=int, default=10, help="with --bus: honest pairs (default 10)")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 32)
    if args.bus:
        return fuzz_bus(args, seed)
    print(f"seed {seed} (replay: bench/fuzz.py --seed {seed} --seconds {args.seconds:g})", flush=True)
    with Launcher() as procs:
        procs.start_holderd()
        procs.start_chatd()
        kept = store_one_of_each(procs.holder_socket)
        honest = HonestPair(procs.port)
        problems = honest.exchange()
        targets = Targets(procs.holder_socket, procs.control_socket, procs.port, procs.http_port)
        targets.protected = frozenset(Baseline.take(procs.holder_socket, {}).items)
        warm = Fuzzer(targets, seed + 1)  # every path once before counting fds: lazily opened files
        warm.run(sessions=30)
        warm.clean_up()
        warm.close()
        baseline = Baseline.take(procs.holder_socket, {"holderd": procs.holderd.pid, "chatd": procs.chatd.pid})
        fuzzer = Fuzzer(targets, seed)
        try:
            tally = fuzzer.run(seconds=args.seconds)
            removed = fuzzer.clean_up()
        finally:
            fuzzer.close()
        print(tally.table())
        problems += tally.anomalies
        problems += survey(procs.holder_socket, baseline, keep=["base/"])
        problems += honest.exchange()
        problems += settled(baseline, args.slack)
        honest.close()
        counts = ", ".join(f"{name} {baseline.fds[name]} -> {len(os.listdir(f'/proc/{pid}/fd'))}"
                           for name, pid in baseline.pids.items() if os.path.exists(f"/proc/{pid}"))
        print(f"after: {removed} names the fuzzer left removed; open fds {counts}; "
              f"holderd's {len([n for n in baseline.items if n.startswith('base/')])} base/ items "
              f"{'unchanged' if not any('base/' in p for p in problems) else 'CHANGED'}; "
              f"honest pair at n={honest.sent[0]}/{honest.sent[1]}")
        del kept
        if problems:
            print("PROBLEMS:\n  " + "\n  ".join(problems))
            print(procs.logs()[-20000:])
            return 1
        print("OK: both daemons alive, serving, holding what they held, fds back to baseline")
        return 0


def fuzz_bus(args, seed: int) -> int:
    from ctl.hosts import Hosts, missing_for_cluster
    from testkit.busfuzz import run_against

    missing = missing_for_cluster()
    if missing:
        print(f"--bus needs {missing}")
        return 2
    print(f"seed {seed} (replay: bench/fuzz.py --bus --seed {seed} --seconds {args.seconds:g})", flush=True)
    with Hosts(max(args.hosts, 2), 3, lease=20.0, secure=False) as cluster:  # open: see test_fuzz
        cluster.start()
        run = run_against(cluster, seconds=args.seconds, seed=seed, pairs=args.pairs)
        print(run.report())
        if run.problems:
            print(cluster.logs()[-20000:])
            return 1
        print("OK: every daemon up and connected, the honest pairs exactly once, refusals said once per kind")
        return 0


if __name__ == "__main__":
    sys.exit(main())
