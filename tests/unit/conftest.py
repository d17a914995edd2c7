"""Unit-test fixtures: real sockets made on demand (``sockets``), and a notify socket
that keeps fds the way systemd's store does (``notify_socket``).

The socket stands in for systemd's only in unit tests; tests/systemd runs the
real thing. It keeps what it is sent the way systemd's store does: fds by name,
FDSTOREREMOVE drops a name.
"""

from __future__ import annotations

import array
import faulthandler
import os
import select
import socket
import sys
import threading

import pytest

from chatd.lastwords import WATCHDOG_SIGNAL


class SocketPairs:
    """Connected UNIX socketpairs, made on demand and all closed when the test ends."""

    def __init__(self):
        self.made: list[tuple[socket.socket, socket.socket]] = []

    def pairs(self, count: int) -> list[tuple[socket.socket, socket.socket]]:
        pairs = [socket.socketpair() for _ in range(count)]
        self.made.extend(pairs)
        return pairs

    def fds(self, count: int) -> list[int]:
        """One end's descriptor of each of ``count`` pairs; the fixture keeps and closes them."""
        return [a.fileno() for a, _ in self.pairs(count)]

    def given(self, count: int) -> list[int]:
        """One end's descriptor of each of ``count`` pairs, for code that takes ownership
        (closes them): the fixture closes only the other ends."""
        return [a.detach() for a, _ in self.pairs(count)]

    def close(self) -> None:
        for a, b in self.made:
            a.close(), b.close()


@pytest.fixture
def sockets():
    made = SocketPairs()
    yield made
    made.close()


class NotifySocket:
    """Reads what it is sent on a thread of its own, as systemd does: a datagram
    sender blocks once ten messages wait (net.unix.max_dgram_qlen)."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.path = str(path)
        self.store: dict[str, list[int]] = {}
        self.messages: list[dict] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read_on, daemon=True)
        self._reader.start()

    def _read_on(self):
        poller = select.poll()  # not select(): fds above 1023 are common in these tests
        poller.register(self.sock, select.POLLIN)
        while not self._closing.is_set():
            poller.poll(20)
            if not self._closing.is_set():
                self.drain()

    def drain(self) -> list[dict]:
        with self._lock:
            return self._drain()

    def _drain(self) -> list[dict]:
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * 4))
            except BlockingIOError:
                return self.messages
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                self.store.setdefault(fields["FDNAME"], []).extend(fds)
            elif fields.get("FDSTOREREMOVE") == "1":
                for fd in self.store.pop(fields["FDNAME"], []):
                    os.close(fd)
            else:
                for fd in fds:
                    os.close(fd)

    def passed(self) -> dict[int, str]:
        """What a restart would hand the next process: duplicates, by name."""
        self.drain()
        return {os.dup(fd): name for name, fds in self.store.items() for fd in fds}

    def close(self):
        self._closing.set()
        self._reader.join(2)
        for fds in self.store.values():
            for fd in fds:
                os.close(fd)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    store = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", store.path)  # sd_notify reads it from the environment
    yield store
    store.close()




@pytest.fixture(autouse=True)
def faulthandler_back_to_stderr():
    """A ChatServer that serves in a test points this process's faulthandler at its last words
    (chatd.lastwords), a memfd the test may close: pointed back at stderr after the test."""
    yield
    faulthandler.unregister(WATCHDOG_SIGNAL)
    faulthandler.enable(file=sys.stderr, all_threads=True)
