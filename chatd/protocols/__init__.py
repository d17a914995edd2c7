"""One codec per protocol a client may speak: bytes to commands, events to bytes.

A codec is pure, in the shape of h11: :meth:`feed` it the bytes a client sent,
then take :meth:`next_command` until it returns None (it needs more bytes);
:meth:`encode` turns a room event (:mod:`chatd.room`) into the bytes that
client expects. The room never sees a byte and a codec never sees a socket, so
clients of different protocols chat with each other.

- :mod:`chatd.protocols.line`: the line protocol on the chat port;
- :mod:`chatd.protocols.web`: HTTP and the WebSocket on the web port.

Besides encoding events, a codec may have bytes of its own to send (an HTTP
answer, a WebSocket pong): :meth:`take_output`; and it may end its connection
(``finished``). ``consumed`` and ``state`` say where in the stream the codec
stands and in which parse state: a codec made from them and fed the bytes from
``consumed`` on goes on exactly as this one would (chatd's journal relies on it).

One question a codec cannot answer alone: a health probe (the web port's
``GET /healthz``, asked by a load balancer) depends on the host, not the
connection. The codec gives :data:`HEALTH_ASKED` from :meth:`next_command`, and
chatd answers at once with :meth:`answer_health`, before anything else is read.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Protocol

from ..room import Command, Event


class HealthAsked:
    """A health probe, for chatd to answer (:meth:`Codec.answer_health`): not a room command."""

    def __repr__(self) -> str:
        return "HEALTH_ASKED"


HEALTH_ASKED = HealthAsked()


class Codec(Protocol):
    #: The protocol's name, as the state journal records it.
    protocol: str
    #: Stream offset up to which input is used up; the parse state there.
    consumed: int
    state: bytes
    #: True once the protocol has ended the connection (close when the output is sent).
    finished: bool
    #: True while the client has yet to finish the protocol's opening (an HTTP request):
    #: a client that takes too long is closed (chatd.server.HANDSHAKE_TIMEOUT).
    opening: bool

    def feed(self, data: bytes) -> None: ...

    def next_command(self) -> Command | HealthAsked | None: ...

    def answer_health(self, problem: str | None) -> None:
        """The answer to the :data:`HEALTH_ASKED` just given: healthy if ``problem`` is None
        (only a codec that gives HEALTH_ASKED has it)."""

    def take_output(self) -> bytes: ...

    def encode(self, event: Event) -> bytes: ...


def codec_for(protocol: str, consumed: int = 0, state: bytes = b"") -> Codec:
    """A codec of ``protocol`` ("line" or "websocket"), resuming from (consumed, state)."""
    if protocol == "websocket":
        from .web import WebCodec

        return WebCodec(consumed, state)
    from .line import LineCodec

    return LineCodec(consumed=consumed, state=state)


def froms_in(protocol: str, data: bytes):
    """(start, end, From) of each message to a client found in output its codec wrote
    (chatd.sessions sends again what a resuming client lacks)."""
    if protocol == "websocket":
        from .web import froms_in as found
    else:
        from .line import froms_in as found
    return found(data)


def refusal(protocol: str, code: str) -> bytes:
    """What a client chatd will not serve gets before its connection is closed: the
    line protocol's ``ERR <code>``, or an HTTP 503 naming it on the web port."""
    if protocol == "websocket":
        from .web import http_response

        return http_response(503, f"chatd refuses this connection: {code}\n".encode())
    from ..room import Failed
    from .line import encode_event

    return encode_event(Failed(code))


def web_unavailable() -> str | None:
    """Why this Python cannot serve the web chat (h11 or wsproto missing), or None if it can.

    The line protocol needs nothing beyond the standard library, so chatd (and
    the demo) run from a bare checkout; the web codec is imported only when asked.
    The two are looked for, not imported: importing them took 20-40 ms of every
    chatd's start here (a third more on top of chatd's own imports), and a cold
    restart (no standby) waits for every millisecond of its start. The web codec
    imports them when it is first needed (a web client), or :func:`import_web_codec`
    ahead of time.
    """
    missing = [module for module in ("h11", "wsproto") if importlib.util.find_spec(module) is None]
    if not missing:
        return None
    return (f"the web chat needs {' and '.join(missing)}, which this Python ({sys.executable}) lacks: "
            "install process-backup with pip (e.g. `.venv/bin/pip install -e .`), or pass --http-port -1")


def import_web_codec() -> None:
    """Import the web codec (and h11, wsproto) now, not when a web client first needs it:
    for a chatd that waits (the standby), so that taking over spends no time on it."""
    from . import web  # noqa: F401
