"""Where chatd keeps copies of its descriptors: the *holders*, behind one interface.

Theory of operation
-------------------
A :class:`Holder` takes (name, metadata, fd) items, forgets names, and gives
back what it holds after a crash. There are two: holderd
(:class:`HolderdHolder`, over its UNIX socket) and systemd's fd store
(:class:`SystemdHolder`). Either alone is enough to restore. :class:`Holders`
is the fan-out chatd talks to: every store and remove goes to each holder, a
restore asks each, and an audit puts back into a holder what it lost (holderd
restarted empty, or a stop emptied systemd's store).

chatd never stops serving because a holder is down: each failure is logged
once, when the holder goes from working to failing, and its recovery likewise.

Names: ``chatd/listen`` and ``chatd/listen-web`` (the listening sockets of the
line and the web port), ``chatd/state`` (the journal
memfd), ``chatd/last-words`` (how the serving chatd died, :mod:`chatd.lastwords`)
and ``chatd/bundle/<shard>/<generation>/w`` and ``/r``, the two ends of
each bundle of client sockets (:mod:`chatd.bundles`): a few names, whatever the
count of clients.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Protocol

from fdkeep.errors import Error
from fdkeep.loop import Loop, Timer
from fdkeep.systemd import ServiceManager
from fdkeep.text import plural
from fdkeep.peer import FrameSocket
from holderd.client import HolderClient, Retrieved

log = logging.getLogger("chatd")

PREFIX = "chatd/"
LISTEN_NAME = PREFIX + "listen"
LISTEN_WEB_NAME = PREFIX + "listen-web"
STATE_NAME = PREFIX + "state"
LAST_WORDS_NAME = PREFIX + "last-words"

#: (name, metadata, fd): what a holder keeps.
Item = tuple[str, bytes, int]


class Holder(Protocol):
    #: A short name for logs and reports ("holderd", "systemd").
    label: str
    #: True after the last call worked, False after it failed, None before any.
    working: bool | None
    #: Why the last call failed, until a store works again (a backup's report says it).
    last_error: str | None
    #: Whether :meth:`held` is the holder's own answer (holderd's LIST), or only what
    #: chatd handed it and it took (systemd's store answers with no list).
    lists_what_it_holds: bool

    def retry_now(self) -> None:
        """Let the next call ask this holder even if it failed a moment ago (an operator's backup)."""

    def store(self, items: list[Item]) -> bool:
        """Keep these fds (a name stored again is replaced); False if the holder failed."""

    def remove(self, names: list[str]) -> bool:
        """Forget these names."""

    def retrieve(self) -> list[Retrieved]:
        """Duplicates of all chatd's fds this holder keeps; the caller owns them."""

    def forget_all(self, why: str) -> bool:
        """Forget everything chatd stored; ``why`` ends the log line that says so
        (``--fresh``, or a standby's reason)."""

    def held(self) -> dict[str, int] | None:
        """What this holder keeps for chatd: name -> inode; None if it cannot be asked."""


class HolderdHolder:
    """holderd, reached over its UNIX socket.

    Calls are blocking, and short: holderd answers in well under a millisecond,
    and chatd calls it only for a few names (a new or rebuilt bundle, the
    audit). A holderd that does not answer within :data:`TIMEOUT` is left alone
    for :data:`RETRY_AFTER` seconds (calls meanwhile are skipped and logged as
    failed), so a hung holderd costs chatd's loop at most one timeout each time.
    A holderd that is not there at all (nothing listens: the call fails at
    once) costs nothing to ask: once chatd's loop runs, it is probed every
    :data:`PROBE_INTERVAL`, whether it went away or was never found, and
    everything is stored in it the moment it answers.
    """

    label = "holderd"
    lists_what_it_holds = True
    TIMEOUT = 1.0
    RETRY_AFTER = 5.0
    #: How often a holderd that went away is asked whether it is back.
    PROBE_INTERVAL = 0.1

    def __init__(self, path: str | None):
        self.client = HolderClient(path, timeout=self.TIMEOUT)
        self.working: bool | None = None
        self._retry_at = 0.0
        self._loop: Loop | None = None
        self._refill = None
        self._watched: FrameSocket | None = None
        self._watched_fd = -1
        self._probe: Timer | None = None
        #: Why the last call failed (for reports), until a store works.
        self.last_error: str | None = None
        #: The last call failed at once (nothing listens), not by a timeout: cheap to probe.
        self._refused = False

    # -- hearing at once that holderd went away ------------------------------------------
    def watch(self, loop: Loop, refill) -> None:
        """Hear at once when holderd goes away, and call ``refill()`` as soon as it answers again.

        holderd that stops or crashes closes chatd's connection to it: the loop
        sees the hang-up (a registration with no events, as holderd watches the
        sockets it holds). Until holderd is back, chatd's sockets are kept in one
        holder fewer, and without systemd's store, in none: so the new holderd is
        probed every :data:`PROBE_INTERVAL`, not at the next audit, and ``refill``
        (chatd's audit: store what holderd lacks) runs the moment it answers.
        """
        self._loop, self._refill = loop, refill
        self._follow_connection()
        if self.working is False and self._refused:  # not found at start: found the moment it starts
            self._start_probing()

    def _follow_connection(self) -> None:
        """Watch the connection the client has now (a new one after a failure, perhaps
        under the number of the old one: connections are compared, not numbers)."""
        if self._loop is None or self.client.connection is self._watched:
            return
        self._unwatch()
        self._watched = self.client.connection
        if self._watched is not None:
            self._watched_fd = self._watched.sock.fileno()
            self._loop.add(self._watched_fd, 0, self._hung_up)

    def _unwatch(self) -> None:
        # By the number it was watched under: the connection may be closed already.
        if self._watched is not None:
            self._loop.remove(self._watched_fd)
            self._watched = None

    def _hung_up(self, mask: int) -> None:
        self._unwatch()
        self.client.close()
        if self._probe is None:
            log.warning("holderd at %s went away: asking every %.1f s until it is back, then storing "
                        "everything again", self.client.path, self.PROBE_INTERVAL)
            self.working = False
            self.last_error = "holderd went away"
            self._start_probing()

    def _start_probing(self) -> None:
        if self._loop is not None and self._probe is None:
            self._probe = self._loop.call_every(self.PROBE_INTERVAL, self._probe_back)

    def _probe_back(self) -> None:
        began = time.monotonic()
        try:
            self.client.ping()
        except Error as exc:
            self.client.close()
            self.last_error = exc.message
            if time.monotonic() - began >= self.TIMEOUT / 2:
                # Something listens but does not answer: asking every PROBE_INTERVAL would
                # block the loop most of the time. Left to the calls, RETRY_AFTER apart.
                self._stop_probing()
                self._retry_at = time.monotonic() + self.RETRY_AFTER
            return
        self._stop_probing()
        self._retry_at = 0.0
        self._outcome(None, "probing")
        self._follow_connection()
        self._refill()

    def _stop_probing(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            self._probe = None

    def _outcome(self, error: Error | None, what: str, seconds: float = 0.0) -> bool:
        """Note how a call ended (it took ``seconds``); True if it worked."""
        if error is None:
            if self.working is False:
                log.info("holderd at %s works again", self.client.path)
            self.working = True
            return True
        self.last_error = error.message
        if error.code == "unavailable":
            self._refused = seconds < self.TIMEOUT / 2
            if self.working is not False:
                retried = (f"asked every {self.PROBE_INTERVAL:.1f} s until it answers" if self._refused
                           else f"retried in {self.RETRY_AFTER:.0f} s")
                log.warning("holderd unavailable, %s skipped (%s): %s", what, retried, error.message)
            self.working = False
            self._retry_at = time.monotonic() + self.RETRY_AFTER
            if self._refused:
                self._start_probing()
        else:
            log.warning("holderd refused %s: %s", what, error)
        return False

    def retry_now(self) -> None:
        self._retry_at = 0.0

    def _attempt(self, what: str, call):
        """``call()``'s result, or None if holderd failed (logged as its state changes)."""
        if self.working is False and time.monotonic() < self._retry_at:
            return None
        began = time.monotonic()
        try:
            result = call()
        except Error as exc:
            self._outcome(exc, what, time.monotonic() - began)
            return None
        finally:
            self._follow_connection()
        self._outcome(None, what)
        return result

    def store(self, items: list[Item]) -> bool:
        stored = self._attempt(f"storing {plural(len(items), 'fd')}", lambda: self.client.store(items)) is not None
        if stored:
            self.last_error = None
        return stored

    def remove(self, names: list[str]) -> bool:
        return self._attempt(f"removing {plural(len(names), 'name')}", lambda: self.client.remove(names=names)) is not None

    def retrieve(self) -> list[Retrieved]:
        return self._attempt("retrieving", lambda: self.client.retrieve(PREFIX)) or []

    def forget_all(self, why: str) -> bool:
        removed = self._attempt("forgetting everything", lambda: self.client.remove(prefix=PREFIX))
        if removed:
            log.info("holderd forgot the %s it kept for chatd (%s)", plural(removed, "fd"), why)
        return removed is not None

    def held(self) -> dict[str, int] | None:
        items = self._attempt("listing", lambda: self.client.list(PREFIX))
        return None if items is None else {item["name"]: item["ino"] for item in items}


class SystemdHolder:
    """systemd's fd store, for a chatd that systemd started.

    The store keeps no metadata, and needs none: a client's pairing and
    counters are in the journal, which is stored too, so the store alone
    restores everything. systemd ignores a socket it already holds, whatever
    name comes with it, so an fd is sent only once per name; a name whose
    socket changed is removed first. Re-sending would cost PID 1 more than it
    seems: it compares each incoming fd with every stored one.
    """

    label = "systemd"
    lists_what_it_holds = False

    def __init__(self, manager: ServiceManager):
        self.manager = manager
        self.working: bool | None = True
        self.last_error: str | None = None
        self._stored: dict[str, int] = {}  # name -> inode of the socket systemd took under it

    def retry_now(self) -> None:
        pass  # every call asks systemd

    def store(self, items: list[Item]) -> bool:
        for name, _meta, fd in items:
            inode = os.fstat(fd).st_ino
            previous = self._stored.get(name)
            if previous == inode:
                continue
            if previous is not None:
                self.manager.remove(name)
                del self._stored[name]
            self.working = self.manager.store(name, fd)
            if self.working:
                self._stored[name] = inode
                self.last_error = None
            else:
                self.last_error = f"systemd's notify socket did not take {name}"
        return bool(self.working)

    def remove(self, names: list[str]) -> bool:
        for name in names:
            if self._stored.pop(name, None) is not None:
                self.manager.remove(name)
        return True

    def retrieve(self) -> list[Retrieved]:
        items = []
        for fd, name in sorted(self.manager.take_passed_fds().items()):
            if not name.startswith(PREFIX):
                log.warning("systemd passed fd %d named %r, not chatd's: closing it", fd, name)
                self.manager.remove(name)
                os.close(fd)
                continue
            inode = os.fstat(fd).st_ino
            self._stored[name] = inode
            items.append(Retrieved(name, b"", fd, inode))
        return items

    def forget_all(self, why: str) -> bool:
        passed = self.manager.take_passed_fds()
        for fd in passed:
            os.close(fd)
        names = set(self._stored) | set(passed.values())
        for name in names:
            self.manager.remove(name)
        self._stored.clear()
        if names:
            log.info("systemd's fd store forgot the %s it kept for chatd (%s)", plural(len(names), "fd"), why)
        return True

    def held(self) -> dict[str, int]:
        return dict(self._stored)


class Holders:
    """Every holder chatd uses, as one: the fan-out of stores, removes and restores."""

    def __init__(self, holders: list[Holder]):
        self.holders = holders

    def __iter__(self):
        return iter(self.holders)

    def watch(self, loop: Loop, refill) -> None:
        """Let each holder that can tell it went away call ``refill()`` once it is back."""
        for holder in self.holders:
            if isinstance(holder, HolderdHolder):
                holder.watch(loop, refill)

    def store(self, items: list[Item]) -> None:
        for holder in self.holders:
            holder.store(items)

    def remove(self, names: list[str]) -> None:
        for holder in self.holders:
            holder.remove(names)

    def forget_all(self, why: str) -> None:
        for holder in self.holders:
            holder.forget_all(why)

    def retrieve(self) -> list[tuple[Holder, list[Retrieved]]]:
        """What each holder kept: duplicates, which the caller owns."""
        return [(holder, holder.retrieve()) for holder in self.holders]

    def store_what_each_lacks(self, items: list[Item], kept: list[tuple[Holder, list[Retrieved]]]) -> None:
        """After a restore, each holder gets what only another kept (holderd restarted
        empty, or systemd's store emptied by a stop): either copy alone must suffice again."""
        described = [(name, meta, fd, os.fstat(fd).st_ino) for name, meta, fd in items]
        for holder, its_items in kept:
            has = {(item.name, item.ino) for item in its_items}
            lacking = [(name, meta, fd) for name, meta, fd, ino in described if (name, ino) not in has]
            if lacking:
                log.info("%s lacked %d of %d fds: storing them", holder.label, len(lacking), len(items))
                holder.store(lacking)

    def audit(self, items: list[Item]) -> None:
        """Store again, in each holder, what it does not keep as chatd has it: a name it lost
        (holderd restarted empty), or one it keeps for another fd. Names are compared with
        their inodes, and only chatd's own count: whatever else its uid keeps hides nothing."""
        expected = {name: (meta, fd, os.fstat(fd).st_ino) for name, meta, fd in items}
        for holder in self.holders:
            held = holder.held()
            if held is None:
                continue
            lacking = [(name, meta, fd) for name, (meta, fd, ino) in expected.items() if held.get(name) != ino]
            if lacking:
                log.warning("%s keeps %d of chatd's %d fds as they are: storing the other %d again",
                            holder.label, len(expected) - len(lacking), len(expected), len(lacking))
                holder.store(lacking)

    def confirm(self, items: list[Item]) -> list[dict]:
        """What each holder keeps of ``items``, as it answers (holderd: its LIST, names with
        inodes), or as far as chatd can know (systemd's store answers with no list: what it
        took). One report a holder: ``keeps`` and ``missing`` (names), ``error`` if it failed."""
        expected = {name: os.fstat(fd).st_ino for name, _meta, fd in items}
        reports = []
        for holder in self.holders:
            held = holder.held()
            missing = sorted(expected) if held is None else sorted(n for n, ino in expected.items() if held.get(n) != ino)
            reports.append({
                "holder": holder.label,
                "answered": held is not None,
                "listed": holder.lists_what_it_holds,
                "keeps": len(expected) - len(missing),
                "missing": missing,
                "error": holder.last_error if held is None or missing else None,
            })
        return reports

    def report(self) -> tuple[dict, dict]:
        """({label: working}, {label: how many of chatd's fds it holds, or None})."""
        working = {holder.label: holder.working for holder in self.holders}
        held = {}
        for holder in self.holders:
            names = holder.held()
            held[holder.label] = None if names is None else len(names)
        return working, held

