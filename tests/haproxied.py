"""chatd hosts behind a real HAProxy, shared by the process and browser tests (not part of the product).

:func:`hosts_behind_haproxy`: three chatd hosts (each its own holderd and journal)
over a real 3-node NATS JetStream cluster, and Debian's haproxy in front with the
README's configuration but faster checks (so that a test is short); every process
is ended when it exits, failed or not, and the logs are printed if the test failed.
:func:`only` steers new connections to one host (the others drained through
HAProxy's admin socket, as an operator does); :func:`host_of` says where a nick is served.
"""

from __future__ import annotations

import contextlib

from ctl.haproxy import HAProxy
from ctl.hosts import Hosts
from ctl.launch import wait_until
from fdkeep.errors import Error
from helpers import free_port, require_haproxy, require_nats

#: Seconds a lost host keeps its nicks: short, so that a client without a session gets its nick
#: back soon, yet longer than a client with one takes to resume through HAProxy (a session taken
#: over past the lease is shown gone to its peer meanwhile).
LEASE = 6.0
#: Checks every 300 ms, out after 2 failures, back after 2 successes (the README's: 2 s, 3, 2).
INTER_MS, FALL, RISE = 300, 2, 2
TIMEOUT = 15


@contextlib.contextmanager
def hosts_behind_haproxy(tmp_path, request, hosts: int = 3, chatd_args: tuple[str, ...] = (), lease: float = LEASE):
    """``(cluster, proxy)``: ``hosts`` chatd hosts (``chatd_args``: more options for each chatd) and a 3-node
    NATS cluster in ``tmp_path``, HAProxy in front, every host UP; all ended on exit (``request``: the
    test's, to print the logs if it failed; the logs stay in ``tmp_path``)."""
    require_nats()
    require_haproxy()
    cluster = Hosts(hosts, 3, lease=lease, workdir=str(tmp_path / "hosts"), chatd_args=chatd_args)
    proxy = None
    try:
        cluster.start()
        line_port = free_port()
        web_port = free_port()
        while web_port == line_port:
            web_port = free_port()
        proxy = HAProxy(str(tmp_path / "haproxy"), [(host.port, host.http_port) for host in cluster.hosts],
                        line_port, web_port, inter_ms=INTER_MS, fall=FALL, rise=RISE).start()
        wait_until(lambda: set(proxy.states().values()) == {"UP"}, TIMEOUT, "HAProxy to see every host UP")
        yield cluster, proxy
    finally:
        if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
            print(cluster.logs()[-20000:])
            if proxy is not None:
                print(f"=== haproxy\n{proxy.log_tail(8000)}")
        if proxy is not None:
            proxy.close()
        cluster.close()


@contextlib.contextmanager
def only(proxy: HAProxy, backend: str, index: int):
    """New connections to ``backend`` go to host ``index`` alone while inside (the others drained)."""
    others = [server for server in proxy.servers if server != f"h{index}"]
    for server in others:
        proxy.command(f"set server {backend}/{server} state drain")
    try:
        yield
    finally:
        for server in others:
            proxy.command(f"set server {backend}/{server} state ready")


def host_of(cluster: Hosts, nick: str) -> int | None:
    """The host whose chatd has a client named ``nick`` (hosts that do not answer are skipped)."""
    for index, host in enumerate(cluster.hosts):
        try:
            rows = host.control("clients")["clients"]
        except Error:
            continue
        if any(row["nick"] == nick for row in rows):
            return index
    return None
