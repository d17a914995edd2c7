"""chatd's metrics, for Prometheus: what the owners already count, in its text format.

Theory of operation
-------------------
Nothing here counts. :func:`families` reads the owners that ``chatctl status``
reads (the server's connections and room, the sessions, the holders, the
cluster) and the journal: its commit number and its tally (:mod:`chatd.tally`),
which are the counts *since the service began*, kept where they survive any
crash of chatd. It runs on chatd's loop only; :mod:`fdkeep.metrics` hands
what it made to prometheus-client's scrape thread whole.

Only the chatd that serves listens for scrapes (``--metrics-port``): the
counts are the journal's, and only the server writes it. A takeover moves the
endpoint with the clients: the successor listens as soon as it serves, on the
same address, so Prometheus sees one target and one series whose counters
never start over at a crash (a scrape during the gap fails: ``up`` is 0 for
it). The standby, and a chatd that waits for ``chatctl restore``, listen on
nothing: nothing of theirs is worth scraping.

The metrics (every name begins ``chatd_``; counters end ``_total``):

====================================  ============================================================
``clients``, ``clients_adopting``     clients connected (restored ones not yet served among them)
``pairs``, ``sessions_detached``      pairs; sessions waiting for their client to resume
``max_clients``                       the connection limit
``journal_commits_total``             journal commits since the service began (the commit number)
``crashes_survived_total{how}``       restores after a chatd died: ``crashed`` (a fatal signal of
                                      its own), ``hung`` (the watchdog), ``killed`` (no last words:
                                      SIGKILL, ``chatctl crash``)
``planned_restarts_total``            restores after a handover or a stop
``restore_duration_seconds``          histogram: from the restore's start to serving (for the
                                      standby the restore starts as holderd grants the lease; a
                                      cold restart's process start before it is not included)
``last_restore_duration_seconds``     this process's restore, and when it began
``last_restore_timestamp_seconds``
``in_flight_restored_bytes_total``    bytes a restore finished: ``direction`` ``input`` (read and not
                                      handled) or ``output`` (committed and not sent)
``last_restore_in_flight_bytes``      the same, of this process's restore
``messages_relayed_total``            FROMs put into a receiver's output ring
``refused_total{bound}``              turned away by ``max_clients``, ``max_per_address``,
                                      ``resume_rate`` (``ERR busy``), ``stall_timeout`` (closed)
``sessions_resumed_total``            sessions resumed
``holder_up{holder}``                 whether each holder (holderd, systemd) answers
``cluster_*``                         with ``--cluster``: ``connected``, ``stream_lag_messages``,
                                      ``forwards_in_flight``, ``stashed``, ``publishes_pending``,
                                      ``other_hosts_alive``
====================================  ============================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fdkeep.metrics import MetricsEndpoint

from .tally import BOUNDS

if TYPE_CHECKING:
    from .server import ChatServer


def _gauge(name: str, documentation: str, value, labels: dict | None = None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"chatd_{name}", documentation, labels=list(labels or ()))
    family.add_metric(list((labels or {}).values()), value)
    return family


def _counter(name: str, documentation: str, value=None, label: str | None = None,
             values: dict | None = None) -> CounterMetricFamily:
    if label is None:
        return CounterMetricFamily(f"chatd_{name}", documentation, value=value)
    family = CounterMetricFamily(f"chatd_{name}", documentation, labels=[label])
    for key, count in (values or {}).items():
        family.add_metric([key], count)
    return family


def families(server: "ChatServer") -> list:
    """Every metric of this chatd, read from the owners now (on the loop)."""
    made = [
        _gauge("clients", "Clients connected (those restored and not yet served among them).", server.client_count()),
        _gauge("clients_adopting", "Restored clients not yet served again (chatd.adoption).", len(server.adoption)),
        _gauge("pairs", "Pairs of clients.", len(server.room.pairs())),
        _gauge("sessions_detached", "Sessions whose connection ended, waiting for their client to resume.",
               len(server.sessions)),
        _gauge("max_clients", "The connection limit (--max-clients).", server.max_clients),
    ]
    holder_up = GaugeMetricFamily("chatd_holder_up", "Whether each holder of chatd's sockets answers.",
                                  labels=["holder"])
    for holder in server.holders:  # as they say without asking anyone: no I/O here
        holder_up.add_metric([holder.label], 1 if holder.working else 0)
    made.append(holder_up)
    journal = server.journal
    if journal is not None:
        made += _since_the_service_began(journal)
    summary = server.restore_summary
    if summary is not None:
        made += [
            _gauge("last_restore_duration_seconds", "How long this process's restore took.",
                   summary["milliseconds"] / 1000),
            _gauge("last_restore_timestamp_seconds", "When this process's restore began (Unix time).",
                   summary["began_at"]),
        ]
        in_flight = GaugeMetricFamily("chatd_last_restore_in_flight_bytes",
                                      "Bytes in flight that this process's restore finished.", labels=["direction"])
        in_flight.add_metric(["input"], summary["input_replayed"])
        in_flight.add_metric(["output"], summary["output_resent"])
        made.append(in_flight)
    cluster = server.cluster.status()
    if cluster is not None:
        made += _cluster(cluster)
    return made


def _since_the_service_began(journal) -> list:
    tally = journal.tally
    histogram = HistogramMetricFamily(
        "chatd_restore_duration_seconds", "How long each restore took, from its start to serving.",
        buckets=[(repr(bound) if bound != float("inf") else "+Inf", count) for bound, count in tally.restore_buckets()],
        sum_value=tally["restore_microseconds"] / 1e6)
    return [
        _counter("journal_commits", "Journal commits since the service began.", journal.committed),
        _counter("crashes_survived", "Restores after chatd died, by how it died (its last words).", label="how",
                 values={how: tally[f"ended_{how}"] for how in ("crashed", "hung", "killed")}),
        _counter("planned_restarts", "Restores after a handover or a stop.", tally["ended_planned"]),
        histogram,
        _counter("in_flight_restored_bytes", "Bytes in flight at a crash that restores finished.", label="direction",
                 values={"input": tally["input_replayed_bytes"], "output": tally["output_resent_bytes"]}),
        _counter("messages_relayed", "Messages put into a receiver's output ring.", tally["messages_relayed"]),
        _counter("refused", "Clients or requests turned away, by the bound that did it.", label="bound",
                 values={bound: tally[f"refused_{bound}"] for bound in BOUNDS}),
        _counter("sessions_resumed", "Sessions resumed.", tally["sessions_resumed"]),
    ]


def _cluster(status: dict) -> list:
    bus = status.get("bus") or {}
    values = {
        "cluster_connected": (1 if status.get("connected") else 0, "Whether this host is connected to the cluster."),
        "cluster_stream_lag_messages": (bus.get("lag"), "Messages of the stream for this host not yet delivered."),
        "cluster_forwards_in_flight": (status.get("forwards_in_flight"),
                                       "Forwards published and not yet acknowledged."),
        "cluster_stashed": (status.get("stashed"), "Messages from other hosts waiting for room here."),
        "cluster_publishes_pending": (bus.get("publishes_pending"), "Publishes asked for and not yet done."),
        "cluster_other_hosts_alive": (len(status.get("hosts_alive") or ()), "Other hosts whose lease is current."),
    }
    return [_gauge(name, documentation, value) for name, (value, documentation) in values.items() if value is not None]


def endpoint(server: "ChatServer", address: str, port: int, log) -> MetricsEndpoint:
    """chatd's endpoint, not listening yet: chatd.lifecycle starts it once this chatd serves."""
    return MetricsEndpoint(server.loop, log, address, port, lambda: families(server))
