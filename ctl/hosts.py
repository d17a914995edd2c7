"""Several chatd hosts on one machine, paired across hosts through a NATS JetStream cluster.

Theory of operation
-------------------
:class:`Hosts` plays, on loopback, what a site runs on several machines: a
NATS JetStream cluster (:class:`ctl.natscluster.NatsCluster`, 3 nodes by
default, so the stream and buckets are R3) and ``hosts`` chatd hosts, each a
:class:`ctl.launch.Launcher` of its own: its own holderd, journal, control
socket and line and web ports, as separate machines would have. Every chatd
gets ``--cluster`` with every NATS node's URL and ``--host-id h<i>``, the
same across its restarts, which is what lets a restarted chatd take its
nicks and its place in the stream back.

Tests and ``chatctl cluster`` use it; everything lives in one scratch
directory and :meth:`Hosts.close` ends every process (and removes the
directory if it made it), failed or not.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile

from .launch import Launcher
from .natscluster import NATS_SERVER, NatsCluster


def missing_for_cluster() -> str | None:
    """What this machine lacks to run a cluster, as the fix to apply; None if nothing."""
    missing = []
    if not os.access(NATS_SERVER, os.X_OK):
        missing.append("nats-server (apt-get install nats-server)")
    if importlib.util.find_spec("nats") is None:
        missing.append("nats-py (pip install -e '.[cluster]')")
    return " and ".join(missing) or None


class Hosts:
    def __init__(self, hosts: int = 3, nats_nodes: int = 3, *, lease: float = 3.0, workdir: str | None = None,
                 chatd_args: tuple[str, ...] = ()):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="chatd-hosts-")
        self.lease = lease
        self.chatd_args = tuple(chatd_args)
        self.nats = NatsCluster(os.path.join(self.workdir, "nats"), nats_nodes, start=False)
        self.hosts: list[Launcher] = []
        for index in range(hosts):
            directory = os.path.join(self.workdir, f"h{index}")
            os.makedirs(directory, exist_ok=True)
            self.hosts.append(Launcher(directory))

    def host_args(self, index: int) -> tuple[str, ...]:
        return ("--cluster", ",".join(self.nats.urls), "--host-id", f"h{index}", "--host-lease", f"{self.lease:g}",
                *self.chatd_args)

    def start(self, *extra: str) -> "Hosts":
        """The NATS cluster, then each host's holderd and chatd (``extra``: more chatd options)."""
        self.nats.start()
        for index, host in enumerate(self.hosts):
            host.start_holderd()
            host.start_chatd(*self.host_args(index), *extra)
        return self

    def restart_chatd(self, index: int, *extra: str, wait: bool = False) -> None:
        """A new chatd for host ``index``, taking back what its holderd keeps (as systemd would start it)."""
        self.hosts[index].start_chatd("--restore", *self.host_args(index), *extra, wait=wait)

    @property
    def ports(self) -> list[int]:
        return [host.port for host in self.hosts]

    def status(self, index: int) -> dict:
        return self.hosts[index].control("status")

    def logs(self, nats_tail: int = 4000) -> str:
        """Every host's logs, then the end of the NATS nodes' (the most verbose)."""
        parts = [f"=== host h{index}\n{host.logs()}" for index, host in enumerate(self.hosts)]
        return "\n".join(parts) + "\n=== nats (the end)\n" + self.nats.logs()[-nats_tail:]

    def close(self) -> None:
        for host in self.hosts:
            host.close()
        self.nats.close()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
