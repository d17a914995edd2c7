"""HAProxy in front of chatd hosts: one address for the clients, a lost host taken out by its health check.

Theory of operation
-------------------
:func:`haproxy_config` writes the configuration a deployment keeps (the README
shows its output): two front doors, one address each, over the same hosts.

- The **line port** (``frontend line``) is plain TCP (``mode tcp``): HAProxy
  passes bytes and never reads the protocol. ``balance leastconn``: a chat
  connection lives for hours, so what matters is how many each host has
  *open*, not how many it was given (round robin counts the latter, and
  after a host's loss would keep sending the herd's share to whichever host
  came next). A TCP check of the line port would only say that a socket
  accepts, which holderd's kept listening socket does even while no chatd
  serves; so the check is chatd's own ``GET /healthz`` on the host's web port
  (``option httpchk`` with ``check port <web>``): a host whose chatd answers
  200 is serving (one fenced, cut off from NATS, answers 503: chatd.fencing).
- The **web port** (``frontend web``) is HTTP (``mode http``), so HAProxy
  sees the page's requests, logs them, and lets the WebSocket upgrade of
  ``/ws`` through; once upgraded, the connection is a tunnel and ``timeout
  tunnel`` (an hour) governs it instead of the short HTTP timeouts. Also
  ``balance leastconn``, for the same reason: a page's WebSocket is as
  long-lived as a line client, and the page's other requests (``/``, its
  files, ``/healthz``) are stateless, so nothing needs stickiness: a
  session is kept in the cluster, and a client that reconnects resumes it on
  whichever host it lands (chatd.keeper).
- **TLS** (optional, ``tls_cert``): the web port is then ``https://`` and
  ``wss://`` (``bind … ssl crt <pem>``), and HAProxy is where TLS ends. It
  has to end in front of chatd, not in it: a TLS session's state (keys,
  sequence numbers) lives in the memory of the process that did the
  handshake, and dies with it; a plain TCP connection's lives in the kernel,
  which is what holderd keeps across chatd's crashes. So a page's TLS
  connection is HAProxy's, its plain connection behind HAProxy is chatd's, and
  a crash of chatd closes neither. ``alpn http/1.1``: each WebSocket rides a
  TLS connection of its own (as over ``ws://``), not a stream of a shared
  HTTP/2 connection, so a page's connection is its WebSocket's alone.
  TLS 1.2 at least. The PEM holds the certificate, its chain and the private
  key (the key may instead sit beside it as ``<pem>.key``): :func:`tls_cert_problem`
  checks it before anything starts, naming the fix. A restart of HAProxy
  itself closes every TLS connection (their state was in it): pages then
  reconnect and take their sessions back (``RESUME``), as after any cut.
- Checks every ``inter`` (2 s), ``fall 3`` failures take a host out, ``rise
  2`` successes put it back. Three, not one: a chatd that crashes is restored
  by its host (its holderd keeps the listening sockets and every
  connection), which takes a fraction of a second; a check that lands in it
  must not take out a host whose clients are all still connected. For the
  same reason there is no ``on-marked-down shutdown-sessions``: HAProxy does
  not cut the connections of a host it marks down; a host truly lost has cut
  them itself (its kernel, or its machine, is gone).

:class:`HAProxy` runs Debian's ``haproxy`` as a child process: ``-db`` (in the
foreground, no daemon: its pid is ours to watch and end), its output, the
log lines included (``log stdout``: connections, health-check changes such as
``Server chatd_line/h1 is DOWN``), appended to ``haproxy.log``. The config is
checked first (``haproxy -c``) so that a mistake is told with HAProxy's own
words. Its ``stats socket`` (a Unix socket in the working directory, admin
level; in a directory of its own under /tmp where that path is too long for a
Unix socket) answers ``show stat``: :meth:`HAProxy.states` reads each host's state
in each backend from it. :meth:`HAProxy.reload` does what ``systemctl reload
haproxy`` does (a new process takes the ports, the old one, told with ``-sf``,
stops listening and serves its connections until they end).
:meth:`HAProxy.close` ends it, and any old one still draining (SIGTERM, then
SIGKILL), and is safe to call twice; it is started with ``PR_SET_PDEATHSIG``, so it
dies with the thread that started it should the caller be killed.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
import subprocess
import tempfile
import time

from fdkeep.errors import Error

from .children import ClosedOnExit, die_with_parent, log_tail, stop

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
#: The backends :func:`haproxy_config` names, one a port.
LINE_BACKEND, WEB_BACKEND = "chatd_line", "chatd_web"
#: The longest Unix socket path that fits sockaddr_un's 108 bytes, with its NUL.
SUN_PATH_MAX = 107


def missing_haproxy() -> str | None:
    """What this machine lacks to run HAProxy, as the fix to apply; None if nothing."""
    return None if os.access(HAPROXY, os.X_OK) else "haproxy (apt-get install haproxy)"


def tls_cert_problem(path: str) -> str | None:
    """What is wrong with ``path`` as HAProxy's ``ssl crt`` (a PEM with the certificate, its chain and the
    private key, or the key beside it as ``<path>.key``), said with the fix; None if it looks usable."""
    make = "make one as the README's \"The web chat over TLS\" shows"
    if not os.path.exists(path):
        return f"the TLS certificate {path} is not there: give the path of the PEM file, or {make}"
    if not os.path.isfile(path):
        return f"the TLS certificate {path} is not a file: give the PEM file itself (certificate, chain, key)"
    try:
        with open(path, errors="replace") as f:
            text = f.read(1 << 20)
    except OSError as exc:
        return (f"cannot read the TLS certificate {path} ({exc.strerror}): make it readable by the user "
                f"that runs haproxy (e.g. chmod 600, owned by it)")
    if "-----BEGIN CERTIFICATE-----" not in text:
        return f"{path} holds no certificate (no BEGIN CERTIFICATE block): it must be a PEM; {make}"
    if "PRIVATE KEY-----" not in text and not os.path.isfile(path + ".key"):
        return (f"{path} holds no private key, and there is no {path}.key: append the key to it "
                f"(cat cert.pem chain.pem key.pem > {os.path.basename(path)})")
    return None


def haproxy_config(hosts: list[tuple[str, int, int]], line_port: int, web_port: int, *, bind: str = "127.0.0.1",
                   stats_socket: str = "/run/haproxy/chatd.sock", inter_ms: int = 2000, fall: int = 3,
                   rise: int = 2, tls_cert: str | None = None) -> str:
    """haproxy.cfg for ``hosts`` (each ``(address, line port, web port)``, named h0, h1 … in order),
    listening on ``bind`` at ``line_port`` and ``web_port``; the web port over TLS with ``tls_cert``."""
    line_servers = "\n".join(f"    server h{index} {address}:{line} check port {web}"
                             for index, (address, line, web) in enumerate(hosts))
    web_servers = "\n".join(f"    server h{index} {address}:{web} check"
                            for index, (address, line, web) in enumerate(hosts))
    tls_global = tls_bind = ""
    if tls_cert is not None:
        tls_global = "\n    # TLS ends here, not in chatd (a TLS session would die with chatd).\n" \
                     "    ssl-default-bind-options ssl-min-ver TLSv1.2"
        tls_bind = f" ssl crt {tls_cert} alpn http/1.1"
    return f"""\
