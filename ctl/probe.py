"""A blocking line-protocol client: what tests and `chatctl selftest` chat with."""

from __future__ import annotations

import socket


class LineClient:
    """A blocking client of chatd's line protocol, for tests and self-tests."""

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1",
                 sock: socket.socket | None = None):
        """Connect to ``host:port``, or speak on ``sock``, already connected, if one is given."""
        self.timeout = timeout
        self.sock = sock or socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.local_port = self.sock.getsockname()[1]
        self._buffer = b""

    @classmethod
    def from_socket(cls, sock: socket.socket, timeout: float = 5.0) -> "LineClient":
        return cls(0, timeout, sock=sock)

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def line(self) -> str:
        while b"\n" not in self._buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("chatd closed the connection")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def lines(self, count: int) -> list[str]:
        return [self.line() for _ in range(count)]

    def silent_for(self, seconds: float) -> bool:
        """True if nothing arrives within ``seconds``."""
        if self._buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(self.timeout)
        return False

    def close(self) -> None:
        self.sock.close()


class WebSocketClient:
    """A blocking client of chatd's WebSocket (/ws on the web port), for tests: JSON in, JSON out.

    It speaks RFC 6455 through wsproto (client side, so its frames are masked as a
    browser's are) and can send a message in fragments or a frame in pieces, to
    exercise the server's parser the way networks and browsers do.
    """

    def __init__(self, port: int, timeout: float = 5.0, host: str = "127.0.0.1"):
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.local_port = self.sock.getsockname()[1]
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.ws.send(Request(host=f"{host}:{port}", target="/ws")))
        self._events = []
        while not any(isinstance(event, AcceptConnection) for event in self._events):
            self._pump()
        self._events = [event for event in self._events if not isinstance(event, AcceptConnection)]

    def _pump(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("chatd closed the connection")
        self.ws.receive_data(data)
        self._events.extend(self.ws.events())

    def send(self, *messages: dict) -> None:
        import json

        from wsproto.events import TextMessage

        self.sock.sendall(b"".join(self.ws.send(TextMessage(data=json.dumps(m))) for m in messages))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self, message: dict | str, finished: bool = True) -> bytes:
        """The bytes of one (masked) text frame, to send as the test likes."""
        import json

        from wsproto.events import TextMessage

        text = message if isinstance(message, str) else json.dumps(message)
        return self.ws.send(TextMessage(data=text, message_finished=finished))

    def event(self):
        """The next wsproto event: TextMessage, CloseConnection, Ping, Pong."""
        while not self._events:
            self._pump()
        return self._events.pop(0)

    def message(self) -> dict:
        """The next JSON message (fragments joined)."""
        import json

        from wsproto.events import TextMessage

        parts = []
        while True:
            event = self.event()
            if not isinstance(event, TextMessage):
                raise AssertionError(f"expected a text message, got {event!r}")
            parts.append(event.data)
            if event.message_finished:
                return json.loads("".join(parts))

    def messages(self, count: int) -> list[dict]:
        return [self.message() for _ in range(count)]

    def close(self) -> None:
        self.sock.close()
