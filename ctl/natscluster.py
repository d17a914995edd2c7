"""A NATS JetStream cluster on loopback: started, killed, restarted and ended by tests and benchmarks.

Theory of operation
-------------------
:class:`NatsCluster` runs ``nodes`` real ``nats-server`` processes (Debian's
package; 2.9 on Debian 12) in one working directory, one subdirectory a node
(``n0/``, ``n1/`` …) holding its config (``nats.conf``), its JetStream store
(``jetstream/``) and its log (``nats.log``, appended to across restarts, so
a node's whole life is in one file). Each node gets three ports on 127.0.0.1:
clients, routes to the other nodes, and the HTTP monitor the launcher asks
whether the node is ready. With ``nodes=1`` there is no cluster block: one
plain JetStream server.

Ports are picked by the kernel (bind port 0, read it, close) for every node
at once, so ours never clash with each other; a port some other program takes
in between makes a node exit at once, and the whole start is tried again on
fresh ports. A node restarted by :meth:`NatsCluster.restart` keeps its ports,
name and store, as a machine coming back would.

*Ready* means more than an open port: every node answers on its client port,
reports a JetStream meta leader (``/jsz``: a clustered server cannot create a
stream before the cluster has elected one) and says it is healthy
(``/healthz``: on 2.9 that includes being current with the meta group).
:attr:`NatsCluster.start_seconds` says how long that took.

Every process is ended by :meth:`NatsCluster.close` (SIGKILL: the stores are
scratch), which is safe to call twice and runs on leaving a ``with`` block;
and each node is started with ``PR_SET_PDEATHSIG`` so that it dies with the
thread that started it, should the test process itself be killed.

**Secured by default**, as a deployment is (README, "Security across hosts"):
the cluster's secrets (:mod:`ctl.natssecrets`, in ``secrets/``) give every
node a certificate from the cluster's CA; clients must speak TLS, routes are
mutual TLS, and only the chatd hosts given (``hosts``, and any added by
:meth:`NatsCluster.credentials`, which reloads the running nodes) may connect,
each with its own nkey and permissions. :meth:`NatsCluster.credentials` gives a
host's ``--nats-creds`` and ``--nats-ca``; :meth:`NatsCluster.revoke` takes a
host out. ``secure=False`` is the open cluster of before (no TLS, anyone in).

nats-server 2.9 ignores config options it does not know without a word, so
this module writes only options 2.9 knows, and code that creates streams reads
their configuration back (:mod:`chatd.bus` does).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

from fdkeep.errors import Error

from .children import ClosedOnExit, die_with_parent, log_tail
from .natssecrets import LOOPBACK_NAMES, Secrets, make_secrets

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
#: What nats-server logs once a reload (SIGHUP) took effect.
RELOADED = "Reloaded server configuration"


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports the kernel says are free on 127.0.0.1 right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def accepts_tcp(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def monitor_get(port: int, path: str) -> dict | None:
    """The JSON a node's HTTP monitor answers at ``path``; None if it does not answer (yet)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:  # /healthz answers 503 with a JSON body while unhealthy
        try:
            return json.loads(exc.read())
        except ValueError:
            return None
    except (OSError, ValueError):
        return None


