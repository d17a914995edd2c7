"""Frame connections on UNIX sockets: the server side on a loop, the blocking client side.

Theory of operation
-------------------
:class:`FramePeer` is the server side of one frame connection (holderd's
clients, chatd's control clients). It reads whatever arrives into a
:class:`~fdkeep.frames.FrameDecoder`, hands each complete frame to a callback,
and queues replies with their descriptors in an :class:`OutputQueue` until the
socket takes them. A reply's descriptors are closed once sent, because replies
carry duplicates. A peer that breaks the wire format gets one error frame; if
the stream can no longer be trusted (a fatal error) it is disconnected after
that frame.

:class:`OutputQueue` is the one capped output queue of the project: every
non-blocking writer (a frame peer, a chat client's connection) queues into one
and flushes it when the loop says the socket is writable. The cap turns a peer
that stops reading into a decision for its owner instead of unbounded memory.
:class:`Channel` is what both have in common: a non-blocking socket on the
loop that reads when readable and flushes its output when writable.

:class:`FrameSocket` is the blocking client side, for command-line tools and
libraries: send a frame, receive frames. :func:`listen_unix` makes the
listening socket both daemons serve on, the same way for both.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from collections import deque
from typing import Callable

from .errors import Error
from .fdpass import close_fds, recv_with_fds, send_with_fds
from .frames import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame
from .loop import HANGUP, IN, OUT, Loop
from .paths import prepare_socket_path

log = logging.getLogger(__name__)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    """A non-blocking UNIX stream listener at ``path``, open to every local user.

    File modes do not decide who is served: the daemon checks each peer's uid
    (:func:`peer_credentials`) itself, so the socket is 0666.
    """
    prepare_socket_path(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(backlog)
    except OSError:
        listener.close()
        raise
    listener.setblocking(False)
    return listener


class OutputQueue:
    """Bytes waiting for a non-blocking socket, descriptors riding with their first byte.

    Capped at ``limit`` bytes: :meth:`append` refuses (returns False) rather
    than grow past it, and the owner decides what to do with a peer that does
    not read. Descriptors are closed once sent, or when the queue is cleared.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._chunks: deque[tuple[memoryview, list[int]]] = deque()
        self.pending = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, data: bytes, fds=()) -> bool:
        if self.pending + len(data) > self.limit:
            close_fds(fds)
            return False
        self._chunks.append((memoryview(data), list(fds)))
        self.pending += len(data)
        return True

    def flush(self, sock: socket.socket) -> bool:
        """Send what the socket takes now; True once nothing is left. Raises OSError."""
        while self._chunks:
            data, fds = self._chunks[0]
            try:
                sent = send_with_fds(sock, data, fds)
            except (BlockingIOError, InterruptedError):
                return False
            if fds:
                close_fds(fds)
            self.pending -= sent
            if sent < len(data):
                self._chunks[0] = (data[sent:], [])
                return False
            self._chunks.popleft()
        return True

    def clear(self) -> None:
        for _, fds in self._chunks:
            close_fds(fds)
        self._chunks.clear()
        self.pending = 0


