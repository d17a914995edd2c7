"""One codec per protocol a client may speak: bytes to commands, events to bytes.

A codec is pure, in the shape of h11: :meth:`feed` it the bytes a client sent,
then take :meth:`next_command` until it returns None (it needs more bytes);
:meth:`encode` turns a room event (:mod:`chatd.room`) into the bytes that
client expects. The room never sees a byte and a codec never sees a socket, so
clients of different protocols chat with each other.

- :mod:`chatd.protocols.line`: the line protocol on the chat port.
"""

from __future__ import annotations

from typing import Protocol

from ..room import Command, Event


class Codec(Protocol):
    #: The protocol's name, as the state journal records it.
    protocol: str

    def feed(self, data: bytes) -> None: ...

    def next_command(self) -> Command | None: ...

    def encode(self, event: Event) -> bytes: ...
