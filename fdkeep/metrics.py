"""Prometheus metrics of a daemon whose state lives on one event loop.

Theory of operation
-------------------
prometheus-client's HTTP server answers each scrape on a thread of its own,
while a daemon's state belongs to its loop (:mod:`fdkeep.loop`) and may be in
the middle of a change whenever that thread looks. So the thread never reads
the state: the loop makes a *snapshot*, the metric families made anew from the
state's owners, every :data:`REFRESH` seconds and whenever something worth
seeing at once happens (:meth:`Snapshots.refresh`: a restore done); the scrape
takes the latest one whole (one reference read, atomic in CPython) and never
sees half a change. A scrape shows values at most :data:`REFRESH` old. The
process's own metrics (open fds, memory, CPU, start time: the names of
prometheus-client's process collector) come from :class:`OwnProcess`, which
reads ``/proc/self`` and shares nothing with the loop.

The endpoint listens on an address of its own (loopback by default: the
daemons' flags ``--metrics-address``/``--metrics-port``), never on a port
clients use. It is an extra: a failure to listen is logged with its fix and
retried, never fatal (:meth:`MetricsEndpoint.start`), since the service
matters more than its metrics.
"""

from __future__ import annotations

import errno
import logging
from typing import Callable, Iterable

import os
import resource
import time

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .loop import Loop

#: How often the loop makes a new snapshot (seconds).
REFRESH = 1.0
#: How often a port another process still holds is asked for again, and for how long.
RETRY_EVERY = 0.1
RETRY_FOR = 30.0


class Snapshots(Collector):
    """The families ``make()`` returns, made on the loop, handed to the scrape thread whole."""

    def __init__(self, make: Callable[[], Iterable[Metric]]):
        self._make = make
        self._families: tuple[Metric, ...] = ()

    def refresh(self) -> None:
        """On the loop only."""
        self._families = tuple(self._make())

    def collect(self):
        return self._families


class OwnProcess(Collector):
    """``process_*`` as prometheus-client's ProcessCollector names them, from what a unit's
    sandbox leaves: that collector takes the boot time from ``/proc/stat``, which
    ``ProcSubset=pid`` hides, and then says nothing at all; the clock says it here
    (``CLOCK_BOOTTIME``). Runs on the scrape thread: it reads only ``/proc/self``."""

    def collect(self):
        try:
            with open("/proc/self/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            open_fds = len(os.listdir("/proc/self/fd"))
        except OSError:
            return
        ticks = os.sysconf("SC_CLK_TCK")
        booted = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        yield GaugeMetricFamily("process_start_time_seconds", "Start time of the process since unix epoch in "
                                "seconds.", value=booted + int(fields[19]) / ticks)
        yield CounterMetricFamily("process_cpu_seconds", "Total user and system CPU time spent in seconds.",
                                  value=(int(fields[11]) + int(fields[12])) / ticks)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", value=int(fields[20]))
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.",
                                value=int(fields[21]) * resource.getpagesize())
        yield GaugeMetricFamily("process_open_fds", "Number of open file descriptors.", value=open_fds)
        yield GaugeMetricFamily("process_max_fds", "Maximum number of open file descriptors.",
                                value=resource.getrlimit(resource.RLIMIT_NOFILE)[0])


class MetricsEndpoint:
    """One daemon's metrics, served over HTTP at ``address``:``port`` (``/metrics``, or any path)."""

    def __init__(self, loop: Loop, log: logging.Logger, address: str, port: int,
                 make: Callable[[], Iterable[Metric]], flag: str = "--metrics-port"):
        self.loop, self.log = loop, log
        self.address, self.port = address, port
        self.flag = flag
        self.snapshots = Snapshots(make)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.snapshots)
        self.registry.register(OwnProcess())
        self._server = None
        self._refreshing = None
        self._retry = None

    @property
    def listening(self) -> str | None:
        """``address:port`` once it listens (the port the kernel gave for 0), else None."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, retry_for: float = RETRY_FOR) -> None:
        """Make a snapshot and listen. A port another process still holds (a predecessor not
        quite gone) is asked for again, every :data:`RETRY_EVERY` s for ``retry_for`` s;
        any other failure is logged with its fix, and chatd goes on without metrics."""
        self.snapshots.refresh()
        if self._refreshing is None:
            self._refreshing = self.loop.call_every(REFRESH, self.snapshots.refresh)
        self._listen(retry_for)

    def _listen(self, retry_for: float, tried: float = 0.0) -> None:
        self._retry = None
        try:
            self._server, _ = start_http_server(self.port, self.address, registry=self.registry)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE and tried < retry_for:
                if tried == 0.0:
                    self.log.info("metrics: %s:%d is still taken, asking again for up to %.0f s",
                                  self.address, self.port, retry_for)
                self._retry = self.loop.call_later(
                    RETRY_EVERY, lambda: self._listen(retry_for, tried + RETRY_EVERY))
                return
            self.log.error("metrics: cannot listen on %s port %d (%s): no metrics from this process; "
                           "free that port or pass another %s (0: any free port)",
                           self.address, self.port, exc.strerror or exc, self.flag)
            return
        self.log.info("metrics on http://%s/metrics", self.listening)

    def close(self) -> None:
        for timer in (self._refreshing, self._retry):
            if timer is not None:
                timer.cancel()
        self._refreshing = self._retry = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
