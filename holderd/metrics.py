"""holderd's metrics, for Prometheus: what it holds, for whom, and its leases.

Theory of operation
-------------------
Nothing here counts: :func:`families` reads the core (:class:`~holderd.protocol.HolderCore`:
the names held per uid, the leases) and the daemon (its connections per uid, its
bounds) on holderd's loop, and :mod:`fdkeep.metrics` hands the result to
prometheus-client's scrape thread whole. The process collector adds holderd's own
open fds (``process_open_fds``) against its limit (``process_max_fds``).

=====================================  ==========================================================
``holderd_held_names{uid}``            names held for each uid
``holderd_held_fds{uid,kind}``         the fds behind them, by kind (socket, memfd, file, ...)
``holderd_connections{uid}``           connections open to holderd, per uid
``holderd_lease_held{uid,lease}``      1 while someone holds the lease
``holderd_lease_waiting{uid,lease}``   how many wait for it (a standby chatd: 1)
``holderd_lease_passes_total``         how often the lease passed from a holder gone to a waiter
                                       (each a takeover), since holderd started
``holderd_max_fds_per_uid``            the bound on fds held per uid (--max-fds-per-uid)
=====================================  ==========================================================
"""

from __future__ import annotations

from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from fdkeep.loop import Loop
from fdkeep.metrics import MetricsEndpoint


class Observed(Protocol):
    """What the metrics read of the daemon (holderd.daemon.Holderd), at a scrape's snapshot:
    its protocol core (names held, leases), its peers by uid, its limits, and its loop."""

    core: object
    by_uid: dict
    limits: object
    loop: Loop


def families(daemon: Observed) -> list:
    names: dict[str, int] = {}
    fds: dict[tuple[str, str], int] = {}
    for uid, held in daemon.core.held_items():
        names[str(uid)] = names.get(str(uid), 0) + 1
        fds[(str(uid), held.kind)] = fds.get((str(uid), held.kind), 0) + 1
    held_names = GaugeMetricFamily("holderd_held_names", "Names held, per uid.", labels=["uid"])
    for uid, count in sorted(names.items()):
        held_names.add_metric([uid], count)
    held_fds = GaugeMetricFamily("holderd_held_fds", "Fds held, per uid and kind.", labels=["uid", "kind"])
    for (uid, kind), count in sorted(fds.items()):
        held_fds.add_metric([uid, kind], count)
    connections = GaugeMetricFamily("holderd_connections", "Connections to holderd, per uid.", labels=["uid"])
    for uid, peers in sorted(daemon.by_uid.items()):
        connections.add_metric([str(uid)], len(peers))
    held = GaugeMetricFamily("holderd_lease_held", "Whether someone holds the lease.", labels=["uid", "lease"])
    waiting = GaugeMetricFamily("holderd_lease_waiting", "How many wait for the lease.", labels=["uid", "lease"])
    for uid, name, taken, waiters in daemon.core.leases():
        held.add_metric([str(uid), name], 1 if taken else 0)
        waiting.add_metric([str(uid), name], waiters)
    passes = CounterMetricFamily("holderd_lease_passes", "Leases passed from a holder gone to a waiter (takeovers), "
                                 "since holderd started.", labels=["uid", "lease"])
    for (uid, name), count in sorted(daemon.core.leases_passed.items()):
        passes.add_metric([str(uid), name], count)
    limit = GaugeMetricFamily("holderd_max_fds_per_uid", "The bound on fds held per uid.",
                              value=daemon.limits.max_fds_per_uid)
    return [held_names, held_fds, connections, held, waiting, passes, limit]


def endpoint(daemon: Observed, address: str, port: int, log) -> MetricsEndpoint:
    return MetricsEndpoint(daemon.loop, log, address, port, lambda: families(daemon))
