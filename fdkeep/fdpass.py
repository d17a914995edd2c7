"""File descriptors across UNIX sockets: SCM_RIGHTS on the stdlib's calls.

``socket.send_fds`` does the packing for sending. For receiving, this module
calls ``recvmsg`` itself: Python 3.11's ``socket.recv_fds`` ignores its
``flags`` argument (a ``MSG_PEEK`` would silently consume). What the module
adds is the rule the kernel leaves to us: when a receiver gets ``MSG_CTRUNC``
the kernel has dropped descriptors (the receiver is out of fds, or a sender
put more than :data:`MAX_FDS` in one message), and nobody can tell which
message they belonged to. That is reported as a fatal :class:`~fdkeep.errors.Error`
``no-resources`` and the descriptors that did arrive are closed.
"""

from __future__ import annotations

import array
import os
import socket

from .errors import Error

#: SCM_RIGHTS carries at most this many descriptors in one message (SCM_MAX_FD).
MAX_FDS = 253
FD_SIZE = array.array("i").itemsize


def close_fds(fds) -> None:
    """Close each descriptor, ignoring ones already closed."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def send_with_fds(sock: socket.socket, data, fds=()) -> int:
    """One ``sendmsg``: ``data`` with ``fds`` riding on its first byte; bytes sent."""
    if fds:
        return socket.send_fds(sock, [data], list(fds))
    return sock.send(data)


def recv_with_fds(sock: socket.socket, size: int = 65536, flags: int = 0) -> tuple[bytes, list[int]]:
    """One ``recvmsg`` (with ``flags``): the bytes and the descriptors that came with them."""
    data, ancillary, msg_flags, _ = sock.recvmsg(size, socket.CMSG_SPACE(MAX_FDS * FD_SIZE), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % FD_SIZE])
    fds = list(fds)
    if msg_flags & socket.MSG_CTRUNC:
        close_fds(fds)
        raise Error(
            "no-resources",
            "fds sent to us were lost: the receiver's fd limit is reached or a message carried over "
            f"{MAX_FDS}; reconnect and retry later",
            fatal=True,
        )
    return data, fds
