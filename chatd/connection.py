"""One client's TCP connection: the one place where its bytes enter and leave chatd.

Theory of operation
-------------------
A :class:`Connection` owns a client socket, registered in the event loop, the
client's codec (:mod:`chatd.protocols`), and the client's two rings in the
journal (:mod:`chatd.rings`). Bytes are received straight into the input ring,
then fed to the codec; the server takes commands from the codec one at a time
(:meth:`ChatServer.take_input <chatd.server.ChatServer.take_input>`), and
moves ``inbox.handled`` on as it handles them. Events the server sends are
encoded by the same codec into the output ring, and sent from there once the
journal has committed them.

The server may stop a connection's reading (:meth:`~fdkeep.peer.Channel.set_reading`)
while it cannot take more of its input: a peer's output ring is full, the
input ring is full, the client said its last word, or its EOF was seen. Then
TCP's own flow control slows the client down; nothing is dropped.

:meth:`Connection.close` shuts the socket down before closing it: the holders
still have duplicates of it, and only ``shutdown()`` ends the TCP connection
for every duplicate at once, so the client sees its EOF now.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from fdkeep.peer import Channel

from . import faults
from .protocols import Codec
from .rings import InRing, OutRing, Outbox
from .room import Event

if TYPE_CHECKING:
    from .server import ChatServer

log = logging.getLogger("chatd")

READ_SIZE = 65536


class Connection(Channel):
    def __init__(self, server: "ChatServer", sock: socket.socket, member_id: int, codec: Codec,
                 inbox: InRing, outbox: OutRing, inode: int | None = None, forwards: Outbox | None = None):
        self.server = server
        self.member_id = member_id
        self.codec = codec
        self.inbox = inbox
        #: Across hosts: messages to members of other hosts, until the cluster has them.
        self.forwards = forwards
        self.inode = inode if inode is not None else os.fstat(sock.fileno()).st_ino
        #: Seen the client's EOF: what it sent before is handled, then it is closed.
        self.eof = False
        #: Said its last word (BYE): closed once its output is sent.
        self.finishing = False
        #: Waiting for room in an output ring (its own or its peer's).
        self.blocked = False
        #: A command of it waits for the cluster's answer (chatd.cluster: a NICK being claimed).
        self.parked = False
        #: Since when queued output waits for the client to take some (None: nothing waits).
        self.progress_at: float | None = None
        #: The input offset a predecessor died handling, and how many times.
        self.poison_offset = 0
        self.poison_count = 0
        #: When this process began serving it (accepted, or restored).
        self.opened_at = time.monotonic()
        #: The client's address, as counted against --max-per-address; "" if exempt (loopback)
        #: or not counted, None until known (a restored connection: learned soon after).
        self.address: str | None = None
        super().__init__(server.loop, sock, outbox)

    @property
    def remote(self) -> str:
        try:
            return "%s:%d" % self.sock.getpeername()[:2]
        except OSError:
            return "?"

    @property
    def outbox(self) -> OutRing:
        return self.output

    def __repr__(self) -> str:
        return f"<member {self.member_id} from {self.remote}>"

    def _readable(self) -> None:
        if self.inbox.free == 0:
            self.server.update_reading(self)
            return
        try:
            count = self.inbox.receive(self.sock, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.server.close_client(self.member_id, f"read failed: {exc.strerror}")
            return
        faults.reached("after-read")
        if count == 0:
            self.eof = True
        else:
            self.codec.feed(self.inbox.bytes(self.inbox.received - count, self.inbox.received))
        self.server.take_input(self)

    def _hung_up(self) -> None:
        self.server.close_client(self.member_id, "the connection hung up")

    def send(self, event: Event) -> None:
        """Encode ``event`` into the output ring; it is sent once the journal commits it."""
        self.outbox.append(self.codec.encode(event))

    def _flush(self) -> bool:
        before = self.outbox.sent
        done = super()._flush()
        if self.closed:
            return True
        if self.outbox.sent > before:
            if not done:
                faults.reached("mid-write")
            self.server.output_moved(self)
        return done

    def _write_failed(self, exc: OSError) -> None:
        # The client is gone or going; its EOF or error on the read side closes it.
        if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
            log.info("member %d: write failed: %s", self.member_id, exc)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        super().close()
