"""One client's TCP connection: the one place where its bytes enter and leave chatd.

Theory of operation
-------------------
A :class:`Connection` owns a client socket, registered in the event loop, and
the client's codec (:mod:`chatd.protocols`). Bytes read are fed to the codec,
and each command it yields goes to the server's ``on_command`` callback, in
order, until the connection is closed. Events the server sends are encoded by
the same codec and queued in an :class:`~fdkeep.peer.OutputQueue`, flushed as
the socket takes them. A client that stops reading may not make chatd queue
more than :data:`MAX_OUTPUT_BACKLOG` bytes for it; past that, or on a read or
write error, or at its EOF, the server hears ``on_gone`` with the reason and
decides what to do (it closes the client).

:meth:`Connection.close` shuts the socket down before closing it: the holders
still have duplicates of it, and only ``shutdown()`` ends the TCP connection
for every duplicate at once, so the client sees its EOF now.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Callable

from fdkeep.loop import Loop
from fdkeep.peer import Channel, OutputQueue

from .protocols import Codec
from .room import Command, Event

log = logging.getLogger("chatd")

#: A client that stops reading may not make chatd buffer more than this for it.
MAX_OUTPUT_BACKLOG = 4 << 20
READ_SIZE = 65536


class Connection(Channel):
    def __init__(
        self,
        loop: Loop,
        sock: socket.socket,
        member_id: int,
        codec: Codec,
        on_command: Callable[["Connection", Command], None],
        on_gone: Callable[["Connection", str], None],
    ):
        self.member_id = member_id
        self.codec = codec
        self._on_command = on_command
        self._on_gone = on_gone
        self.inode = os.fstat(sock.fileno()).st_ino
        self.finished = False  # said its last word; it only waits to be closed
        try:
            self.remote = "%s:%d" % sock.getpeername()[:2]
        except OSError:
            self.remote = "?"
        super().__init__(loop, sock, OutputQueue(MAX_OUTPUT_BACKLOG))

    def _readable(self) -> None:
        try:
            data = self.sock.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._on_gone(self, f"read failed: {exc.strerror}")
            return
        if not data:
            self._on_gone(self, "client closed the connection")
            return
        self.codec.feed(data)
        while not self.closed:
            command = self.codec.next_command()
            if command is None:
                return
            self._on_command(self, command)

    def send(self, event: Event, last: bool = False) -> None:
        if self.closed or self.finished:
            return
        self.finished = last
        if not self.output.append(self.codec.encode(event)):
            self._on_gone(self, f"does not read: over {MAX_OUTPUT_BACKLOG} bytes queued")
            return
        self._flush()

    def _write_failed(self, exc: OSError) -> None:
        # The client is gone or going; its EOF or error on the read side closes it.
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("member %d: write failed: %s", self.member_id, exc)

    def close(self) -> None:
        if self.closed:
            return
        # The holders still have duplicates of this socket: only shutdown() ends
        # the connection for all of them at once, so the client sees its EOF now.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().close()
