"""The line protocol: a client's bytes to room commands, room events to lines. No I/O.

Theory of operation
-------------------
A client sends UTF-8 lines ending in ``\\n`` (a ``\\r`` before it is dropped),
at most :data:`MAX_LINE` bytes each, not counting the ending. :class:`LineCodec`
cuts the byte stream into lines and each line into a command: the first word,
ASCII, matched without regard to ASCII case, names it (``NICK``, ``PAIR``, ``MSG``,
``WHO``, ``PING``, ``QUIT``), the rest after one space is its argument. A line that grows
past the limit is reported once, as ``Invalid("line-too-long")``, and its bytes
are thrown away up to and including the next ``\\n``, so a huge line costs no
memory and the client's next line is read normally. A line that is not UTF-8
is ``Invalid("bad-encoding")``; an unknown word ``Invalid("unknown-command")``.

Each event the room sends a line client is one line (:meth:`LineCodec.encode`),
except :class:`~chatd.room.Users`, which is a ``USER`` line per member and ``END``.

=======================  ===================================================
event                    line(s)
=======================  ===================================================
``Ok(verb, name)``       ``OK NICK <name>`` / ``OK PAIR <name>``
``Paired(peer)``         ``PAIRED <peer>``
``Unpaired(peer)``       ``UNPAIRED <peer>``
``From(sender, n, t)``   ``FROM <sender> <n> <t>``
``Users(entries)``       ``USER <nick> <peer-or-->`` …, then ``END``
``Pong()``               ``PONG``
``Bye()``                ``BYE``
``Failed(code)``         ``ERR <code>``
``SessionStarted(t, h)`` ``SESSION <token> <handled>``
``Resumed(nick, peer, h)`` ``RESUMED <nick-or--> <peer-or--> <handled>``
``Handled(count)``       ``HANDLED <count>``
``Busy(seconds)``        ``ERR busy <seconds>``
``Moved(sent)``          ``ERR moved <sent>``
=======================  ===================================================

The session's commands (:mod:`chatd.sessions`): ``SESSION``; ``RESUME <token> <n>`` (a
malformed one is ``Resume("", 0)``, which no session has); ``ACK <n>``.
:func:`froms_in` finds the ``FROM`` lines in output this codec wrote (a resume sends
again those a client lacks).
"""

from __future__ import annotations


from ..room import (Ack, Busy, Bye, Command, Event, Failed, From, Handled, Invalid, Moved, Msg, Nick, Ok, Pair, Paired,
                    Ping, Pong, Quit, Resume, Resumed, SessionStarted, StartSession, Unpaired, Users, Who)

MAX_LINE = 64 * 1024
DISCARDING = b"\x01"


