"""``chatctl client``: a line-protocol client for people and for scripts.

It connects once and never reconnects, so what it prints tells the truth about
its one TCP connection: ``connected local-port=N`` when it starts, each line from
the server as it comes (messages numbered ``#1``, ``#2`` … as they arrive), and
``EOF`` if the server closes the connection without ``BYE``. Each line typed is
sent as a message (``MSG <line>``); a line starting with ``/`` is a command
(``/who`` sends ``WHO``, ``/quit`` ``QUIT``); ``/port`` prints the local port
again. The end of input sends ``QUIT``.

One thread waits on both stdin and the socket (``poll``), so the client ends the
moment the server ends the connection (``BYE``, EOF, a reset), even while no one
types: nothing is left waiting for one more line, which would swallow the next
command typed in that terminal. stdin is read with ``os.read`` on its fd, never
through Python's buffer (which ``poll`` cannot see), so a terminal, a pipe and a
file all work. What is typed goes out through a non-blocking socket with a
queue of its own: while chatd holds a fast sender back (flow control), the
client stops reading stdin but goes on reading what chatd sends it.

Exit status (:data:`EXIT_STATUS`): 0 when the server said ``BYE`` (after
``QUIT``, or ``chatctl drain``); 1 when it cannot connect; 3 when the connection
ended otherwise (EOF or a reset without ``BYE``, or no ``BYE`` within
:data:`QUIT_WAIT` seconds of ``QUIT``).
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

#: Seconds to wait for the server's BYE once stdin has ended and QUIT is sent.
QUIT_WAIT = 5.0
#: Bytes queued for the server past which the client stops reading stdin until they go.
SEND_QUEUE = 256 * 1024
BYE, CANNOT_CONNECT, LOST = 0, 1, 3
EXIT_STATUS = (f"{BYE}: the server said BYE (after QUIT or /quit, end of input, or `chatctl drain`); "
               f"{CANNOT_CONNECT}: could not connect; {LOST}: the connection ended without BYE "
               f"(EOF, a reset, or no BYE within {QUIT_WAIT:.0f} s of QUIT); 130: Ctrl-C")


def to_wire(typed: str) -> str:
    """``hello`` -> ``MSG hello``; ``/pair bob`` -> ``PAIR bob``."""
    if not typed.startswith("/"):
        return f"MSG {typed}"
    verb, space, rest = typed[1:].partition(" ")
    return verb.upper() + space + rest


def run(host: str, port: int, nick: str | None, pair: str | None, out=sys.stdout, inp=sys.stdin) -> int:
    prefix = f"[{nick}] " if nick else ""

    def say(text: str) -> None:
        out.write(prefix + text + "\n")
        out.flush()

    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        say(f"cannot connect to chatd at {host}:{port} ({exc.strerror or exc}); is chatd running there? "
            "(`chatctl status`; or pass --host/--port)")
        return CANNOT_CONNECT
    with sock:
        local_port = sock.getsockname()[1]
        say(f"connected local-port={local_port}")
        sock.setblocking(False)
        session = _Session(sock, inp.fileno(), local_port, say)
        if nick:
            session.queue(f"NICK {nick}")
        if pair:
            session.queue(f"PAIR {pair}")
        return session.run()


class _Session:
    """The one connection: stdin's lines out, the server's lines in, until the server ends it."""

    def __init__(self, sock: socket.socket, stdin_fd: int, local_port: int, say):
        self.sock = sock
        self.stdin_fd = stdin_fd
        self.local_port = local_port
        self.say = say
        self.outgoing = bytearray()
        self.typed = bytearray()  # stdin's bytes not yet a whole line
        self.incoming = bytearray()  # the server's bytes not yet a whole line
        self.received = 0
        self.quit_deadline: float | None = None  # set once QUIT is sent for the end of input

    def queue(self, line: str) -> None:
        # surrogateescape: bytes that are not UTF-8 go as they came (chatd answers ERR bad-encoding)
        self.outgoing += line.encode("utf-8", "surrogateescape") + b"\n"

    def run(self) -> int:
        while True:
            reading_stdin = self.quit_deadline is None and len(self.outgoing) < SEND_QUEUE
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.outgoing else 0))
            if reading_stdin:
                poller.register(self.stdin_fd, select.POLLIN)
            timeout = None
            if self.quit_deadline is not None:
                timeout = max(self.quit_deadline - time.monotonic(), 0) * 1000
            ready = dict(poller.poll(timeout))
            if not ready and self.quit_deadline is not None and time.monotonic() >= self.quit_deadline:
                self.say(f"no BYE from chatd within {QUIT_WAIT:.0f} s of QUIT: closing")
                return LOST
            if self.sock.fileno() in ready:
                ended = self._receive()
                if ended is not None:
                    return ended
            if reading_stdin and self.stdin_fd in ready:
                self._read_stdin()
            if not self._send():
                return LOST

    def _receive(self) -> int | None:
        """Read what the server sent; an exit status once it has ended the connection."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.say(f"connection lost: {exc.strerror or exc}")
            return LOST
        if not data:
            if self.incoming:
                self._show(bytes(self.incoming))
            self.say("EOF")
            return LOST
        self.incoming += data
        while True:
            newline = self.incoming.find(b"\n")
            if newline < 0:
                return None
            line = bytes(self.incoming[:newline])
            del self.incoming[:newline + 1]
            if self._show(line):
                return BYE

    def _show(self, raw: bytes) -> bool:
        """Print one line from the server; True if it is BYE (the server ends the connection)."""
        line = raw.decode("utf-8", "replace").rstrip("\r")
        if line.startswith("FROM "):
            self.received += 1
            self.say(f"#{self.received} {line}")
            return False
        self.say(f"< {line}")
        return line == "BYE"

    def _send(self) -> bool:
        """Send what is queued, as much as the socket takes now; False if the connection is gone."""
        if not self.outgoing:
            return True
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return True
        except OSError as exc:
            self.say(f"connection lost: {exc.strerror or exc}")
            return False
        del self.outgoing[:sent]
        return True

    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, 65536)
        except OSError:  # a terminal that hung up (EIO): the end of input
            data = b""
        if not data:
            if self.typed:
                self._typed_line(bytes(self.typed))
            self.queue("QUIT")
            self.quit_deadline = time.monotonic() + QUIT_WAIT
            return
        self.typed += data
        while True:
            newline = self.typed.find(b"\n")
            if newline < 0:
                return
            line = bytes(self.typed[:newline])
            del self.typed[:newline + 1]
            self._typed_line(line)

    def _typed_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "surrogateescape")
        if line == "/port":
            self.say(f"local-port={self.local_port}")
        else:
            self.queue(to_wire(line))
