"""Several chatd hosts on one machine, paired across hosts through a NATS JetStream cluster.

Theory of operation
-------------------
:class:`Hosts` plays, on loopback, what a site runs on several machines: a
NATS JetStream cluster (:class:`ctl.natscluster.NatsCluster`, 3 nodes by
default, so the stream and buckets are R3) and ``hosts`` chatd hosts, each a
:class:`ctl.launch.Launcher` of its own: its own holderd, journal, control
socket and line and web ports, as separate machines would have. Every chatd
gets ``--cluster`` with every NATS node's URL, ``--host-id h<i>``, the
same across its restarts, and its own NATS key and the cluster's CA
(``--nats-creds``, ``--nats-ca``: the cluster is secured as a deployment is,
unless ``secure=False``), which is what lets a restarted chatd take its
nicks and its place in the stream back.

What dies is started again by :meth:`Hosts.revive`, called over and over by
``chatctl cluster``, as systemd's ``Restart=`` would on real machines: a chatd
restarts with ``--restore`` and takes its clients back from its host's
holderd and journal; a NATS node restarts on its ports and store. Each death
is told in one line. What dies :data:`RESTART_BURST` times within
:data:`RESTART_INTERVAL` seconds (systemd's ``StartLimitBurst=`` and
``StartLimitIntervalSec=`` defaults) is in a crash loop: :class:`CrashLoop`,
with its log's tail, rather than restarting it forever. A dead holderd is
told, not restarted: the connections it kept died with it.

Tests and ``chatctl cluster`` use it; everything lives in one scratch
directory and :meth:`Hosts.close` ends every process (and removes the
directory if it made it), failed or not.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time

from fdkeep.errors import Error

from .launch import Launcher
from .natscluster import NATS_SERVER, NatsCluster

#: systemd's defaults: a unit that dies StartLimitBurst=5 times within StartLimitIntervalSec=10 s stays dead.
RESTART_BURST = 5
RESTART_INTERVAL = 10.0


def missing_for_cluster() -> str | None:
    """What this machine lacks to run a cluster, as the fix to apply; None if nothing."""
    missing = []
    if not os.access(NATS_SERVER, os.X_OK):
        missing.append("nats-server (apt-get install nats-server)")
    lacking = [name for name in ("nats", "nkeys", "cryptography") if importlib.util.find_spec(name) is None]
    if lacking:
        missing.append(f"{', '.join(lacking)} (pip install -e '.[cluster]')")
    return " and ".join(missing) or None


def how_it_ended(returncode: int) -> str:
    """A process's end as a person says it: ``killed by SIGSEGV``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


class CrashLoop(Exception):
    """Something died :data:`RESTART_BURST` times within :data:`RESTART_INTERVAL` seconds."""


class RestartLimit:
    """systemd's start limit: the ``burst``-th death within ``interval`` seconds is a crash loop."""

    def __init__(self, burst: int = RESTART_BURST, interval: float = RESTART_INTERVAL):
        self.burst = burst
        self.interval = interval
        self._deaths: collections.deque[float] = collections.deque()

    def died(self, now: float) -> bool:
        """Count a death at ``now`` (monotonic seconds); True if that makes a crash loop."""
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self.interval:
            self._deaths.popleft()
        return len(self._deaths) >= self.burst


