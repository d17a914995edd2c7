"""How many connections one client address may have (``--max-per-address``): its one owner.

Theory of operation
-------------------
One host must not take every slot. :class:`AddressLimit` counts the clients of
each source address and says whether another may join; loopback is exempt (tests,
benchmarks, and a reverse proxy on this host carry many clients each). A refused
address is named in the log once, not per attempt, until one of its clients leaves.

Restored clients are counted a moment after a restore (:data:`LEARNING_DELAY`),
not during it: a ``getpeername`` each would slow the takeover.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING, Callable, Iterable

from fdkeep.loop import Loop

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("chatd")

#: How long after a restore chatd counts the restored clients' addresses.
LEARNING_DELAY = 1.0


def counted_address(peer) -> str:
    """The address a client counts against --max-per-address as; "" for loopback, which is
    exempt (tests, benchmarks, and a reverse proxy on this host carry many clients each)."""
    host = peer[0] if isinstance(peer, tuple) else ""
    if host.startswith("::ffff:"):
        host = host[7:]
    return "" if host.startswith("127.") or host == "::1" else host


class AddressLimit:
    def __init__(self, loop: Loop, most: int, connections: Callable[[], Iterable["Connection"]]):
        """``most``: connections an address may have (0: no limit); ``connections()``: every
        client served, for counting restored ones."""
        self.loop = loop
        self.most = most
        self._connections = connections
        self.counts: Counter[str] = Counter()
        self._refusing: set[str] = set()  # addresses told of in the log as over the limit
        self._learning = False

    def admits(self, address: str) -> bool:
        """Whether one more client from ``address`` may join (a refusal is logged once)."""
        if not self.most or not address or self.counts[address] < self.most:
            return True
        if address not in self._refusing:  # said once, not per attempt
            self._refusing.add(address)
            log.warning("refusing more clients from %s: it has %d connections (--max-per-address)",
                        address, self.most)
        return False

    def joined(self, connection: "Connection", address: str) -> None:
        connection.address = address
        if address:
            self.counts[address] += 1

    def left(self, connection: "Connection") -> None:
        address = connection.address
        if address:
            self.counts[address] -= 1
            if self.counts[address] <= 0:
                del self.counts[address]
            self._refusing.discard(address)

    def restored(self) -> None:
        """A client came back from a restore: count it soon, with the others."""
        if not self._learning:
            self._learning = True
            self.loop.call_later(LEARNING_DELAY, self._learn)

    def _learn(self) -> None:
        self._learning = False
        for connection in self._connections():
            if connection.address is None:
                try:
                    address = counted_address(connection.sock.getpeername())
                except OSError:
                    address = ""
                self.joined(connection, address)
