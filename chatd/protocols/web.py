"""The web protocol: HTTP on the web port, and the chat as JSON over a WebSocket at ``/ws``. No I/O.

Theory of operation
-------------------
A connection to the web port starts in HTTP. :class:`WebCodec` waits for a
whole request head (at most :data:`MAX_HEAD` bytes), lets h11 parse it, and
answers: ``GET /`` and the page's files from chatd/web/, ``GET /healthz``
for probes (asked of chatd: 200, or 503 while the host must get no new clients,
e.g. fenced: :mod:`chatd.fencing`), ``GET /ws`` with a WebSocket upgrade by switching to the
WebSocket (wsproto's server handshake checks the method, version and key, and
writes the ``101``); anything else gets a proper HTTP error. A plain HTTP
answer ends the connection (``Connection: close``): :attr:`WebCodec.finished`.

On the WebSocket each complete *message* (a text message, possibly in
fragments) is one JSON command::

    {"type": "nick", "name": N}   {"type": "pair", "peer": N}   {"type": "msg", "text": T}
    {"type": "who"}               {"type": "ping"}              {"type": "quit"}

and each room event is one JSON text message: ``ok`` (``command``, ``name``),
``paired`` / ``unpaired`` (``peer``), ``from`` (``from``, ``n``, ``text``),
``users`` (``users``: ``[{"nick", "peer"}]``), ``pong``, ``bye``, and ``error``
(``code``, the same codes as the line protocol's ``ERR``). The ``ping`` →
``pong`` pair is the room's, not the WebSocket's: its answer goes through the
room and the journal like any other, so it tells the page that chatd is
handling its commands (a page's JavaScript cannot send WebSocket pings).
WebSocket pings are answered;
a close frame is answered and ends the connection; a binary message is closed
with 1003, a message over :data:`MAX_MESSAGE` bytes with 1009 (before its
payload is read), invalid UTF-8 with 1007 (wsproto). No extension is
negotiated: permessage-deflate's compression context could not survive a
crash.

**Resuming mid-stream.** chatd's journal keeps every byte read and not yet
handled, and resumes a codec from ``(consumed, state)`` (see
:mod:`chatd.protocols`). So this codec feeds wsproto one *whole frame* at a
time: it reads just a frame's header to know its length, and hands wsproto
exactly that frame. ``consumed`` then moves only at message boundaries (the
start of the first frame of a message not yet complete), and ``state`` says
only which phase the connection is in (HTTP, WebSocket open, WebSocket
closing). A fresh ``wsproto.Connection`` fed the bytes from ``consumed`` on
goes on exactly as the dead one would have: a frame half received when chatd
died is finished, not lost. The bytes this codec must send on its own (the
HTTP answer, the 101, pongs, close frames) come from :meth:`WebCodec.take_output`
and go through the journal like every other byte chatd sends.

**The common frame without wsproto.** A whole message in one masked text frame
(FIN, no RSV bit, the shortest length encoding) with no fragmented message under
way is unmasked, checked as UTF-8 (1007 if not, as wsproto would) and parsed
here; a ``from`` is framed here too (one unmasked text frame). wsproto's
generic frame machinery cost about 40% of chatd's CPU time per relayed message
(bench/web_rates.py, README "Scale"); every other frame (control, fragments,
anything odd) still goes through wsproto, which then sees only whole frames, and
none of a message half parsed here.
"""

from __future__ import annotations

import functools
import json
import struct

import h11
from wsproto import ConnectionType
from wsproto.connection import Connection, ConnectionState
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request, TextMessage
from wsproto.events import Ping as PingFrame
from wsproto.frame_protocol import CloseReason
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError

from . import HEALTH_ASKED, HealthAsked
from ..room import (Ack, Busy, Bye, Command, Event, Failed, From, Handled, Invalid, Moved, Msg, Nick, Ok, Pair, Paired,
                    Ping, Pong, Quit, Resume, Resumed, SessionStarted, StartSession, Unpaired, Users, Who)

MAX_HEAD = 16 * 1024
MAX_MESSAGE = 64 * 1024
HTTP, OPEN, CLOSING = b"", b"W", b"C"
PAGES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


def page(name: str) -> bytes:
    # Imported here, by the first page asked for: importlib.resources takes 8-15 ms to import,
    # which a restore of web clients need not spend.
    from importlib import resources

    return resources.files("chatd").joinpath("web", name).read_bytes()