class Channel:
    """A non-blocking socket on the loop: it reads when readable and flushes its
    output when writable; subclasses say what reading means.

    The output is anything with ``flush(sock) -> bool`` (True once empty),
    ``clear()`` and truth (something to send), an :class:`OutputQueue` by
    default. After a write fails the output is dropped and
    :meth:`_write_failed` decides the rest.

    Reading can be switched off (:meth:`set_reading`) while the owner cannot
    take more input: then the socket is watched only for writability (and
    hang-ups, which epoll always reports: :meth:`_hung_up` hears them).
    """

    def __init__(self, loop: Loop, sock: socket.socket, output):
        self.loop = loop
        self.sock = sock
        self.output = output
        self.closed = False
        self.reading = True
        sock.setblocking(False)
        loop.add(sock.fileno(), IN, self._on_event)

    def _on_event(self, mask: int) -> None:
        if mask & (IN | HANGUP):
            if self.reading:
                self._readable()
            elif mask & HANGUP:
                self._hung_up()
        if not self.closed and mask & OUT:
            self._flush()

    def _readable(self) -> None:
        raise NotImplementedError

    def _hung_up(self) -> None:
        """The socket hung up while not reading (the default closes it)."""
        self.close()

    def _write_failed(self, exc: OSError) -> None:
        """A write failed (the output is dropped already); EPIPE/ECONNRESET are a peer gone."""

    def set_reading(self, reading: bool) -> None:
        if reading != self.reading and not self.closed:
            self.reading = reading
            self._watch(not self.output)

    def _watch(self, done: bool) -> None:
        self.loop.modify(self.sock.fileno(), (IN if self.reading else 0) | (0 if done else OUT))

    def _flush(self) -> bool:
        """Send what the socket takes; True once nothing is left (or nothing can be sent)."""
        if self.closed:
            return True
        try:
            done = self.output.flush(self.sock)
        except OSError as exc:
            self.output.clear()
            self._write_failed(exc)
            if self.closed:
                return True
            done = True
        self._watch(done)
        return done

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.sock.fileno())
        self.output.clear()
        self.sock.close()


class FramePeer(Channel):
    """One non-blocking frame connection, owned by a server running a :class:`~fdkeep.loop.Loop`."""

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
        self.pid, self.uid, self.gid = peer_credentials(sock)
        self._on_frame = on_frame
        self._on_close = on_close
        self._decoder = FrameDecoder(max_frame)
        self._closing = False
        super().__init__(loop, sock, OutputQueue(self.MAX_PENDING_OUTPUT))

    def __repr__(self) -> str:
        return f"<peer pid={self.pid} uid={self.uid}>"

    def send(self, body: dict, fds=()) -> None:
        """Queue a frame; ``fds`` are sent with it and then closed."""
        if self.closed:
            close_fds(fds)
            return
        if not self.output.append(encode_frame(body, len(fds)), fds):
            log.warning("%r does not read its replies; disconnecting it", self)
            self.close()
            return
        self._flush()

    def close_after_flush(self) -> None:
        self._closing = True
        self._flush()

    def _readable(self) -> None:
        try:
            data, fds = recv_with_fds(self.sock)
        except (BlockingIOError, InterruptedError):
            return
        except Error as exc:
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
            except Error as exc:
                self._refuse(exc)
                if exc.fatal:
                    return
                continue
            if frame is None:
                return
            self._on_frame(self, frame.body, frame.fds)

    def _refuse(self, exc: Error) -> None:
        log.warning("%r sent a bad frame: %s", self, exc.message)
        self.send(exc.as_reply())
        if exc.fatal:
            self.close_after_flush()

    def _write_failed(self, exc: OSError) -> None:
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("%r: write failed (%s); closing", self, exc)
        self.close()

    def _flush(self) -> bool:
        done = super()._flush()
        if done and self._closing:
            self.close()
        return done

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        self._decoder.close()
        self._on_close(self)


def send_frame(sock: socket.socket, body: dict, fds=()) -> None:
    """Send one frame on a blocking socket, its descriptors with its first byte."""
    data = memoryview(encode_frame(body, len(fds)))
    sent = send_with_fds(sock, data, fds)
    while sent < len(data):
        sent += sock.send(data[sent:])


class FrameSocket:
    """A blocking frame connection: the client side of holderd and of chatd's control socket."""

    def __init__(
        self,
        path: str,
        timeout: float | None = 10.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        sock: socket.socket | None = None,
    ):
        """Connect to ``path``, or speak frames on ``sock`` if one is given."""
        self.path = path
        self.sock = sock or socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if sock is None:
            self.sock.settimeout(timeout)
            try:
                self.sock.connect(path)
            except OSError:
                self.sock.close()
                raise
        self._decoder = FrameDecoder(max_frame)

    def send(self, body: dict, fds=()) -> None:
        send_frame(self.sock, body, fds)

    def receive(self) -> Frame:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                return frame
            data, fds = recv_with_fds(self.sock)
            if not data:
                close_fds(fds)
                raise ConnectionError(f"{self.path} closed the connection")
            self._decoder.feed(data, fds)

    def close(self) -> None:
        self._decoder.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
