"""The kernel's byte counts tell what an application read and wrote, on loopback."""

import os
import random
import socket
import time

from fdkeep.tcpcount import CLOSE_WAIT, ESTABLISHED, stream_positions
from helpers import tcp_pair


def test_the_counts_match_what_was_really_read_and_written():
    client, server = tcp_pair()
    client.setblocking(False), server.setblocking(False)
    rng = random.Random(7)
    read = written = 0
    for _ in range(2000):
        try:
            choice = rng.random()
            if choice < 0.3:
                client.send(os.urandom(rng.randint(1, 70000)))
            elif choice < 0.6:
                read += len(server.recv(rng.randint(1, 70000)))
            elif choice < 0.8:
                written += server.send(os.urandom(rng.randint(1, 70000)))
            else:
                client.recv(rng.randint(1, 70000))
        except BlockingIOError:
            pass
        positions = stream_positions(server)
        assert (positions.read, positions.written) == (read, written)
    assert positions.state == ESTABLISHED
    client.close(), server.close()


def test_a_duplicate_in_another_descriptor_reads_the_same_and_the_fin_is_not_a_byte():
    client, server = tcp_pair()
    client.sendall(b"hello world")
    assert server.recv(3) == b"hel"
    twin = socket.socket(fileno=os.dup(server.fileno()))
    assert stream_positions(twin).read == 3
    client.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    positions = stream_positions(twin)
    assert (positions.read, positions.state) == (3, CLOSE_WAIT)
    assert server.recv(100) == b"lo world" and server.recv(100) == b""
    assert stream_positions(twin).read == 11
    twin.close(), client.close(), server.close()


def test_a_reset_without_a_fin_takes_nothing_off_and_a_fin_before_it_one():
    """In CLOSE the FIN may or may not have come: after a reset alone, the count is exact too,
    and what came before the reset is still read from where the count says."""
    import struct
    import time

    for fin_first in (False, True):
        for unread in (0, 5, 300):
            client, server = tcp_pair()
            client.sendall(b"x" * 1000)
            got = 0
            while got < 1000 - unread:
                got += len(server.recv(1000 - unread - got))
            if fin_first:
                client.shutdown(socket.SHUT_WR)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            deadline = time.monotonic() + 5
            # Waited for by TCP_INFO alone: stream_positions reads (so clears) the reset's error.
            while server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != 7 and time.monotonic() < deadline:
                time.sleep(0.01)
            positions = stream_positions(server)
            assert (positions.state, positions.read) == (7, got), (fin_first, unread)
            rest = b""
            while len(rest) < unread:
                rest += server.recv(1000)
            assert len(rest) == unread
            server.close()
