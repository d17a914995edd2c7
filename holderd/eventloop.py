"""The small event loop both daemons run on, and a non-blocking frame peer.

Theory of operation
-------------------
:class:`Loop` is a thin layer over ``epoll``: a callback per descriptor, called
with the event mask. It exists instead of :mod:`selectors` because holderd must
watch held sockets for hang-ups only, which is an epoll registration with an
empty event mask (EPOLLHUP and EPOLLERR are always reported); selectors cannot
express that.

:class:`FramePeer` is the server side of one frame connection (holderd's
clients, chatd's control clients): it reads whatever arrives into a
:class:`~holderd.wire.FrameDecoder`, hands complete frames to a callback, and
queues replies with their descriptors until the socket takes them. A reply's
descriptors are closed once sent, because replies carry duplicates.
"""

from __future__ import annotations

import array
import errno
import logging
import resource
import select
import signal
import socket
import struct
from collections import deque
from typing import Callable

from .wire import DEFAULT_MAX_FRAME, FrameDecoder, WireError, close_fds, encode_frame, recv_chunk

log = logging.getLogger(__name__)

IN = select.EPOLLIN
OUT = select.EPOLLOUT
HANGUP = select.EPOLLHUP | select.EPOLLERR


class Loop:
    def __init__(self):
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}

    def add(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def watching(self, fd: int) -> bool:
        return fd in self._callbacks

    def run_once(self, timeout: float | None = None) -> None:
        try:
            events = self._epoll.poll(-1 if timeout is None else timeout)
        except InterruptedError:
            return
        for fd, mask in events:
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(mask)

    def close(self) -> None:
        self._epoll.close()


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class FramePeer:
    """One non-blocking frame connection, owned by a server running a :class:`Loop`."""

    #: A peer that stops reading may not make us buffer more than this.
    MAX_PENDING_OUTPUT = 64 << 20

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        on_frame: Callable[["FramePeer", dict, list[int]], None],
        on_close: Callable[["FramePeer"], None],
        max_frame: int = DEFAULT_MAX_FRAME,
    ):
        self.loop = loop
        self.sock = sock
        self.sock.setblocking(False)
        self.pid, self.uid, self.gid = peer_credentials(sock)
        self._on_frame = on_frame
        self._on_close = on_close
        self._decoder = FrameDecoder(max_frame)
        self._output: deque[tuple[memoryview, list[int]]] = deque()
        self._pending_bytes = 0
        self._closing = False
        self.closed = False
        loop.add(sock.fileno(), IN, self._on_event)

    def __repr__(self) -> str:
        return f"<peer pid={self.pid} uid={self.uid}>"

    def send(self, body: dict, fds=()) -> None:
        """Queue a frame; ``fds`` are sent with it and then closed."""
        if self.closed:
            close_fds(fds)
            return
        data = memoryview(encode_frame(body, len(fds)))
        self._output.append((data, list(fds)))
        self._pending_bytes += len(data)
        if self._pending_bytes > self.MAX_PENDING_OUTPUT:
            log.warning("%r does not read its replies; disconnecting it", self)
            self.close()
            return
        self._flush()

    def close_after_flush(self) -> None:
        self._closing = True
        self._flush()

    def _on_event(self, mask: int) -> None:
        if mask & (IN | HANGUP):
            self._read()
        if not self.closed and mask & OUT:
            self._flush()

    def _read(self) -> None:
        try:
            data, fds = recv_chunk(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except WireError as exc:
            self._refuse(exc)
            return
        except OSError as exc:
            log.info("%r: read failed (%s); closing", self, exc)
            self.close()
            return
        if not data:
            close_fds(fds)
            self.close()
            return
        self._decoder.feed(data, fds)
        while not self.closed and not self._closing:
            try:
                frame = self._decoder.next_frame()
            except WireError as exc:
                self._refuse(exc)
                if exc.fatal:
                    return
                continue
            if frame is None:
                return
            self._on_frame(self, frame.body, frame.fds)

    def _refuse(self, exc: WireError) -> None:
        log.warning("%r sent a bad frame: %s", self, exc.message)
        self.send({"id": None, "ok": False, "error": exc.code, "message": exc.message})
        if exc.fatal:
            self.close_after_flush()

    def _flush(self) -> None:
        while self._output and not self.closed:
            data, fds = self._output[0]
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg([data], ancillary)
                    close_fds(fds)
                else:
                    sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.info("%r: write failed (%s); closing", self, exc)
                self.close()
                return
            self._pending_bytes -= sent
            if sent < len(data):
                self._output[0] = (data[sent:], [])
            else:
                self._output.popleft()
        if self.closed:
            return
        if self._output:
            self.loop.modify(self.sock.fileno(), IN | OUT)
        elif self._closing:
            self.close()
        else:
            self.loop.modify(self.sock.fileno(), IN)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.sock.fileno())
        for _, fds in self._output:
            close_fds(fds)
        self._output.clear()
        self._decoder.close()
        self.sock.close()
        self._on_close(self)


def stop_on_signals(logger: logging.Logger) -> None:
    """SIGTERM and SIGINT end the daemon's loop by raising SystemExit.

    Raising is needed: Python retries an epoll interrupted by a signal, so a flag
    set in a handler would not be seen until the next event.
    """

    def stop(signum, frame):
        logger.info("%s: stopping", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one: holding sockets is the job."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
