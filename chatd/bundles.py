"""chatd's client sockets, kept by the holders as a few bundles, not one name each.

Theory of operation
-------------------
Every client socket is appended, right after its ``accept()``, to the bundle
(:mod:`fdkeep.bundle`) of its journal slot's *shard*: slots ``0..255`` in shard
0, ``256..511`` in shard 1, and so on. A bundle is a UNIX socketpair whose
queue holds the sockets in flight; both of its ends are stored in every holder
(holderd and systemd's fd store) under ``chatd/bundle/<shard>/<generation>/w``
and ``…/r``. Appending is one local ``sendmsg``: no round trip, nothing to wait
for, and the holders' work does not grow with the clients. With the listening
socket and the journal that makes ``2 + 2 × shards`` names, whatever the count
of clients (80 shards at 20,000 slots).

A socket closed on purpose is shut down, which ends it for every copy at once,
and forgotten here: its entry stays in the queue, dead, until the shard is
rebuilt. A shard is rebuilt (its live sockets packed 253 a message into a
fresh socketpair) when its queue is full (the kernel charges it to the
writer's send buffer), and in the background when its dead are many or its
sockets went one a message; it is dropped when none is left alive. A replaced
bundle is drained once its successor is stored everywhere, so that a copy of
it a holder still keeps cannot keep sockets in flight. The order makes a
crash at any point harmless: the fresh bundle is complete before it is stored,
and the old one is removed only after the fresh one is stored everywhere, so
a holder always keeps at least one whole bundle per shard, and a restore takes
each shard's highest generation.

Why 256 slots a shard: fds in flight count against chatd's ``RLIMIT_NOFILE``
(the kernel refuses past it), and while a shard is rebuilt both generations
are in flight; small shards keep that extra small.
"""

from __future__ import annotations

import errno
import logging
import re

from fdkeep.bundle import Bundle, Shard
from fdkeep.errors import Error

from .holders import PREFIX, Holders, Item

log = logging.getLogger("chatd")

SHARD_SLOTS = 256
BUNDLE_PREFIX = PREFIX + "bundle/"
NAME = re.compile(r"chatd/bundle/(\d+)/(\d+)/([wr])\Z")


#: Descriptors chatd needs besides one per client: the listeners, the journal,
#: the epoll fd, holderd and control connections, logs, imports, and what a
#: restore holds for a moment.
OWN_FDS = 128


def clients_the_fd_limit_allows(fd_limit: int, shard_slots: int = SHARD_SLOTS) -> int:
    """How many clients chatd can hold under ``RLIMIT_NOFILE`` = ``fd_limit``.

    Two counts must stay under it. Open fds: one socket per client, two ends
    per shard's bundle, and chatd's own. Fds in flight, which the kernel counts
    per user against the sender's limit (``ETOOMANYREFS`` past it, unless the
    sender has CAP_SYS_RESOURCE): one per client, and a shard's worth more
    while that shard is rebuilt.
    """
    by_open_fds = (fd_limit - OWN_FDS - 2) * shard_slots // (shard_slots + 2)
    by_fds_in_flight = fd_limit - shard_slots
    return max(min(by_open_fds, by_fds_in_flight), 0)


def names(shard: int, generation: int) -> tuple[str, str]:
    base = f"{BUNDLE_PREFIX}{shard}/{generation}/"
    return base + "w", base + "r"


def parse_name(name: str) -> tuple[int, int, str] | None:
    """``chatd/bundle/3/7/r`` -> (3, 7, "r")."""
    match = NAME.match(name)
    return (int(match[1]), int(match[2]), match[3]) if match else None


