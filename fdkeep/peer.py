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

A peer is served one request at a time, and only while it reads what it is
sent. Frames are taken from it (and its socket is read) only while its owner
does not :meth:`~FramePeer.hold` it (holderd holds a peer while a reply it
streams waits for room) and while less than :attr:`FramePeer.HIGH_WATER` bytes
wait to be sent to it. Otherwise its requests wait in its own socket, and the
kernel's flow control slows it down: a peer that pipelines requests and reads
no replies costs a bounded amount, not a growing queue. Its owner learns when
room comes back (``on_drain``) and what it keeps parked in frames begun and
not finished (``on_parked``, after each read), and a frame begun must be whole
within the peer's ``frame_timeout``: the peer arms a loop timer when a frame
begins and cancels it when none is under way, so no owner sweeps its peers.

Descriptors sent to a peer are not gone from the world when they leave our
queue: until the peer reads them they are in flight in its socket, where the
kernel counts them against the sender (``RLIMIT_NOFILE`` of fds in flight per
user). :attr:`FramePeer.unread_fds` counts both: the queued ones, and those
sent since the socket's send queue (``SIOCOUTQ``) was last seen empty, which
the peer may not have read. While the peer is not read from and nothing is
queued but such fds are in flight, its socket is watched for ``EPOLLOUT``
edge-triggered: the kernel wakes a writer each time its peer consumes one of
its messages, so the peer's reading is seen the moment it happens, at no cost
while it does not read. For the same reason a peer that is dropped
(:meth:`~FramePeer.drop`: a fatal error) lets go of what it parked at once but
keeps its socket, read from no more, until it has read the fds sent to it or
closed its end: only then are they no longer ours to count.

:class:`OutputQueue` is the one capped output queue of the project: every
non-blocking writer (a frame peer, a chat client's connection) queues into one
and flushes it when the loop says the socket is writable. The cap turns a peer
that stops reading into a decision for its owner instead of unbounded memory.
:class:`Channel` is what both have in common: a non-blocking socket on the
loop that reads when readable and flushes its output when writable.

:class:`FrameSocket` is the blocking client side, for command-line tools and
libraries: send a frame, receive frames. :func:`listen_unix` makes the
listening socket both daemons serve on, the same way for both;
:func:`peer_credentials` says who connected, and :func:`peer_pidfd` hears that
process exit, whoever keeps its socket.
"""

from __future__ import annotations

import array
import errno
import fcntl
import logging
import os
import select
import socket
import struct
import termios
from collections import deque
from typing import Callable

from .errors import Error
from .fdpass import close_fds, recv_with_fds, send_with_fds
from .frames import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame
from .logs import Offences
from .loop import HANGUP, IN, OUT, Loop, Timer
from .paths import prepare_socket_path

log = logging.getLogger(__name__)
offences = Offences(log)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a UNIX socket."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


#: Linux >= 6.5: a pidfd of the process that connected (77 on x86 and arm; Python 3.11 does not name it).
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def peer_pidfd(sock: socket.socket, pid: int) -> int:
    """A pidfd (readable once the process has exited) of the process that connected to ``sock``,
    whose ``SO_PEERCRED`` pid is ``pid``. ``SO_PEERPIDFD`` names that very process, whatever
    became of its pid since; where the kernel lacks it (before 6.5), ``pidfd_open(pid)``
    (Linux >= 5.3) does, if the pid was not reused meanwhile: open it while the peer is known to
    live (it just connected or asked). Raises ProcessLookupError if the process is gone and
    reaped already, another OSError if no pidfd can be had (ENOSYS: no pidfds here; EINVAL:
    its pid is not in our pid namespace)."""
    try:
        return sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ESRCH):  # what older kernels say of a reaped peer
            raise ProcessLookupError(errno.ESRCH, "the process that connected is gone") from None
        if exc.errno != errno.ENOPROTOOPT:
            raise
    if pid <= 0:
        raise OSError(errno.EINVAL, "the peer's pid is not in our pid namespace")
    return os.pidfd_open(pid)  # ESRCH is ProcessLookupError


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    """A non-blocking UNIX stream listener at ``path``, open to every local user.

    File modes do not decide who is served: the daemon checks each peer's uid
    (:func:`peer_credentials`) itself, so the socket is 0666. A socket file left
    by a process that died is replaced; one a live process listens on is not
    taken from it: that fails with ``EADDRINUSE``, naming the path.
    """
    if someone_listens(path):
        raise OSError(errno.EADDRINUSE, f"another process listens on {path}")
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


def someone_listens(path: str) -> bool:
    """Whether a live process accepts connections at ``path`` (False for a stale file or none)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:
        return True  # its backlog is full: alive, and busy
    except OSError:
        return False  # ECONNREFUSED: the file outlived its process; ENOENT, ENOTSOCK...
    finally:
        probe.close()
    return True


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
        #: Descriptors queued, and how many were ever sent.
        self.fds = 0
        self.sent_fds = 0

    def __bool__(self) -> bool:
        return bool(self._chunks)

    def append(self, data: bytes, fds=()) -> bool:
        if self.pending + len(data) > self.limit:
            close_fds(fds)
            return False
        self._chunks.append((memoryview(data), list(fds)))
        self.pending += len(data)
        self.fds += len(fds)
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
                self.fds -= len(fds)
                self.sent_fds += len(fds)
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
        self.fds = 0


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
        self._events = IN
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

    def _wanted(self, done: bool) -> int:
        """The events to watch for, ``done`` once the output is empty."""
        return (IN if self.reading else 0) | (0 if done else OUT)

    def _watch(self, done: bool) -> None:
        events = self._wanted(done)
        # Only a change is told to epoll: re-registering an edge-triggered mask
        # would report the socket's present state again, as a fresh edge.
        if events != self._events:
            self._events = events
            self.loop.modify(self.sock.fileno(), events)

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


def unsent_bytes(sock: socket.socket) -> int:
    """What the kernel keeps of what we sent on a UNIX stream socket and its peer has
    not read yet (``SIOCOUTQ``, in the kernel's own measure of buffers: 0 once all is read)."""
    value = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, value, True)
    return value[0]


