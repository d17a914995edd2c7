"""The line protocol's wire layer: bytes to lines to commands, and back. No I/O.

Theory of operation
-------------------
A client sends UTF-8 lines ending in ``\\n`` (a ``\\r`` before it is dropped),
at most :data:`MAX_LINE` bytes each, not counting the ending. :class:`LineFramer`
cuts a byte stream into such lines. A line that grows past the limit is reported
once as :data:`LINE_TOO_LONG` and its bytes are thrown away up to and including
the next ``\\n``, so a huge line costs the server no memory and the client's
next line is read normally.

:func:`parse_command` turns one line into a :class:`Command`; what a command
does is the room's business (:mod:`chatd.room`), not this module's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LINE = 64 * 1024
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")


class _TooLong:
    def __repr__(self):
        return "LINE_TOO_LONG"


#: What :meth:`LineFramer.feed` yields in place of a line that exceeded the limit.
LINE_TOO_LONG = _TooLong()


class LineFramer:
    def __init__(self, max_line: int = MAX_LINE):
        self.max_line = max_line
        self._partial = bytearray()
        #: True while the rest of an over-long line is being thrown away.
        self.discarding = False

    def feed(self, data: bytes) -> list:
        """Lines (bytes, without their ending) and LINE_TOO_LONG markers, in order."""
        out = []
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
                    out.append(LINE_TOO_LONG)
                    self.discarding = True
            else:
                self._partial += data[start:end]
                line = bytes(self._partial)
                self._partial.clear()
                if line.endswith(b"\r"):
                    line = line[:-1]
                out.append(line if len(line) <= self.max_line else LINE_TOO_LONG)
            if newline < 0:
                break
            start = newline + 1
        return out

    @property
    def buffered(self) -> bytes:
        return bytes(self._partial)


@dataclass(frozen=True)
class Command:
    verb: str
    argument: str | None


class BadEncoding(ValueError):
    pass


def parse_command(line: bytes) -> Command:
    """``NICK alice`` -> Command('NICK', 'alice'). The verb is case-insensitive."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEncoding("line is not valid UTF-8") from None
    verb, space, argument = text.partition(" ")
    return Command(verb.upper(), argument if space else None)


def encode_line(text: str) -> bytes:
    return text.encode("utf-8") + b"\n"
