"""How far a TCP stream has gone, by the kernel's own count.

Theory of operation
-------------------
For a TCP socket the kernel keeps, in ``TCP_INFO``, how many bytes the peer
has acknowledged (``tcpi_bytes_acked``) and how many have arrived
(``tcpi_bytes_received``), and the ioctls ``SIOCOUTQ`` and ``SIOCINQ`` say how
many bytes sit in the send queue (not yet acknowledged) and in the receive
queue (not yet read). Together::

    bytes the application has written = tcpi_bytes_acked + SIOCOUTQ
    bytes the application has read    = tcpi_bytes_received - SIOCINQ

These counts belong to the socket, not to a process: any duplicate of it, in
any process, reads the same numbers. So a process that takes a socket over
from a dead one learns exactly how much of each direction the dead one had
read and written, without having been told.

The socket may be live while it is sampled (data arriving, acknowledgements
coming back), so :func:`stream_positions` reads ``TCP_INFO`` before and after
the two ioctls and repeats until both readings agree. Two edges, from the
kernel's ``tcp_get_info``/``tcp_ioctl``: once the peer's FIN has arrived the
read side counts one byte more (the FIN's sequence number), which is taken
off here; once our own FIN is acknowledged the write side counts one more
(only sockets we shut down ourselves, which nobody takes over). A socket
still in a SYN state reads 0 both ways. In ``CLOSE`` the state does not say
whether a FIN came before the end: a reset alone (the peer closed with unread
data, or with ``SO_LINGER`` 0) leaves ``tcpi_bytes_received`` without it, while
the data before the reset can still be read. The socket's pending error tells
them apart (``ECONNRESET``: a reset, no FIN), and reading it clears it: a later
read sees an end of file instead of the reset, which is the same to its reader.

Checked on loopback over thousands of random reads and writes in both
directions (tests/unit/test_tcpcount.py does it on every run).
"""

from __future__ import annotations

import array
import errno
import fcntl
import socket
import struct
import termios
from dataclasses import dataclass

SIOCINQ = termios.FIONREAD
SIOCOUTQ = termios.TIOCOUTQ
TCP_INFO_SIZE = 232
#: tcpi_bytes_acked and tcpi_bytes_received, both u64, in struct tcp_info.
BYTE_COUNTS = struct.Struct("<QQ")
BYTE_COUNTS_OFFSET = 120

ESTABLISHED, CLOSE, CLOSE_WAIT = 1, 7, 8
#: States in which the peer's FIN has arrived (and counts as a byte read).
FIN_RECEIVED = {6, 7, 8, 9, 11}  # TIME_WAIT, CLOSE, CLOSE_WAIT, LAST_ACK, CLOSING
STATE_NAMES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
               7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}


@dataclass(frozen=True)
class Positions:
    #: Bytes of the incoming stream the application has read.
    read: int
    #: Bytes of the outgoing stream the application has written.
    written: int
    #: The TCP state (1 ESTABLISHED, 8 CLOSE_WAIT, ...).
    state: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, str(self.state))


def _ioctl(fd: int, request: int) -> int:
    value = array.array("i", [0])
    fcntl.ioctl(fd, request, value, True)
    return value[0]


def stream_positions(sock: socket.socket, attempts: int = 1000) -> Positions:
    """Where the socket's two streams stand, sampled until ``TCP_INFO`` is stable around the ioctls."""
    fd = sock.fileno()
    for _ in range(attempts):
        before = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        inq = _ioctl(fd, SIOCINQ)
        outq = _ioctl(fd, SIOCOUTQ)
        after = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_SIZE)
        if before == after:
            break
    else:
        raise OSError(f"TCP_INFO of fd {fd} never held still over {attempts} samples")
    state = after[0]
    acked, received = BYTE_COUNTS.unpack_from(after, BYTE_COUNTS_OFFSET)
    fin = state in FIN_RECEIVED
    if state == CLOSE and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
        fin = False  # reset without a FIN: nothing to take off
    read = received - inq - (1 if fin else 0)
    return Positions(max(read, 0), acked + outq, state)
