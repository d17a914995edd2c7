"""The cutting proxy the browser tests put between a page and chatd (testkit/cutproxy.py) cuts as it says:
seen from both ends, over real loopback sockets, against a small echo server of the test's own."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from testkit.cutproxy import Cut, CuttingProxy


class EchoServer:
    """Echoes what each connection sends; records how each connection ended ("eof", "reset")."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endings: list[str] = []
        self.conns: list[socket.socket] = []
        self.ended = threading.Semaphore(0)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self.endings.append("eof")
        except ConnectionResetError:
            self.endings.append("reset")
        except OSError:
            self.endings.append("closed")
        conn.close()
        self.ended.release()

    def wait_ended(self, count: int) -> list[str]:
        for _ in range(count):
            assert self.ended.acquire(timeout=10), f"the server saw {self.endings} end, waited for {count}"
        return self.endings

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def echo():
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo):
    with CuttingProxy(echo.port) as proxy:
        yield proxy


def connect(proxy) -> socket.socket:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    client.sendall(b"ping")
    assert client.recv(4) == b"ping", "forwarded both ways"
    return client


def test_it_forwards_both_ways_and_passes_a_close_on(echo, proxy):
    client = connect(proxy)
    big = bytes(range(256)) * 4096  # 1 MiB: more than the proxy buffers, so flow control is exercised
    threading.Thread(target=client.sendall, args=(big,), daemon=True).start()
    got = bytearray()
    while len(got) < len(big):
        got += client.recv(65536)
    assert got == big
    client.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b"", "the server's close came through"
    assert echo.wait_ended(1) == ["eof"]
    client.close()


def test_a_reset_resets_both_sides(echo, proxy):
    clients = [connect(proxy) for _ in range(3)]
    assert proxy.cut(Cut.RESET) == 3
    for client in clients:
        with pytest.raises(ConnectionResetError):
            client.recv(1)
        client.close()
    assert echo.wait_ended(3) == ["reset"] * 3
    assert proxy.cut(Cut.RESET) == 0, "nothing left to cut"
    later = connect(proxy)  # a connection after the cut is forwarded as usual
    later.close()


def test_client_silent_closes_the_server_side_and_the_client_hears_nothing(echo, proxy):
    client = connect(proxy)
    assert proxy.cut(Cut.CLIENT_SILENT) == 1
    assert echo.wait_ended(1) == ["eof"]
    client.sendall(b"anyone?")  # goes nowhere
    client.settimeout(0.5)
    with pytest.raises(socket.timeout):
        client.recv(1)
    client.close()


def test_server_silent_closes_the_client_side_and_the_server_hears_nothing(echo, proxy):
    client = connect(proxy)
    assert proxy.cut(Cut.SERVER_SILENT) == 1
    assert client.recv(1) == b"", "the client sees its connection end"
    client.close()
    assert echo.endings == [], "the server's side stays open"
    echo.conns[0].sendall(b"into the void")  # read and thrown away by the proxy
    echo.conns[0].shutdown(socket.SHUT_WR)   # the server lets go: so does the proxy
    assert echo.wait_ended(1) == ["eof"]


def test_a_silent_cut_in_the_middle_of_traffic_stays_silent(echo, proxy):
    """Cut while bytes flow both ways on many connections: no silenced side is closed or reset (a
    cut once closed them too, by handling an event of the side it had just closed)."""
    for _ in range(3):
        clients = [connect(proxy) for _ in range(8)]
        stop = threading.Event()

        def chatter(client):
            try:
                while not stop.is_set():
                    client.sendall(b"x" * 4096)
                    client.recv(65536)
            except OSError:
                pass

        threads = [threading.Thread(target=chatter, args=(client,), daemon=True) for client in clients]
        for client, thread in zip(clients, threads):
            client.settimeout(0.3)  # after the cut, a chatter's recv waits this long for nothing
            thread.start()
        time.sleep(0.05)
        assert proxy.cut(Cut.CLIENT_SILENT) == 8
        stop.set()
        for thread in threads:
            thread.join(5)
        time.sleep(0.2)  # a close would have come by now
        for client in clients:
            client.settimeout(0.02)
            try:
                while client.recv(65536):  # what was on its way before the cut
                    pass
                raise AssertionError("a client's side was closed")
            except socket.timeout:
                pass  # silent, as it should be
            client.close()