def frame_length(data: bytes | bytearray | memoryview, start: int) -> tuple[int, int] | None:
    """(header + payload length, payload length) of the frame at ``start``, or None if its
    header is not all there yet. Only the length: wsproto does the parsing."""
    if len(data) - start < 2:
        return None
    second = data[start + 1]
    length, header = second & 0x7F, 2
    if length == 126:
        if len(data) - start < 4:
            return None
        length, header = struct.unpack_from(">H", data, start + 2)[0], 4
    elif length == 127:
        if len(data) - start < 10:
            return None
        length, header = struct.unpack_from(">Q", data, start + 2)[0], 10
    if second & 0x80:
        header += 4  # the mask
    return header + length, length


JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
json_string = json.encoder.encode_basestring  # what JSON_ENCODER writes for a str (its C version)


@functools.cache
def xor_table(k: int) -> bytes:
    """bytes.translate's table of XOR with ``k``; made when first needed (all 256: 2.5 ms, which
    a restore need not spend at import)."""
    return bytes(value ^ k for value in range(256))


#: From this many bytes on, unmasking translates every 4th byte (4 passes in C) instead of one
#: big integer's XOR: at 16 KiB 35% faster (two conversions to and from an integer cost more than
#: four strided copies and translations); below it, the integer's fewer steps win.
STRIDED_FROM = 1024


