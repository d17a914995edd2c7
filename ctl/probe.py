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