# chatd hosts behind HAProxy: the line protocol (TCP) and the web chat (HTTP + WebSocket{" over TLS" if tls_cert else ""}).
global
    log stdout format raw local0
    stats socket {stats_socket} mode 600 level admin{tls_global}

defaults
    log global
    timeout connect 3s
    # A failed connect is tried again, on another host (redispatch).
    retries 2
    option redispatch
    # A host is out after {fall} failed checks {inter_ms} ms apart, back after {rise} good ones.
    default-server inter {inter_ms}ms fall {fall} rise {rise}
    timeout check 2s

frontend line
    mode tcp
    bind {bind}:{line_port}
    option tcplog
    # A line client may be silent for long: chatd, not HAProxy, decides when it is gone.
    timeout client 1h
    default_backend {LINE_BACKEND}

backend {LINE_BACKEND}
    mode tcp
    balance leastconn
    timeout server 1h
    # The line port accepts while no chatd serves (holderd keeps it): ask chatd itself.
    option httpchk
    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host chatd
    http-check expect status 200
{line_servers}

frontend web
    mode http
    bind {bind}:{web_port}{tls_bind}
    option httplog
    timeout http-request 10s
    timeout client 30s
    default_backend {WEB_BACKEND}

backend {WEB_BACKEND}
    mode http
    balance leastconn
    timeout server 30s
    # An upgraded WebSocket is a tunnel: this, not the HTTP timeouts above, governs it.
    timeout tunnel 1h
    option httpchk
    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host chatd
    http-check expect status 200
{web_servers}
"""


class HAProxy(ClosedOnExit):
    """Debian's haproxy in front of ``hosts`` (``(line port, web port)`` each, on 127.0.0.1),
    listening on 127.0.0.1 at ``line_port`` and ``web_port`` (over TLS with ``tls_cert``, a PEM); its files
    in ``workdir``."""

    def __init__(self, workdir: str, hosts: list[tuple[int, int]], line_port: int, web_port: int, *,
                 inter_ms: int = 2000, fall: int = 3, rise: int = 2, tls_cert: str | None = None,
                 binary: str = HAPROXY, timeout: float = 15.0):
        if not os.access(binary, os.X_OK):
            raise Error("unavailable", f"{binary} is not there: install Debian's haproxy (apt-get install haproxy)")
        if tls_cert is not None:
            tls_cert = os.path.abspath(tls_cert)  # haproxy runs in workdir
            if problem := tls_cert_problem(tls_cert):
                raise Error("invalid", problem)
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.binary = binary
        self.timeout = timeout
        self.line_port, self.web_port = line_port, web_port
        self.tls_cert = tls_cert
        #: The page's address through HAProxy: https:// with a certificate, else http://.
        self.web_url = f"{'https' if tls_cert else 'http'}://127.0.0.1:{web_port}/"
        self.config_path = os.path.join(workdir, "haproxy.cfg")
        self.log_path = os.path.join(workdir, "haproxy.log")
        self.stats_socket = os.path.join(workdir, "stats.sock")
        self._socket_dir = None
        if len(self.stats_socket.encode()) > SUN_PATH_MAX:  # haproxy refuses it: a short place instead
            self._socket_dir = tempfile.mkdtemp(prefix="haproxy-", dir="/tmp")
            self.stats_socket = os.path.join(self._socket_dir, "stats.sock")
        self.servers = [f"h{index}" for index in range(len(hosts))]
        with open(self.config_path, "w") as f:
            f.write(haproxy_config([("127.0.0.1", line, web) for line, web in hosts], line_port, web_port,
                                   stats_socket=self.stats_socket, inter_ms=inter_ms, fall=fall, rise=rise,
                                   tls_cert=tls_cert))
        self.proc: subprocess.Popen | None = None
        #: Older haproxy processes a reload left serving their connections (they exit when the last ends).
        self.draining: list[subprocess.Popen] = []

    def start(self) -> "HAProxy":
        """Check the config, start haproxy, and wait until its stats socket answers (it binds its
        ports before it serves that socket; a probe connection to them would reach a chatd)."""
        return self._launch([])

    def reload(self) -> "HAProxy":
        """What ``systemctl reload haproxy`` does: a new haproxy takes the ports (``-sf``: the old
        one is told to stop listening, and keeps serving the connections it has until each ends,
        with the configuration it had). The old process is kept to be ended by :meth:`close`."""
        old = self.proc
        self.draining.append(old)  # first: close() ends it too should the new one fail to start
        return self._launch(["-sf", str(old.pid)])

    def _launch(self, extra: list[str]) -> "HAProxy":
        checked = subprocess.run([self.binary, "-c", "-f", self.config_path], capture_output=True, text=True,
                                 timeout=30)
        if checked.returncode != 0:
            raise Error("invalid", f"haproxy -c rejects {self.config_path}: "
                                   f"{(checked.stdout + checked.stderr).strip()[-2000:]}")
        os.makedirs(os.path.dirname(self.stats_socket), exist_ok=True)  # a restart after close() too
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([self.binary, "-db", "-f", self.config_path, *extra], stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                                         preexec_fn=die_with_parent)
        deadline = time.monotonic() + self.timeout
        while not self._stats_answer():
            if self.proc.poll() is not None:
                raise Error("exited", f"haproxy exited with status {self.proc.returncode}; its log "
                                      f"{self.log_path} says: {self.log_tail()[-1000:]}")
            if time.monotonic() > deadline:
                self.close()
                raise Error("timeout", f"timed out after {self.timeout:.0f} s waiting for haproxy's stats socket "
                                       f"{self.stats_socket}; see {self.log_path}")
            time.sleep(0.05)
        return self

    def _stats_answer(self) -> bool:
        """Whether the stats socket answers, and from the haproxy just started (after a reload the
        old one answers there until the new one takes the path over)."""
        try:
            return f"\nPid: {self.proc.pid}\n" in "\n" + self.command("show info")
        except OSError:
            return False

    def command(self, line: str) -> str:
        """One command on the stats socket (``show stat``, ``show servers state`` …), its whole answer."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.stats_socket)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[tuple[str, str], str]:
        """(backend, server) -> its state as HAProxy's checks see it: ``UP``, ``DOWN``, ``UP 1/2`` …"""
        text = self.command("show stat").lstrip("# ")
        return {(row["pxname"], row["svname"]): row["status"] for row in csv.DictReader(io.StringIO(text))
                if row["svname"] in self.servers}

    def host_state(self, index: int) -> set[str]:
        """The states host ``index`` has in the backends (one value when both agree)."""
        return {state for (backend, server), state in self.states().items() if server == f"h{index}"}

    def log_tail(self, size: int = 4000) -> str:
        return log_tail(self.log_path, size)

    def close(self) -> None:
        """End haproxy (SIGTERM: it stops at once; SIGKILL if it does not) and reap it, and any
        older one still serving its connections after a :meth:`reload`. Safe twice."""
        stop([self.proc, *self.draining])
        self.proc = None
        self.draining = []
        if self._socket_dir is not None and os.path.isdir(self._socket_dir):
            shutil.rmtree(self._socket_dir, ignore_errors=True)
