"""The line protocol: a client's bytes to room commands, room events to lines. No I/O.

Theory of operation
-------------------
A client sends UTF-8 lines ending in ``\\n`` (a ``\\r`` before it is dropped),
at most :data:`MAX_LINE` bytes each, not counting the ending. :class:`LineCodec`
cuts the byte stream into lines and each line into a command: the first word,
matched without regard to case, names it (``NICK``, ``PAIR``, ``MSG``,
``WHO``, ``QUIT``), the rest after one space is its argument. A line that grows
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
``Bye()``                ``BYE``
``Failed(code)``         ``ERR <code>``
=======================  ===================================================
"""

from __future__ import annotations

from collections import deque

from ..room import Bye, Command, Event, Failed, From, Invalid, Msg, Nick, Ok, Pair, Paired, Quit, Unpaired, Users, Who

MAX_LINE = 64 * 1024


def parse_line(line: bytes) -> Command:
    """``b"NICK alice"`` -> ``Nick("alice")``."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return Invalid("bad-encoding")
    verb, space, argument = text.partition(" ")
    argument = argument if space else None
    verb = verb.upper()
    if verb == "MSG":
        return Msg(argument or "")
    if verb == "NICK":
        return Nick(argument)
    if verb == "PAIR":
        return Pair(argument)
    if verb == "WHO":
        return Who()
    if verb == "QUIT":
        return Quit()
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
    elif isinstance(event, Bye):
        text = "BYE"
    elif isinstance(event, Failed):
        text = f"ERR {event.code}"
    else:
        raise TypeError(f"not an event: {event!r}")
    return text.encode("utf-8") + b"\n"


class LineCodec:
    protocol = "line"

    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._partial = bytearray()
        #: True while the rest of an over-long line is being thrown away.
        self.discarding = False
        self._commands: deque[Command] = deque()

    def feed(self, data: bytes) -> None:
        start = 0
        while start < len(data):
            newline = data.find(b"\n", start)
            end = len(data) if newline < 0 else newline
            if self.discarding:
                self.discarding = newline < 0
            elif newline < 0:
                self._partial += data[start:end]
                # One byte of slack: it may be the '\r' of a '\r\n' still to come.
                if len(self._partial) > self.max_line + 1:
                    self._partial.clear()
                    self._commands.append(Invalid("line-too-long"))
                    self.discarding = True
            else:
                self._partial += data[start:end]
                line = bytes(self._partial)
                self._partial.clear()
                if line.endswith(b"\r"):
                    line = line[:-1]
                self._commands.append(parse_line(line) if len(line) <= self.max_line else Invalid("line-too-long"))
            if newline < 0:
                break
            start = newline + 1

    def next_command(self) -> Command | None:
        return self._commands.popleft() if self._commands else None

    @property
    def buffered(self) -> bytes:
        """The start of a line still waiting for its end."""
        return bytes(self._partial)

    encode = staticmethod(encode_event)
