"""A chatd host cut off from NATS for minutes under load, then healed: what it costs, exactly once.

    .venv/bin/python bench/partition.py [--minutes 5] [--lease 5] [--pairs 12] [--runs 1] [--json PATH]

As root. The CI test (tests/process/test_partition.py) holds the partition for a minute; this
holds it ``--minutes``, ``--runs`` times, each on a fresh cluster: three chatd hosts over a
3-node JetStream cluster, the third in a network namespace of its own, cut off from every NATS
node by an nftables rule (testkit.partition). Per run it prints the tally (every message each
client sent arrived once, or was excused: see testkit.partition), when the host fenced itself
after the cut, and after the heal when its lease was stored again and when the last of what it
held (handled, not yet published) arrived. Exits 1 if any run lost, repeated or garbled anything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ctl.hosts import Hosts, missing_for_cluster  # noqa: E402
from testkit.partition import Netns, cut_and_heal, missing_for_partitions  # noqa: E402

CUT = 2


def one_run(minutes: float, lease: float, pairs: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-partition-") as workdir:
        netns = Netns()
        cluster = None
        try:
            netns.create()
            cluster = Hosts(3, 3, lease=lease, workdir=workdir, nats_host=netns.outer,
                            placement={CUT: (netns.inner, netns.prefix)})
            cluster.start()
            outcome = cut_and_heal(netns, cluster, CUT, minutes * 60, pairs=pairs, settle=180)
            print(outcome.lines(minutes * 60, lease), flush=True)
            up = all(host.chatd.poll() is None and host.holderd.poll() is None for host in cluster.hosts)
            return {"minutes": minutes, "lease": lease, "pairs": pairs, "fenced_after": outcome.fenced_after,
                    "renewed_after": round(outcome.renewed_after, 2), "held_after": round(outcome.held_after, 2),
                    "moved_expected": outcome.moved_expected, "daemons_up": up, **outcome.tally.row(),
                    "problems": outcome.tally.problems(), "notes": outcome.tally.notes}
        finally:
            if cluster is not None:
                cluster.close()
            netns.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--lease", type=float, default=5.0)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--json", help="write the runs' results here")
    args = parser.parse_args()
    missing = missing_for_cluster() or missing_for_partitions()
    if missing:
        print(f"bench/partition.py needs {missing}", file=sys.stderr)
        return 2
    results = [one_run(args.minutes, args.lease, args.pairs) for _ in range(args.runs)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = [r for r in results if r["problems"] or not r["daemons_up"] or r["moved"] != r["moved_expected"]]
    print(f"{len(results)} runs, {len(bad)} with a problem")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