class NatsNode:
    """One server of the cluster: its name, ports, files and (while it runs) its process."""

    def __init__(self, index: int, workdir: str, client_host: str = "127.0.0.1"):
        self.index = index
        #: The address it listens for clients on: loopback, or an address on a veth the caller
        #: made so that a host in a network namespace reaches it (testkit.partition).
        self.client_host = client_host
        self.name = f"n{index}"
        self.directory = os.path.join(workdir, self.name)
        self.config_path = os.path.join(self.directory, "nats.conf")
        self.store_dir = os.path.join(self.directory, "jetstream")
        self.log_path = os.path.join(self.directory, "nats.log")
        self.client_port = self.cluster_port = self.monitor_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.client_host}:{self.client_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def write_config(self, cluster_name: str, peers: list["NatsNode"], secrets: Secrets | None = None) -> None:
        """Its config; with ``secrets``: TLS for clients and routes, and the hosts' authorization."""
        os.makedirs(self.store_dir, exist_ok=True)
        lines = [
            f"server_name: {self.name}",
            f"listen: {self.client_host}:{self.client_port}",
            f"http: 127.0.0.1:{self.monitor_port}",
            f'jetstream {{ store_dir: "{self.store_dir}" }}',
        ]
        if secrets is not None:
            lines.append(secrets.node_config(self.name))
        if peers:
            routes = ", ".join(f"nats-route://127.0.0.1:{peer.cluster_port}" for peer in peers)
            route_tls = f", {secrets.tls_block(self.name, routes=True)}" if secrets is not None else ""
            lines.append(f"cluster {{ name: {cluster_name}, listen: 127.0.0.1:{self.cluster_port}, "
                         f"routes: [{routes}]{route_tls} }}")
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def start(self, binary: str) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([binary, "-c", self.config_path], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.directory,
                                         preexec_fn=die_with_parent)

    def kill(self) -> None:
        """SIGKILL and reap; the node is then *down* (no process), not *failed*."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def readiness(self, clustered: bool) -> str | None:
        """None once ready; else what it still waits for (for the timeout's message)."""
        if not self.running:
            return f"{self.name} exited with status {self.proc.returncode if self.proc else None}"
        if not accepts_tcp(self.client_port, self.client_host):
            return f"{self.name} to accept clients on port {self.client_port}"
        jsz = monitor_get(self.monitor_port, "/jsz")
        if jsz is None:
            return f"{self.name}'s monitor on port {self.monitor_port} to answer /jsz"
        if clustered and not (jsz.get("meta_cluster") or {}).get("leader"):
            return f"{self.name} to know a JetStream meta leader"
        health = monitor_get(self.monitor_port, "/healthz")
        if not health or health.get("status") != "ok":
            return f"{self.name} to report healthy (/healthz: {health})"
        return None


class NatsCluster(ClosedOnExit):
    """``nodes`` nats-server processes with JetStream on loopback, routed to each other.

    Started by the constructor (``start=False`` to call :meth:`start` later).
    """

    def __init__(self, workdir: str, nodes: int = 3, *, binary: str = NATS_SERVER, cluster_name: str = "chatd",
                 start: bool = True, timeout: float = 30.0, secure: bool = True, hosts: tuple[str, ...] = (),
                 client_host: str = "127.0.0.1"):
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        if not os.access(binary, os.X_OK):
            raise Error("unavailable", f"{binary} is not there: install Debian's nats-server "
                                       "(apt-get install nats-server)")
        self.workdir = workdir
        self.binary = binary
        self.cluster_name = cluster_name
        self.timeout = timeout
        self.client_host = client_host
        self.nodes = [NatsNode(index, workdir, client_host) for index in range(nodes)]
        #: The cluster's CA, node certificates and host keys (None: an open cluster).
        self.secrets = Secrets(os.path.join(workdir, "secrets")) if secure else None
        self.hosts: list[str] = list(dict.fromkeys(hosts))
        if self.secrets is not None:
            self._make_secrets()
        #: Seconds from the first process started to every node ready, of the last :meth:`start`.
        self.start_seconds: float | None = None
        self._assign_ports()  # the URLs are known before start(): a client can be told of a server yet to come
        if start:
            self.start()

    # -- what tests use ----------------------------------------------------------------
    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def secure(self) -> bool:
        return self.secrets is not None

    def credentials(self, host: str) -> tuple[str, ...]:
        """chatd's options for ``host`` (``--nats-creds FILE --nats-ca FILE``), its key made and
        the running nodes reloaded first if it is new; () for an open cluster."""
        if self.secrets is None:
            return ()
        if host not in self.hosts:
            self.hosts.append(host)
            self._make_secrets()
            self.reload()
        return ("--nats-creds", self.secrets.host_seed(host), "--nats-ca", self.secrets.ca)

    def bus_options(self, host: str) -> dict:
        """:class:`chatd.bus.Bus` keyword arguments for ``host`` (as :meth:`credentials`)."""
        options = self.credentials(host)
        return {"creds": options[1], "ca": options[3]} if options else {}

    def revoke(self, host: str) -> None:
        """Take ``host`` out of the authorization, its key removed, and reload the running nodes:
        its connections are closed and it cannot connect again."""
        if host in self.hosts:
            self.hosts.remove(host)
            self._make_secrets(revoke=[host])
            self.reload()

    def reload(self) -> None:
        """Every running node reads its config again (SIGHUP); returns once each logged the reload."""
        waiting = []
        for node in self.nodes:
            if node.running:
                waiting.append((node, self._log_tail(node, None).count(RELOADED)))
                node.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.timeout
        for node, before in waiting:
            while self._log_tail(node, None).count(RELOADED) <= before:
                if not node.running or time.monotonic() > deadline:
                    raise Error("reload", f"nats-server {node.name} did not reload its config; its log "
                                          f"{node.log_path} says: {self._log_tail(node)[-400:]}")
                time.sleep(0.02)

    @property
    def clustered(self) -> bool:
        return len(self.nodes) > 1

    def node_of(self, url: str) -> int:
        """The index of the node serving ``url`` (e.g. the one a client is connected to)."""
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        for node in self.nodes:
            if node.client_port == port:
                return node.index
        raise Error("not-found", f"{url} is none of this cluster's nodes ({', '.join(self.urls)})")

    def meta_leader(self) -> str | None:
        """The name of the JetStream meta leader (``n0`` …) as a running node sees it."""
        for node in self.nodes:
            if node.running:
                jsz = monitor_get(node.monitor_port, "/jsz")
                leader = jsz and (jsz.get("meta_cluster") or {}).get("leader")
                if leader:
                    return leader
        return None

    def monitor(self, index: int, path: str) -> dict | None:
        """What node ``index``'s HTTP monitor answers at ``path`` (``/jsz?consumers=true`` …); None if down."""
        return monitor_get(self.nodes[index].monitor_port, path)

    def stream_leader(self, stream: str) -> int | None:
        """The index of the node leading ``stream`` (and, on 2.9, holding its ephemeral consumers)."""
        for node in self.nodes:
            if not node.running:
                continue
            for account in (monitor_get(node.monitor_port, "/jsz?streams=true") or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader:
                        return int(leader[1:]) if leader[1:].isdigit() else None
        return None

    def consumer_nodes(self, stream: str) -> dict[str, int]:
        """Each consumer of ``stream`` -> the index of the node that leads it."""
        found = {}
        for node in self.nodes:
            if not node.running:
                continue
            for account in (monitor_get(node.monitor_port, "/jsz?consumers=true") or {}).get("account_details") or []:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") != stream:
                        continue
                    for consumer in detail.get("consumer_detail") or []:
                        leader = (consumer.get("cluster") or {}).get("leader") or node.name
                        if leader == node.name:
                            found[consumer["name"]] = node.index
        return found

    def start(self) -> float:
        """Start every node and wait until all are ready; returns (and keeps) the seconds it took."""
        for attempt in range(3):
            if attempt:
                self._assign_ports()
            began = time.monotonic()
            for node in self.nodes:
                node.start(self.binary)
            try:
                self._wait_ready(self.nodes)
            except Error:
                clash = any("address already in use" in self._log_tail(node) for node in self.nodes)
                self._kill_all()
                if clash and attempt < 2:
                    continue  # a port was taken between our pick and the server's bind
                raise
            self.start_seconds = time.monotonic() - began
            return self.start_seconds
        raise AssertionError("unreachable")

    def kill(self, index: int) -> None:
        """SIGKILL node ``index`` (a crash: nothing flushed, nothing said to the others) and reap it."""
        self.nodes[index].kill()

    def restart(self, index: int, wait: bool = True) -> float:
        """Start node ``index`` again on its ports and store; with ``wait``, until the cluster is ready.

        Returns the seconds it took to be ready (0 without ``wait``).
        """
        node = self.nodes[index]
        node.kill()
        began = time.monotonic()
        node.start(self.binary)
        if wait:
            self._wait_ready(self.nodes)
        return time.monotonic() - began if wait else 0.0

    def logs(self) -> str:
        parts = []
        for node in self.nodes:
            try:
                with open(node.log_path, errors="replace") as f:
                    parts.append(f"--- nats {node.name}\n{f.read()}")
            except OSError:
                pass
        return "\n".join(parts)

    def stop(self) -> None:
        """End every node (SIGKILL) and reap it. Safe to call again; the nodes can be restarted."""
        self._kill_all()

    def close(self) -> None:
        self._kill_all()

    # -- inside ------------------------------------------------------------------------
    def _assign_ports(self) -> None:
        ports = free_ports(3 * len(self.nodes))
        for node in self.nodes:
            node.client_port, node.cluster_port, node.monitor_port = ports[3 * node.index: 3 * node.index + 3]
        self._write_configs()

    def _write_configs(self) -> None:
        for node in self.nodes:
            peers = [peer for peer in self.nodes if peer is not node]
            node.write_config(self.cluster_name, peers, self.secrets)

    def _make_secrets(self, revoke: list[str] = ()) -> None:
        make_secrets(self.secrets.directory, self.hosts, [node.name for node in self.nodes],
                     names=tuple(dict.fromkeys((*LOOPBACK_NAMES, self.client_host))),
                     cluster_name=self.cluster_name, revoke=revoke)
        if self.nodes[0].client_port:  # ports assigned: the configs exist and must say the new users
            self._write_configs()

    def _wait_ready(self, nodes: list[NatsNode]) -> None:
        deadline = time.monotonic() + self.timeout
        waiting_for = None
        while True:
            waiting_for = None
            for node in nodes:
                if node.proc is None:  # down on purpose (killed, not restarted): not waited for
                    continue
                if not node.running:
                    raise Error("exited", f"nats-server {node.name} exited with status {node.proc.returncode}; "
                                          f"its log {node.log_path} says: {self._log_tail(node)[-400:]}")
                waiting_for = node.readiness(self.clustered)
                if waiting_for:
                    break
            if waiting_for is None:
                return
            if time.monotonic() > deadline:
                raise Error("timeout", f"timed out after {self.timeout:.0f} s waiting for {waiting_for}; "
                                       f"see the logs under {self.workdir}")
            time.sleep(0.02)

    def _kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    @staticmethod
    def _log_tail(node: NatsNode, size: int | None = 2000) -> str:
        if size is None:
            try:
                with open(node.log_path, errors="replace") as f:
                    return f.read()
            except OSError:
                return ""
        return log_tail(node.log_path, size)
