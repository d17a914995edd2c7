"""chatd's listening sockets: the one owner of the ports clients connect to.

Theory of operation
-------------------
:class:`Listeners` keeps one listening socket per protocol its clients speak:
``line`` (the line port) and ``websocket`` (the web port). They are kept like
every client socket, in every holder (names :data:`LISTEN_NAMES`), so a port
stays open across a crash and clients queue in its backlog meanwhile. A fresh
start binds them (:meth:`Listeners.open`); a restore adopts the kept ones
(:meth:`Listeners.adopt`) and then listens where the options say
(:meth:`Listeners.move_where_told`): an address that changed takes effect, and
the clients connected through the old listener keep their connections.

It accepts clients at most :data:`ACCEPT_BATCH` a turn of the loop, so that a
crowd connecting at once does not keep the clients already served waiting; each
socket accepted goes to ``on_client(sock, peer, protocol)``, whose owner (the
server) decides whether to serve it. Out of fds, accepting pauses for a moment
and says so once (:class:`fdkeep.loop.AcceptPause`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time
from typing import Callable

from fdkeep.loop import AcceptPause, Loop

from . import faults
from .holders import LISTEN_NAME, LISTEN_WEB_NAME, Holders, Item
from .protocols import refusal

log = logging.getLogger("chatd")

#: Connections accepted in one turn of the loop, at most.
ACCEPT_BATCH = 16
#: How long accepting stops when accept() fails (out of fds).
ACCEPT_PAUSE = 0.5
#: Each listening socket's name in the holders, by the protocol its clients speak.
LISTEN_NAMES = {"line": LISTEN_NAME, "websocket": LISTEN_WEB_NAME}
#: How long a restored chatd told to listen on another address of the same port waits for the
#: copies of the old listener to close (see Listeners.move_where_told).
RELISTEN_TIMEOUT = 3.0


class Listeners:
    def __init__(self, loop: Loop, holders: Holders, on_client: Callable[[socket.socket, tuple, str], None],
                 describe_clients: Callable[[], str], keep_alive: Callable[[], None]):
        """``describe_clients()``: e.g. "12 clients", for the log; ``keep_alive()``: called while
        waiting for a port (systemd's watchdog)."""
        self.holders = holders
        self._on_client = on_client
        self._describe_clients = describe_clients
        self._keep_alive = keep_alive
        #: The listening sockets, by the protocol their clients speak.
        self.sockets: dict[str, socket.socket] = {}
        self.accepting = AcceptPause(loop, log, "clients", ACCEPT_PAUSE)

    # -- what they are ---------------------------------------------------------------------
    @property
    def line(self) -> socket.socket | None:
        """The line port's listening socket (None before chatd serves)."""
        return self.sockets.get("line")

    @property
    def port(self) -> int | None:
        return self.line.getsockname()[1] if self.line else None

    @property
    def http_port(self) -> int | None:
        web = self.sockets.get("websocket")
        return web.getsockname()[1] if web else None

    def items(self) -> list[Item]:
        """What the holders keep of them."""
        return [(LISTEN_NAMES[protocol], b"{}", listener.fileno()) for protocol, listener in self.sockets.items()]

    # -- having them -----------------------------------------------------------------------
    def open(self, host: str, port: int, http_port: int | None) -> None:
        """A fresh start: bind both (the web port unless ``http_port`` is None), or neither."""
        opened = {}
        try:
            opened["line"] = listen_tcp(host, port)
            if http_port is not None:
                opened["websocket"] = listen_tcp(host, http_port)
        except OSError:
            for listener in opened.values():
                listener.close()
            raise
        for protocol, listener in opened.items():
            self.adopt(listener, protocol)

    def adopt(self, listener: socket.socket, protocol: str = "line") -> None:
        """Accept clients of ``protocol`` on ``listener`` (a new one, or one the holders kept)."""
        listener.setblocking(False)
        self.sockets[protocol] = listener
        self.accepting.add(listener.fileno(), lambda mask: self.accept(protocol))

    def move_where_told(self, host: str, port: int, http_port: int | None) -> None:
        """After a restore: listen where the options say, not only where the kept listeners are.

        A kept listening socket is used as it is if its address is the one asked for
        (port 0, "any free port", asks for the kept one). Otherwise chatd listens on the
        new address, keeps that socket in every holder under the listener's name (which
        replaces the old one there), and closes the old one: clients connected through it
        keep their connections, each a socket of its own; only clients in the old one's
        backlog at that moment are accepted first. ``http_port`` None: no web port.
        If the new address cannot be had, chatd goes on with the old one, and says so.
        """
        self._move("line", host, port, "--host/--port")
        if http_port is not None:
            self._move("websocket", host, http_port, "--host/--http-port")
        elif "websocket" in self.sockets:
            listener = self._stop("websocket")
            self.holders.remove([LISTEN_WEB_NAME])
            log.info("no longer listening for the web on %s (--http-port -1); the %s connected keep their "
                     "connections", _address(listener.getsockname()), self._describe_clients())
            listener.close()

    def _move(self, protocol: str, host: str, port: int, options: str) -> None:
        kept = self.sockets.get(protocol)
        if kept is not None and _is_address(kept, host, port):
            return
        try:
            fresh = listen_tcp(host, port)
        except OSError as exc:
            if kept is None:
                raise
            if exc.errno != errno.EADDRINUSE or port != kept.getsockname()[1]:
                log.error("cannot listen on %s (%s changed): %s; still listening on %s",
                          _address((host, port)), options, exc.strerror or exc, _address(kept.getsockname()))
                return
            fresh = None  # the kept listener holds the port on another address: it must go first
        old = None
        if kept is not None:
            old = kept.getsockname()
            self._stop(protocol)
        if fresh is None:
            self.holders.remove([LISTEN_NAMES[protocol]])
            kept.close()
            fresh = self._listen_once_released(host, port, old)
        self.adopt(fresh, protocol)
        self.holders.store(self.items())  # under the listener's name: the old one goes
        if kept is not None:
            kept.close()
        what = "listening" if protocol == "line" else "web"
        if old is None:
            log.info("%s on %s", what, _address(fresh.getsockname()))
        else:
            log.info("%s on %s instead of %s (%s changed); the %s connected keep their connections", what,
                     _address(fresh.getsockname()), _address(old), options, self._describe_clients())

    def _stop(self, protocol: str) -> socket.socket:
        """Take in what waits in the backlog of ``protocol``'s listener, and stop watching it."""
        self.accept(protocol, until_empty=True)
        listener = self.sockets.pop(protocol)
        self.accepting.remove(listener.fileno())
        return listener

    def _listen_once_released(self, host: str, port: int, old: tuple) -> socket.socket:
        """The port on a new address, once the copies of the old listener are closed: the
        holders' (systemd closes its own a moment after it is told), and the store of the
        other chatd taking turns, which it empties as it stands by. Failing that, the old address."""
        deadline = time.monotonic() + RELISTEN_TIMEOUT
        while True:
            try:
                return listen_tcp(host, port)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    log.error("cannot listen on %s: %s; back on %s", _address((host, port)),
                              exc.strerror or exc, _address(old))
                    return listen_tcp(old[0], old[1])
            self._keep_alive()
            time.sleep(0.02)

    # -- accepting -------------------------------------------------------------------------
    def accept(self, protocol: str, until_empty: bool = False) -> None:
        # At most ACCEPT_BATCH a turn: the listener stays readable, and the clients already
        # served get their turn in between, however many connect at once.
        listener = self.sockets[protocol]
        for _ in range(1 << 30 if until_empty else ACCEPT_BATCH):
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.accepting.failed(exc, f" with {self._describe_clients()}")
                return
            self.accepting.accepted()
            faults.reached("after-accept")
            self._on_client(sock, peer, protocol)


def refuse(sock: socket.socket, protocol: str, code: str) -> None:
    """Tell a client accepted and not served why (in its protocol's words), and close it."""
    try:
        sock.send(refusal(protocol, code))
    except OSError:
        pass
    sock.close()


def _address(sockname: tuple) -> str:
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_address(listener: socket.socket, host: str, port: int) -> bool:
    """Whether ``listener`` is bound where ``listen_tcp(host, port)`` would bind (port 0: any)."""
    bound_host, bound_port = listener.getsockname()[:2]
    if port and port != bound_port:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if listener.family != family:
        return False
    try:
        wanted = socket.getaddrinfo(host or None, None, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)[0][4][0]
        return ipaddress.ip_address(wanted) == ipaddress.ip_address(bound_host)
    except (OSError, ValueError):
        return False  # an unresolvable name: binding it says why


def listen_tcp(host: str, port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        # A fresh start after a crash must not wait for TIME_WAIT sockets to expire.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(4096)  # capped by net.core.somaxconn; clients queue here during a crash gap
    except OSError:
        listener.close()
        raise
    return listener