class ClientBundles:
    def __init__(self, holders: Holders, shard_slots: int = SHARD_SLOTS):
        self.holders = holders
        self.shard_slots = shard_slots
        self.shards: dict[int, Shard] = {}

    def shard_of(self, slot: int) -> int:
        return slot // self.shard_slots

    def items(self) -> list[Item]:
        """What the holders must keep for the client sockets: two ends per shard."""
        return [item for shard in self.shards.values() for item in self._items_of(shard)]

    def held_in(self, slot: int, held: dict[str, int]) -> bool:
        """Whether a holder that keeps ``held`` (name -> inode) keeps the socket in ``slot``."""
        shard = self.shards.get(self.shard_of(slot))
        return shard is not None and slot in shard.live and set(names(shard.number, shard.generation)) <= held.keys()

    def add(self, slot: int, fd: int) -> None:
        """Keep the socket in ``slot``: appended to its shard at once. Raises Error
        ``too-many-in-flight`` when the kernel keeps no more fds in flight for this user
        even after the dead are packed away (the caller refuses the client)."""
        try:
            self._add(slot, fd)
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise
            for shard in sorted(self.shards.values(), key=lambda s: s.dead, reverse=True):
                if shard.dead:
                    self.rebuild(shard.number, "the kernel's limit of fds in flight was reached")
            try:
                self._add(slot, fd)
            except OSError as again:
                if again.errno != errno.ETOOMANYREFS:
                    raise
                raise Error("too-many-in-flight", "the kernel keeps no more fds in flight for chatd's user "
                            "(RLIMIT_NOFILE): raise LimitNOFILE= or lower --max-clients") from None

    def _add(self, slot: int, fd: int) -> None:
        number = self.shard_of(slot)
        shard = self.shards.get(number)
        if shard is None:
            shard = self.shards[number] = Shard(number, Bundle.create(), generation=1, live={slot: fd})
            try:
                shard.bundle.append([(slot, fd)])
            except BaseException:
                del self.shards[number]
                shard.bundle.close()
                raise
            self.holders.store(self._items_of(shard))
        elif not shard.add([(slot, fd)]):
            shard.live[slot] = fd
            self.rebuild(number, "its queue is full")

    def forget(self, slot: int) -> None:
        """The socket in ``slot`` was closed on purpose (and shut down)."""
        shard = self.shards.get(self.shard_of(slot))
        if shard is None:
            return
        shard.forget(slot)
        if not shard.live:  # nothing left to keep: the bundle goes, and the dead in it with it
            del self.shards[shard.number]
            self.holders.remove(list(names(shard.number, shard.generation)))
            shard.bundle.drain()
            shard.bundle.close()

    def tidy(self) -> None:
        """Rebuild one shard with many dead, or one whose sockets went in one message each (as
        accepts append them): fewer fds in flight, fewer messages for a restore to read, room
        in the queue. One a call, so that the loop is never held long; called from a timer."""
        for number, shard in self.shards.items():
            if shard.worth_rebuilding():
                self.rebuild(number, f"{shard.dead} dead against {len(shard.live)} live")
                return
        for number, shard in self.shards.items():
            if shard.worth_packing():
                self.rebuild(number, f"{shard.messages} messages for {len(shard.live)} sockets")
                return

    def rebuild(self, number: int, why: str) -> None:
        """A fresh bundle with the live sockets packed: stored everywhere, then the old one removed."""
        old = self.shards[number]
        fresh = old.rebuilt()
        self.holders.store(self._items_of(fresh))
        self.shards[number] = fresh
        self.holders.remove(list(names(old.number, old.generation)))
        old.bundle.drain()  # a copy of the old pair kept anywhere must not keep its sockets in flight
        old.bundle.close()
        log.info("bundle %d rebuilt as generation %d with %d sockets (%s)", number, fresh.generation,
                 len(fresh.live), why)

    def rebuild_all(self) -> int:
        for number in list(self.shards):
            self.rebuild(number, "a backup was asked for")
        return sum(len(shard.live) for shard in self.shards.values())

    def adopt(self, shard: Shard) -> None:
        """A shard taken back at restore."""
        self.shards[shard.number] = shard

    @staticmethod
    def _items_of(shard: Shard) -> list[Item]:
        writer, reader = shard.bundle.fds()
        writer_name, reader_name = names(shard.number, shard.generation)
        return [(writer_name, b"", writer), (reader_name, b"", reader)]