class Hosts:
    def __init__(self, hosts: int = 3, nats_nodes: int = 3, *, lease: float = 3.0, workdir: str | None = None,
                 chatd_args: tuple[str, ...] = (), secure: bool = True, nats_host: str = "127.0.0.1",
                 placement: dict[int, tuple[str, tuple[str, ...]]] | None = None):
        """``nats_host``: the address the NATS nodes listen on for clients; ``placement``: host
        index -> (the address its chatd listens on, the command prefix that runs its daemons),
        for a host in a network namespace (testkit.partition); the others are on loopback."""
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="chatd-hosts-")
        self.lease = lease
        self.chatd_args = tuple(chatd_args)
        self.nats = NatsCluster(os.path.join(self.workdir, "nats"), nats_nodes, start=False, secure=secure,
                                hosts=tuple(f"h{index}" for index in range(hosts)), client_host=nats_host)
        placement = placement or {}
        #: The address each host's chatd listens on, for its clients.
        self.addresses = [placement.get(index, ("127.0.0.1", ()))[0] for index in range(hosts)]
        self.hosts: list[Launcher] = []
        for index in range(hosts):
            directory = os.path.join(self.workdir, f"h{index}")
            os.makedirs(directory, exist_ok=True)
            self.hosts.append(Launcher(directory, prefix=placement.get(index, ("", ()))[1]))
        self._limits: dict[str, RestartLimit] = collections.defaultdict(RestartLimit)
        self._holderd_deaths_told: set[int] = set()

    def host_args(self, index: int) -> tuple[str, ...]:
        return ("--host", self.addresses[index], "--cluster", ",".join(self.nats.urls), "--host-id", f"h{index}",
                "--host-lease", f"{self.lease:g}",
                *self.nats.credentials(f"h{index}"), *self.chatd_args)

    def start(self, *extra: str, env: dict | None = None) -> "Hosts":
        """The NATS cluster, then each host's holderd and chatd (``extra``: more chatd options;
        ``env``: added to their environment, e.g. PYTHONPATH of another release's tree; a chatd
        restarted later runs this checkout, as an upgraded host does)."""
        self.nats.start()
        for index, host in enumerate(self.hosts):
            host.start_holderd(env=env)
            host.start_chatd(*self.host_args(index), *extra, env=env)
        return self

    def restart_chatd(self, index: int, *extra: str, wait: bool = False) -> None:
        """A new chatd for host ``index``, taking back what its holderd keeps (as systemd would start it)."""
        self.hosts[index].start_chatd("--restore", *self.host_args(index), *extra, wait=wait)

    def lose_host(self, index: int) -> None:
        """Host ``index`` is lost whole, as a machine that dies: its chatd and holderd SIGKILLed
        together, so the connections and the journal they kept die with them."""
        host = self.hosts[index]
        for proc in (host.chatd, host.holderd):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in (host.chatd, host.holderd):
            if proc is not None:
                proc.wait(20)
        self._holderd_deaths_told.add(index)

    def start_host_again(self, index: int) -> None:
        """A lost host comes back empty, on its ports: a new holderd and a fresh chatd."""
        host = self.hosts[index]
        host.start_holderd()
        host.start_chatd(*self.host_args(index))
        self._holderd_deaths_told.discard(index)

    def revive(self) -> list[str]:
        """Start again every chatd and NATS node that died since the last call, as systemd would;
        one line for each death. Raises :class:`CrashLoop` (with the log's tail) for one that died
        :data:`RESTART_BURST` times within :data:`RESTART_INTERVAL` seconds."""
        told = []
        for index, host in enumerate(self.hosts):
            if host.holderd.poll() is not None and index not in self._holderd_deaths_told:
                self._holderd_deaths_told.add(index)
                told.append(f"h{index}: holderd (pid {host.holderd.pid}) {how_it_ended(host.holderd.returncode)}; "
                            "the connections it kept are gone, and a chatd restarted now has nothing to restore")
            if host.chatd.poll() is not None:
                told.append(self._revive_chatd(index))
        for node in self.nats.nodes:
            if node.proc is not None and node.proc.poll() is not None:  # proc None: stopped on purpose
                dead = node.proc
                self._count_death(f"NATS node {node.name}", dead, node.log_path)
                self.nats.restart(node.index, wait=False)
                told.append(f"NATS node {node.name}: nats-server (pid {dead.pid}) {how_it_ended(dead.returncode)}; "
                            f"restarted as pid {node.proc.pid} on its ports and store (the chatds reconnect by "
                            "themselves)")
        return told

    def _revive_chatd(self, index: int) -> str:
        host, dead = self.hosts[index], self.hosts[index].chatd
        self._count_death(f"h{index}'s chatd", dead, host.log_path(dead))
        began = time.monotonic()
        self.restart_chatd(index, wait=False)
        said = (f"h{index}: chatd (pid {dead.pid}) {how_it_ended(dead.returncode)}; restarted as pid "
                f"{host.chatd.pid}, restoring from h{index}'s holderd and journal: ")
        try:
            host.wait_chatd()
        except Error as exc:
            if host.chatd.poll() is None:  # it hangs: end it as systemd's TimeoutStartSec= would
                host.chatd.kill()
                host.chatd.wait()
            return said + f"FAILED: {exc.message}"
        return said + f"serving again in {(time.monotonic() - began) * 1000:.0f} ms"

    def _count_death(self, what: str, dead: subprocess.Popen, log_path: str) -> None:
        if self._limits[what].died(time.monotonic()):
            with open(log_path, errors="replace") as f:
                tail = f.read()[-4000:]
            raise CrashLoop(f"{what} (pid {dead.pid}) {how_it_ended(dead.returncode)}, its {RESTART_BURST}th "
                            f"death within {RESTART_INTERVAL:g} s: a crash loop, not restarted again. "
                            f"The end of its log {log_path}:\n{tail}")

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
