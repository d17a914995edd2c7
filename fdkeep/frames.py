"""Length-prefixed JSON frames with file descriptors riding alongside.

Theory of operation
-------------------
Every message between holderd and its clients, and between chatctl and chatd's
control socket, is one *frame* on a UNIX stream socket::

    +---------------------+------------------+--------------------------+
    | body length: u32 BE | fd count: u16 BE | body: UTF-8 JSON object  |
    +---------------------+------------------+--------------------------+

A frame that carries descriptors sends them as SCM_RIGHTS ancillary data in the
same ``sendmsg`` as the frame's first byte (:mod:`fdkeep.fdpass`). The kernel
hands descriptors to the reader no later than the byte they were attached to,
so when a frame is complete every descriptor it announced has arrived. The
decoder keeps the descriptors it has received in arrival order and gives each
completed frame as many as its header announces. A frame that announces more
than arrived, or descriptors that no frame claims, is a protocol error: the
descriptors involved are closed, the frame is reported as bad, and the byte
stream stays in sync, so the connection can go on.

:class:`FrameDecoder` is pure: bytes and descriptors in, frames out, in the
shape of h11's ``receive_data``/``next_event``: :meth:`~FrameDecoder.feed`, then
:meth:`~FrameDecoder.next_frame` until it says it needs more. It never touches
a socket; :mod:`fdkeep.peer` is the edge that does.
"""

from __future__ import annotations

import json
import struct
from collections import deque
from dataclasses import dataclass, field

from .errors import Error
from .fdpass import MAX_FDS, close_fds

HEADER = struct.Struct(">IH")
#: A frame carries at most as many descriptors as one SCM_RIGHTS message.
MAX_FDS_PER_FRAME = MAX_FDS
DEFAULT_MAX_FRAME = 1 << 20
#: A batch of items (a STORE request, a RETRIEVE or LIST reply) is cut to at
#: most this many bytes, far below any reader's frame limit.
BATCH_BYTES = 256 * 1024


@dataclass
class Frame:
    body: dict
    fds: list[int] = field(default_factory=list)


def encode_frame(body: dict, fd_count: int = 0) -> bytes:
    """The bytes of one frame; its descriptors travel with them in SCM_RIGHTS."""
    if fd_count > MAX_FDS_PER_FRAME:
        raise ValueError(f"at most {MAX_FDS_PER_FRAME} fds fit in one frame, not {fd_count}")
    payload = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(len(payload), fd_count) + payload


def item_size(name: str, meta: bytes) -> int:
    """About how many bytes an item {name, meta in base64, ...} takes in a frame."""
    return len(name) + 4 * (len(meta) + 2) // 3 + 64


def batches(items: list, max_count: int, size_of) -> list[list]:
    """Split into batches of at most ``max_count`` items and BATCH_BYTES bytes (one
    item at least); an empty list is one empty batch."""
    result, current, used = [], [], 0
    for item in items:
        size = size_of(item)
        if current and (len(current) == max_count or used + size > BATCH_BYTES):
            result.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    result.append(current)
    return result


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


class FrameDecoder:
    """Reassembles frames from a byte stream and the descriptors that came with it."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME):
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._fds: deque[int] = deque()

    def feed(self, data: bytes, fds=()) -> None:
        self._buffer += data
        self._fds.extend(fds)

    @property
    def pending_bytes(self) -> int:
        """Bytes fed and not yet given out in a frame."""
        return len(self._buffer)

    @property
    def pending_fds(self) -> int:
        """Descriptors fed and not yet given out with a frame (this decoder closes them if it is closed)."""
        return len(self._fds)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None if more bytes are needed.

        Raises :class:`~fdkeep.errors.Error`; after a non-fatal one the caller
        may call again to get the frames that follow.
        """
        if len(self._buffer) < HEADER.size:
            return None
        length, fd_count = HEADER.unpack_from(self._buffer)
        if fd_count > MAX_FDS_PER_FRAME:
            raise Error(
                "bad-frame", f"a frame announces {fd_count} fds; at most {MAX_FDS_PER_FRAME} fit in one",
                fatal=True,
            )
        if length > self.max_frame:
            raise Error(
                "frame-too-large",
                f"frame body of {length} bytes exceeds the limit of {self.max_frame}",
                fatal=True,
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        payload = bytes(self._buffer[HEADER.size:end])
        del self._buffer[:end]
        if fd_count > len(self._fds):
            got = len(self._fds)
            self._drop_fds(got)
            raise Error("fd-count-mismatch", f"frame announced {fd_count} fds but {got} arrived")
        fds = [self._fds.popleft() for _ in range(fd_count)]
        if self._fds and not self._buffer:
            # Descriptors arrive no later than their frame's first byte; with no
            # frame under way, these belong to none.
            extra = len(self._fds)
            self._drop_fds(extra)
            close_fds(fds)
            raise Error("fd-count-mismatch", f"{extra} fds arrived that no frame announced")
        try:
            body = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as exc:
            close_fds(fds)
            raise Error("bad-frame", f"frame body is not UTF-8 JSON: {exc}") from None
        if not isinstance(body, dict):
            close_fds(fds)
            raise Error("bad-frame", "frame body must be a JSON object")
        return Frame(body, fds)

    def _drop_fds(self, count: int) -> None:
        close_fds([self._fds.popleft() for _ in range(count)])

    def close(self) -> None:
        """Close every descriptor received but not handed out."""
        self._drop_fds(len(self._fds))
        self._buffer.clear()