class FramePeer(Channel):
    """One non-blocking frame connection, owned by a server running a :class:`~fdkeep.loop.Loop`."""

    #: A peer that stops reading may not make us buffer more than this.
    MAX_PENDING_OUTPUT = 64 << 20
    #: No frame is taken from a peer while more than this waits to be sent to it.
    HIGH_WATER = 256 << 10

    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        on_frame: Callable[["FramePeer", dict, list[int]], None],
        on_close: Callable[["FramePeer"], None],
        max_frame: int = DEFAULT_MAX_FRAME,
        on_drain: Callable[["FramePeer"], None] | None = None,
        on_parked: Callable[["FramePeer"], Error | None] | None = None,
        frame_timeout: tuple[float, str] | None = None,
        on_overdue: Callable[["FramePeer", Error], None] | None = None,
    ):
        """``on_drain(peer)``: what waits for the peer shrank (it read, or the socket took
        more). ``on_parked(peer)``: after each read, an Error to drop the peer with for
        what it keeps parked (:attr:`parked_bytes`, :attr:`parked_fds`), or None.
        ``frame_timeout``: (seconds, the setting's name for the message): a frame begun must
        be whole within that, or the peer is refused with a fatal ``timeout`` error, told to
        ``on_overdue(peer, error)`` first (to log it)."""
        self.pid, self.uid, self.gid = peer_credentials(sock)
        self._on_frame = on_frame
        self._on_close = on_close
        self._on_drain = on_drain
        self._on_parked = on_parked
        self._decoder = FrameDecoder(max_frame)
        self._closing = False
        self._dispatching = False
        #: The owner still answers a frame: take no other meanwhile.
        self.held = False
        #: Served no more (see :meth:`drop`).
        self.dropped = False
        #: Since when (loop clock) a frame begun and not complete is waited for; None if none is.
        self.partial_since: float | None = None
        self._frame_timeout = frame_timeout
        self._on_overdue = on_overdue
        self._deadline: Timer | None = None
        #: How many of the fds sent are known to have been read (see :attr:`unread_fds`).
        self._read_fds = 0
        super().__init__(loop, sock, OutputQueue(self.MAX_PENDING_OUTPUT))

    def __repr__(self) -> str:
        return f"<peer pid={self.pid} uid={self.uid}>"

    # -- what the peer costs us ----------------------------------------------------
    @property
    def unread_fds(self) -> int:
        """fds of our frames the peer has not read: queued here, or in flight in its socket."""
        self._see_reads()
        return self.output.fds + self.output.sent_fds - self._read_fds

    def _see_reads(self) -> None:
        # The kernel tells no count of fds read, but an empty send queue means all were.
        if self._read_fds < self.output.sent_fds and not self.closed and unsent_bytes(self.sock) == 0:
            self._read_fds = self.output.sent_fds

    @property
    def lagging(self) -> bool:
        """More than :attr:`HIGH_WATER` bytes wait to be sent to the peer."""
        return self.output.pending > self.HIGH_WATER

    @property
    def parked_bytes(self) -> int:
        """Bytes received and not yet handled: a frame begun, and frames waiting while held."""
        return self._decoder.pending_bytes

    @property
    def parked_fds(self) -> int:
        return self._decoder.pending_fds

    # -- sending ---------------------------------------------------------------------
    def send(self, body: dict, fds=()) -> None:
        """Queue a frame; ``fds`` are sent with it and then closed."""
        if self.closed:
            close_fds(fds)
            return
        if not self.output.append(encode_frame(body, len(fds)), fds):
            offences.warning((self.uid, "unread"), "%r does not read its replies; disconnecting it", self)
            self.close()
            return
        self._flush()

    def close_after_flush(self) -> None:
        self._closing = True
        self._flush()

    def refuse(self, exc: Error) -> None:
        """Send ``exc``; if it is fatal, :meth:`drop` the peer."""
        self.send(exc.as_reply())
        if exc.fatal:
            self.drop()

    def drop(self) -> None:
        """Serve the peer no more, and close it as soon as that frees all it costs: at once,
        unless fds we sent it are unread. Those count against us, queued or in flight in its
        socket, until it reads them or closes its end: until then the connection is kept (and
        counted by its owner), read from no more. We never wait for more than that: what we
        queued without fds may be lost to a peer that does not read."""
        self.dropped = True
        self._decoder.close()  # what it parked goes now
        self._dispatch()
        self._close_if_dropped()

    def _close_if_dropped(self) -> None:
        if self.dropped and not self.closed and not self.unread_fds:
            self.close()

    def _wanted(self, done: bool) -> int:
        if not self.reading and done and self._read_fds < self.output.sent_fds:
            # Woken each time the peer consumes one of our messages (see the module's doc).
            return OUT | select.EPOLLET
        return super()._wanted(done)

    def _on_event(self, mask: int) -> None:
        super()._on_event(mask)
        if self.closed or not mask & OUT:
            return
        # The socket took more of our output, or the peer read some of it.
        self._see_reads()
        self._watch(not self.output)
        self._close_if_dropped()
        self._dispatch()
        if self._on_drain is not None and not self.closed:
            self._on_drain(self)

    # -- taking frames ---------------------------------------------------------------
    def hold(self, held: bool) -> None:
        """Take no frame from this peer while ``held`` (its owner still answers one); on release,
        the frames already received are taken, then its socket is read again."""
        self.held = held
        self._dispatch()

    def _taking(self) -> bool:
        return not (self.closed or self._closing or self.dropped or self.held or self.lagging)

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
        self._dispatch()
        if not self.closed and self._on_parked is not None:
            error = self._on_parked(self)
            if error is not None:
                self.refuse(error)

    def _dispatch(self) -> None:
        """Hand over the complete frames received while we take frames; then read only if we still do."""
        if self._dispatching:  # a frame's handling sent or released: the loop below goes on
            return
        self._dispatching = True
        try:
            while self._taking():
                try:
                    frame = self._decoder.next_frame()
                except Error as exc:
                    self._frame_begun(False)
                    self._refuse(exc)
                    continue
                if frame is None:
                    break
                self._frame_begun(False)
                self._on_frame(self, frame.body, frame.fds)
        finally:
            self._dispatching = False
        if self.closed:
            return
        taking = self._taking()
        # Nothing begun, or it waits for us, not for the sender: no deadline runs.
        self._frame_begun(taking and bool(self._decoder.pending_bytes))
        self.set_reading(taking)

    def _frame_begun(self, begun: bool) -> None:
        """The deadline of the frame under way: armed when one is begun, gone when none is.
        A peer that stops mid-frame would otherwise keep what it sent (and the fds with it:
        its own connection's among them, which no EOF then ends) for good."""
        if not begun:
            self.partial_since = None
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
        elif self.partial_since is None:
            self.partial_since = self.loop.clock()
            if self._frame_timeout is not None:
                self._deadline = self.loop.call_later(self._frame_timeout[0], self._overdue)

    def _overdue(self) -> None:
        self._deadline = None
        if self.closed or self.partial_since is None:
            return
        timeout, setting = self._frame_timeout
        age = self.loop.clock() - self.partial_since
        error = Error("timeout", f"a frame begun {age:.0f} s ago is still not whole: send each frame "
                                 f"whole within {setting} ({timeout:g} s)", fatal=True)
        if self._on_overdue is not None:
            self._on_overdue(self, error)
        self.refuse(error)

    def _refuse(self, exc: Error) -> None:
        offences.warning((self.uid, exc.code), "%r sent a bad frame: %s", self, exc.message)
        self.refuse(exc)

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
        self._frame_begun(False)
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