def parse_line(line: bytes) -> Command:
    """``b"NICK alice"`` -> ``Nick("alice")``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Invalid("bad-encoding")
    verb, space, argument = text.partition(" ")
    argument = argument if space else None
    if not verb.isascii():
        # str.upper() maps Unicode: "nic\u212a" (a Kelvin sign) would become "NICK".
        return Invalid("unknown-command")
    verb = verb.upper()
    if verb == "MSG":
        return Msg(argument or "")
    if verb == "NICK":
        return Nick(argument)
    if verb == "PAIR":
        return Pair(argument)
    if verb == "WHO":
        return Who()
    if verb == "PING":
        return Ping()
    if verb == "QUIT":
        return Quit()
    if verb == "SESSION":
        return StartSession()
    if verb == "RESUME":
        token, _, n = (argument or "").partition(" ")
        return Resume(token, int(n)) if n.isascii() and n.isdigit() and len(n) < 20 else Resume("", 0)
    if verb == "ACK":
        n = argument or ""
        return Ack(int(n)) if n.isascii() and n.isdigit() and len(n) < 20 else Invalid("unknown-command")
    return Invalid("unknown-command")


def encode_event(event: Event) -> bytes:
    if isinstance(event, From):
        text = f"FROM {event.sender} {event.n} {event.text}"
    elif isinstance(event, Ok):
        text = f"OK {event.verb} {event.name}"
    elif isinstance(event, Paired):
        text = f"PAIRED {event.peer}"
    elif isinstance(event, Unpaired):
        text = f"UNPAIRED {event.peer}"
    elif isinstance(event, Users):
        text = "".join(f"USER {nick} {peer or '-'}\n" for nick, peer in event.entries) + "END"
    elif isinstance(event, Pong):
        text = "PONG"
    elif isinstance(event, Bye):
        text = "BYE"
    elif isinstance(event, Failed):
        text = f"ERR {event.code}"
    elif isinstance(event, SessionStarted):
        text = f"SESSION {event.token} {event.handled}"
    elif isinstance(event, Resumed):
        text = f"RESUMED {event.nick or '-'} {event.peer or '-'} {event.handled}"
    elif isinstance(event, Handled):
        text = f"HANDLED {event.count}"
    elif isinstance(event, Busy):
        text = f"ERR busy {event.seconds}"
    elif isinstance(event, Moved):
        text = f"ERR moved {event.sent}"
    else:
        raise TypeError(f"not an event: {event!r}")
    return text.encode("utf-8") + b"\n"


def froms_in(data: bytes) -> list[tuple[int, int, From]]:
    """(start, end, event) of each whole ``FROM`` line in ``data`` (output of :func:`encode_event`)."""
    found, start = [], 0
    while True:
        end = data.find(b"\n", start) + 1
        if not end:
            return found
        if data.startswith(b"FROM ", start):
            parts = data[start + 5:end - 1].split(b" ", 2)
            if len(parts) == 3 and parts[1].isdigit():
                found.append((start, end, From(parts[0].decode(), int(parts[1]), parts[2].decode("utf-8", "replace"))))
        start = end


class LineCodec:
    """Lines to commands, lazily: a line is cut and parsed only when :meth:`next_command` asks.

    ``consumed`` is the stream offset up to which input is used up (the bytes of
    every command returned, and of over-long lines thrown away), and ``state``
    the parse state there (whether an over-long line is being thrown away): a
    codec made with them, then fed the bytes from ``consumed`` on, goes on
    exactly as this one would. That is what lets a new chatd handle the input
    a dead one had read and not handled, exactly once.
    """

    protocol = "line"
    finished = False  # a line client ends with QUIT or EOF, never by the protocol alone
    opening = False  # a line client may say its first word when it likes

    def __init__(self, max_line: int = MAX_LINE, consumed: int = 0, state: bytes = b""):
        self.max_line = max_line
        self.consumed = consumed
        #: True while the rest of an over-long line is being thrown away.
        self.discarding = state == DISCARDING
        self._buffer = bytearray()
        self._start = 0  # where the unconsumed bytes begin in _buffer
        self._scanned = 0  # _buffer[_start:_scanned] holds no newline

    @property
    def state(self) -> bytes:
        return DISCARDING if self.discarding else b""

    def feed(self, data: bytes) -> None:
        if self._start and self._start == len(self._buffer):
            self._buffer.clear()
            self._start = self._scanned = 0
        self._buffer += data

    def next_command(self) -> Command | None:
        while True:
            newline = self._buffer.find(b"\n", max(self._scanned, self._start))
            if newline < 0:
                return self._no_line_yet()
            line = bytes(self._buffer[self._start:newline])
            self.consumed += newline + 1 - self._start
            self._start = self._scanned = newline + 1
            self._compact()
            if self.discarding:
                self.discarding = False  # the end of the over-long line: the next line is new
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            return parse_line(line) if len(line) <= self.max_line else Invalid("line-too-long")

    def _no_line_yet(self) -> Command | None:
        waiting = len(self._buffer) - self._start
        # One byte of slack: it may be the '\r' of a '\r\n' still to come.
        if self.discarding or waiting > self.max_line + 1:
            self.consumed += waiting
            self._buffer.clear()
            self._start = self._scanned = 0
            if not self.discarding:
                self.discarding = True
                return Invalid("line-too-long")
            return None
        self._scanned = len(self._buffer)
        return None

    def _compact(self) -> None:
        if self._start > 65536 and self._start * 2 > len(self._buffer):
            del self._buffer[:self._start]
            self._scanned -= self._start
            self._start = 0

    @property
    def buffered(self) -> bytes:
        """The start of a line still waiting for its end."""
        return bytes(self._buffer[self._start:])

    @staticmethod
    def take_output() -> bytes:
        return b""

    encode = staticmethod(encode_event)
