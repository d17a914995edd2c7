"""A TCP proxy on loopback that cuts every connection through it when a test says so.

Theory of operation
-------------------
:class:`CuttingProxy` listens on ``127.0.0.1`` (a free port) and forwards each
connection it accepts to a target on loopback (chatd's web or line port), both
ways, on one thread with a selector. A test points its client (a browser page,
a line client) at :attr:`CuttingProxy.port` and calls :meth:`CuttingProxy.cut`
to end every connection open at that moment in one of the ways networks end
them (:class:`Cut`):

- ``RESET``: both sides get a TCP reset (``SO_LINGER`` 0, then close), as when
  a proxy in front restarts or a NAT forgets.
- ``CLIENT_SILENT``: half-open, the client's side goes silent: the server's
  side is closed (chatd reads EOF) and the client's socket stays open but
  nothing more comes through it, in either direction; the client finds out only
  by its own timeout (a phone that left the Wi-Fi).
- ``SERVER_SILENT``: half-open the other way: the client's side is closed (the
  client sees the connection end) and chatd's side stays open but silent, until
  chatd closes it (a resume on a new connection replaces it).

A silenced socket is still read, and what comes is thrown away (nothing
forwarded): that is how the proxy sees its owner close it and lets it go.
Connections accepted after a cut are forwarded as usual.

Bounded: at most ``max_connections`` at once (more are closed on accept), at
most ``BUFFER`` bytes waiting per direction (past it the proxy stops reading
that side: TCP's flow control holds the sender back), and :meth:`close` closes
every socket and joins the thread. The thread is the only owner of the
sockets; :meth:`cut` hands it a request and waits until it is done, so when
``cut`` returns every connection open before it has been cut.
"""

from __future__ import annotations

import enum
import queue
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field

BUFFER = 256 * 1024


class Cut(enum.Enum):
    RESET = "reset"
    CLIENT_SILENT = "client-silent"
    SERVER_SILENT = "server-silent"


@dataclass
class _Side:
    sock: socket.socket
    #: bytes read from the other side, to be written to this one
    pending: bytearray = field(default_factory=bytearray)
    #: cut: read and thrown away, nothing written
    silent: bool = False
    #: this side sent its FIN: not read any more
    eof: bool = False
    #: the write half was shut (after the other side's FIN, once pending was written)
    shut: bool = False


@dataclass
class _Link:
    client: _Side
    server: _Side

    def other(self, side: _Side) -> _Side:
        return self.server if side is self.client else self.client


class CuttingProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", max_connections: int = 64):
        if target_host not in ("127.0.0.1", "::1", "localhost"):
            raise ValueError(f"the proxy forwards to loopback only, not {target_host!r}")
        self.target = (target_host, target_port)
        self.max_connections = max_connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.cuts: dict[Cut, int] = {how: 0 for how in Cut}
        self._selector = selectors.DefaultSelector()
        self._links: list[_Link] = []
        self._requests: queue.Queue = queue.Queue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._selector.register(self.listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"cutproxy:{self.port}", daemon=True)
        self._thread.start()

    def __enter__(self) -> "CuttingProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the test's side ---------------------------------------------------------------------
    def cut(self, how: Cut, timeout: float = 5.0) -> int:
        """Cut every connection open now, ``how``; returns how many were cut."""
        done: queue.Queue = queue.Queue()
        self._requests.put((how, done))
        self._wake_writer.send(b"x")
        try:
            return done.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError("the proxy's thread did not answer a cut: is it alive?") from None

    def connections(self) -> int:
        """How many connections forward (neither side silenced), as last seen by the thread."""
        return sum(1 for link in list(self._links) if not (link.client.silent or link.server.silent))

    def close(self) -> None:
        self._stopping = True
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        self._thread.join(10)
        self._wake_writer.close()

    # -- the thread ----------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        self._wake()
                    else:
                        # A cut earlier in this batch may have closed this side already.
                        link, side = key.data
                        if events & selectors.EVENT_READ and self._live(link, side):
                            self._read(link, side)
                        if events & selectors.EVENT_WRITE and self._live(link, side):
                            self._write(link, side)
        finally:
            for link in list(self._links):
                self._drop(link)
            self._selector.close()
            self.listener.close()
            self._wake_reader.close()

    def _live(self, link: _Link, side: _Side) -> bool:
        return link in self._links and side.sock.fileno() >= 0

    def _wake(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except BlockingIOError:
            pass
        while True:
            try:
                how, done = self._requests.get_nowait()
            except queue.Empty:
                return
            done.put(self._cut_all(how))

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        if len(self._links) >= self.max_connections:
            client.close()
            return
        try:
            server = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()  # as the target would: nothing listens there
            return
        self.accepted += 1
        for sock in (client, server):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = _Link(_Side(client), _Side(server))
        self._links.append(link)
        self._watch(link)

    def _watch(self, link: _Link) -> None:
        """(Re-)register both sides for what they need now."""
        for side in (link.client, link.server):
            if side.sock.fileno() < 0:
                continue
            other = link.other(side)
            events = 0
            if not side.eof and (side.silent or len(other.pending) < BUFFER):
                events |= selectors.EVENT_READ
            if side.pending and not side.silent:
                events |= selectors.EVENT_WRITE
            registered = self._registered(side)
            if events and registered:
                self._selector.modify(side.sock, events, (link, side))
            elif events:
                self._selector.register(side.sock, events, (link, side))
            elif registered:
                self._selector.unregister(side.sock)

    def _registered(self, side: _Side) -> bool:
        try:
            self._selector.get_key(side.sock)
            return True
        except (KeyError, ValueError):
            return False

    def _read(self, link: _Link, side: _Side) -> None:
        try:
            data = side.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(link)  # reset: the other side's is not ours to keep
            return
        other = link.other(side)
        if side.silent:
            if not data:
                self._drop(link)  # its owner closed it: nothing left to keep
            return
        if data:
            other.pending += data
            self._write(link, other)
            return
        # A FIN: passed on once what this side sent before it is written.
        side.eof = True
        if other.silent or other.sock.fileno() < 0:
            self._drop(link)
            return
        self._write(link, other)

    def _write(self, link: _Link, side: _Side) -> None:
        other = link.other(side)
        if side.pending and not side.silent:
            try:
                sent = side.sock.send(side.pending)
                del side.pending[:sent]
            except BlockingIOError:
                pass
            except OSError:
                self._drop(link)
                return
        if other.eof and not side.pending and not side.shut:
            side.shut = True
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if link.client.shut and link.server.shut:
            self._drop(link)  # both ways finished: the connection ended as its ends wanted
        elif link in self._links:
            self._watch(link)

    def _cut_all(self, how: Cut) -> int:
        live = [link for link in self._links if not (link.client.silent or link.server.silent)]
        for link in live:
            if how is Cut.RESET:
                for side in (link.client, link.server):
                    side.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self._drop(link)
                continue
            closed, silent = (link.server, link.client) if how is Cut.CLIENT_SILENT else (link.client, link.server)
            self._close(closed)
            silent.silent = True
            silent.pending.clear()
            self._watch(link)
        self.cuts[how] += len(live)
        return len(live)

    def _close(self, side: _Side) -> None:
        if self._registered(side):
            self._selector.unregister(side.sock)
        side.sock.close()

    def _drop(self, link: _Link) -> None:
        if link not in self._links:
            return
        self._links.remove(link)
        for side in (link.client, link.server):
            if side.sock.fileno() >= 0:
                self._close(side)