def unmask(masked: bytes | bytearray, mask: bytes) -> bytes | bytearray:
    """A client's payload unmasked: XOR with the 4-byte mask repeated."""
    length = len(masked)
    if length >= STRIDED_FROM:
        out = bytearray(masked)
        for offset in range(4):
            out[offset::4] = out[offset::4].translate(xor_table(mask[offset]))
        return out
    key = (mask * (length // 4 + 1))[:length]
    return (int.from_bytes(masked, "little") ^ int.from_bytes(key, "little")).to_bytes(length, "little")


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final text frame (a server's), the shortest length encoding."""
    length = len(payload)
    if length < 126:
        return bytes((0x81, length)) + payload
    if length < 65536:
        return struct.pack(">BBH", 0x81, 126, length) + payload
    return struct.pack(">BBQ", 0x81, 127, length) + payload


def http_response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                  extra: list[tuple[bytes, bytes]] = ()) -> bytes:
    """One whole HTTP/1.1 response that ends the connection."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    conn.next_event()
    headers = [(b"Content-Type", content_type.encode()), (b"Content-Length", str(len(body)).encode()),
               (b"Connection", b"close"), (b"Cache-Control", b"no-store"), *extra]
    return (conn.send(h11.Response(status_code=status, headers=headers)) + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage()))


def parse_command(text: str) -> Command:
    try:
        message = json.loads(text)
    except ValueError:
        return Invalid("unknown-command")
    if not isinstance(message, dict):
        return Invalid("unknown-command")
    kind = message.get("type")

    def text_field(name):
        value = message.get(name)
        return value if isinstance(value, str) else None

    if kind == "msg":
        return Msg(text_field("text") or "")
    if kind == "nick":
        return Nick(text_field("name"))
    if kind == "pair":
        return Pair(text_field("peer"))
    if kind == "who":
        return Who()
    if kind == "ping":
        return Ping()
    if kind == "quit":
        return Quit()
    if kind == "session":
        return StartSession()
    if kind == "resume":
        token, n = message.get("token"), message.get("n")
        good = isinstance(token, str) and type(n) is int and 0 <= n < 2 ** 63
        return Resume(token, n) if good else Resume("", 0)
    if kind == "ack":
        n = message.get("n")
        return Ack(n) if type(n) is int and 0 <= n < 2 ** 63 else Invalid("unknown-command")
    return Invalid("unknown-command")


def event_json(event: Event) -> dict:
    if isinstance(event, From):
        return {"type": "from", "from": event.sender, "n": event.n, "text": event.text}
    if isinstance(event, Ok):
        return {"type": "ok", "command": event.verb.lower(), "name": event.name}
    if isinstance(event, Paired):
        return {"type": "paired", "peer": event.peer}
    if isinstance(event, Unpaired):
        return {"type": "unpaired", "peer": event.peer}
    if isinstance(event, Users):
        return {"type": "users", "users": [{"nick": nick, "peer": peer} for nick, peer in event.entries]}
    if isinstance(event, Pong):
        return {"type": "pong"}
    if isinstance(event, Bye):
        return {"type": "bye"}
    if isinstance(event, Failed):
        return {"type": "error", "code": event.code}
    if isinstance(event, SessionStarted):
        return {"type": "session", "token": event.token, "handled": event.handled}
    if isinstance(event, Resumed):
        return {"type": "resumed", "nick": event.nick, "peer": event.peer, "handled": event.handled}
    if isinstance(event, Handled):
        return {"type": "handled", "count": event.count}
    if isinstance(event, Busy):
        return {"type": "error", "code": "busy", "retry_after": event.seconds}
    if isinstance(event, Moved):
        return {"type": "error", "code": "moved", "sent": event.sent}
    raise TypeError(f"not an event: {event!r}")


def froms_in(data: bytes) -> list[tuple[int, int, From]]:
    """(start, end, event) of each whole ``from`` message in ``data``: output of
    :meth:`WebCodec.encode` (unmasked frames, one per message), perhaps after the HTTP 101."""
    found, start = [], 0
    if data.startswith(b"HTTP/"):
        start = data.find(b"\r\n\r\n") + 4
        if start < 4:
            return found
    while start + 2 <= len(data):
        length, at = data[start + 1] & 0x7F, start + 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if at + size > len(data):
                break
            length, at = int.from_bytes(data[at:at + size], "big"), at + size
        end = at + length
        if end > len(data):
            break
        if data[start] & 0x0F == 1 and data.startswith(b'{"type":"from"', at):
            try:
                message = json.loads(data[at:end])
                found.append((start, end, From(message["from"], message["n"], message["text"])))
            except (ValueError, KeyError, TypeError):
                pass
        start = end
    return found


class WebCodec:
    protocol = "websocket"

    def __init__(self, consumed: int = 0, state: bytes = b""):
        self.consumed = consumed
        self.phase = state if state in (HTTP, OPEN, CLOSING) else HTTP
        #: True once the connection is to end, when what is queued is sent.
        self.finished = self.phase == CLOSING
        self._buffer = bytearray()  # the bytes from `consumed` on
        self._output = bytearray()
        self._ws = Connection(ConnectionType.SERVER) if self.phase == OPEN else None
        self._frames_fed = 0  # bytes of _buffer already fed to wsproto (a message under way)
        self._message: list[str] = []
        self._message_size = 0

    @property
    def state(self) -> bytes:
        return self.phase

    @property
    def opening(self) -> bool:
        """No complete HTTP request yet (a slow sender of a partial one is closed for it)."""
        return self.phase == HTTP and not self.finished

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def take_output(self) -> bytes:
        """What the protocol itself must send now (HTTP answers, the 101, pongs, closes)."""
        output, self._output = bytes(self._output), bytearray()
        return output

    def _consume(self, count: int) -> None:
        del self._buffer[:count]
        self.consumed += count

    def next_command(self) -> Command | HealthAsked | None:
        if self.phase == HTTP and not self.finished:
            # Answers, asks chatd (a probe), or switches to the WebSocket (and frames may follow at once).
            if self._http() is HEALTH_ASKED:
                return HEALTH_ASKED
        if self.finished or self.phase != OPEN:
            return None
        return self._frames()

    # -- HTTP ---------------------------------------------------------------------------
    def _http(self) -> HealthAsked | None:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 and len(self._buffer) <= MAX_HEAD:
            return
        if end < 0 or end + 4 > MAX_HEAD:
            self._answer(431, b"request head too large\n")
            return
        head = bytes(self._buffer[:end + 4])
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(head)
        try:
            request = conn.next_event()
        except h11.RemoteProtocolError as exc:
            self._answer(400, f"bad request: {exc}\n".encode())
            return
        if not isinstance(request, h11.Request):
            self._answer(400, b"bad request\n")
            return
        target = request.target.decode("ascii", "replace").split("?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            self._answer(405, b"only GET here\n", extra=[(b"Allow", b"GET, HEAD")])
        elif target == "/ws":
            self._upgrade(head, request)
        elif target == "/healthz":
            return HEALTH_ASKED  # the request stays unconsumed until answer_health
        elif target in PAGES:
            name, content_type = PAGES[target]
            self._answer(200, page(name), content_type)
        else:
            self._answer(404, b"not found: the chat page is at /, its WebSocket at /ws\n")

    def answer_health(self, problem: str | None) -> None:
        """``/healthz``: 200 while this host serves, 503 naming why not (a load balancer sends new
        clients elsewhere)."""
        if problem is None:
            self._answer(200, b"ok\n")
        else:
            self._answer(503, f"{problem}\n".encode())

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
                extra: list[tuple[bytes, bytes]] = ()) -> None:
        self._output += http_response(status, body, content_type, extra)
        self.finished = True
        self._consume(len(self._buffer))

    def _upgrade(self, head: bytes, request: h11.Request) -> None:
        headers = {name.lower(): value for name, value in request.headers}
        if b"websocket" not in headers.get(b"upgrade", b"").lower():
            self._answer(426, b"this is a WebSocket: upgrade to it\n", extra=[(b"Upgrade", b"websocket")])
            return
        handshake = H11Handshake(ConnectionType.SERVER)
        try:
            handshake.receive_data(head)
            events = list(handshake.events())
        except (RemoteProtocolError, UnicodeError) as exc:  # wsproto decodes Host as IDNA: any bytes may fail
            self._answer(400, f"bad WebSocket handshake: {exc}\n".encode())
            return
        if not events or not isinstance(events[0], Request):
            self._answer(400, b"bad WebSocket handshake\n")
            return
        self._output += handshake.send(AcceptConnection())  # no extensions: nothing to lose in a crash
        self._ws = Connection(ConnectionType.SERVER)
        self.phase = OPEN
        self._consume(len(head))

    # -- WebSocket ----------------------------------------------------------------------
    def _frames(self) -> Command | None:
        while not self.finished:
            sized = frame_length(self._buffer, self._frames_fed)
            if sized is None:
                return None
            total, payload = sized
            if payload > MAX_MESSAGE or self._message_size + payload > MAX_MESSAGE:
                self._close(CloseReason.MESSAGE_TOO_BIG, f"messages are at most {MAX_MESSAGE} bytes")
                return None
            if len(self._buffer) - self._frames_fed < total:
                return None
            command = self._plain_text_frame(total, payload) if not self._message else None
            if command is None and not self.finished:
                frame = bytes(self._buffer[self._frames_fed:self._frames_fed + total])
                self._frames_fed += total
                self._ws.receive_data(frame)
                command = self._events()
            if not self._message:  # no message under way: what was fed is used up
                self._consume(self._frames_fed)
                self._frames_fed = 0
            if command is not None:
                return command
        return None

    def _plain_text_frame(self, total: int, payload: int) -> Command | None:
        """The command in the frame at ``_frames_fed`` if it is a whole masked text message with
        the shortest length encoding (then it is used up); None for wsproto to handle it."""
        start = self._frames_fed
        first, second = self._buffer[start], self._buffer[start + 1]
        header = total - payload
        minimal = (header == 6 and payload < 126) or (header == 8 and 126 <= payload < 65536)
        if first != 0x81 or not second & 0x80 or not minimal:
            return None
        mask = bytes(self._buffer[start + header - 4:start + header])
        masked = self._buffer[start + header:start + total]
        self._frames_fed += total
        try:
            text = unmask(masked, mask).decode()
        except UnicodeDecodeError:
            self._close(CloseReason.INVALID_FRAME_PAYLOAD_DATA, "text messages must be UTF-8")
            return None
        return parse_command(text)

    def _events(self) -> Command | None:
        command = None
        for event in self._ws.events():
            if isinstance(event, TextMessage):
                self._message.append(event.data)
                self._message_size += len(event.data.encode())
                if event.message_finished:
                    command = parse_command("".join(self._message))
                    self._message, self._message_size = [], 0
            elif isinstance(event, BytesMessage):
                self._close(CloseReason.UNSUPPORTED_DATA, "text messages only")
            elif isinstance(event, PingFrame):
                self._output += self._ws.send(event.response())
            elif isinstance(event, CloseConnection):
                if self._ws.state == ConnectionState.REMOTE_CLOSING:  # the browser closes: answer it
                    self._output += self._ws.send(event.response())
                else:  # wsproto found the frames broken (1002, 1007): close with its code
                    self._close(event.code, event.reason or "")
                self._finish()
        return command

    def _close(self, code: int, reason: str) -> None:
        if self._ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self._output += self._ws.send(CloseConnection(code=code, reason=reason))
        self._finish()

    def _finish(self) -> None:
        self.phase = CLOSING
        self.finished = True
        self._message, self._message_size = [], 0
        self._consume(len(self._buffer))
        self._frames_fed = 0

    # -- events out -----------------------------------------------------------------------
    def encode(self, event: Event) -> bytes:
        if self._ws is None or self._ws.state != ConnectionState.OPEN:
            return b""
        if isinstance(event, From):  # the hot one: framed here (what wsproto would write)
            return text_frame(f'{{"type":"from","from":{json_string(event.sender)},"n":{event.n},'
                              f'"text":{json_string(event.text)}}}'.encode())
        data = self._ws.send(TextMessage(data=JSON_ENCODER.encode(event_json(event))))
        if isinstance(event, Bye):
            data += self._ws.send(CloseConnection(code=CloseReason.NORMAL_CLOSURE, reason="bye"))
            self.phase = CLOSING
        return data
