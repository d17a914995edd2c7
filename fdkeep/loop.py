"""The event loop every daemon runs on: epoll, with timers.

Theory of operation
-------------------
:class:`Loop` is a thin layer over ``epoll``: a callback per descriptor, called
with the event mask, and timers (:meth:`Loop.call_later`, :meth:`Loop.call_every`)
kept in a heap. :meth:`Loop.run_once` waits until the first of an event and the
earliest timer, runs the callbacks of what happened, then every timer that is
due. So periodic work (a status line for systemd, a watchdog ping, an audit of
the holders) is a timer, not a poll timeout plus a "has it been long enough"
check in every daemon.

A signal handler interrupts whatever code runs, so it must not do the work a
signal asks for. :meth:`Loop.call_from_signal_handler` is what it may do: it
queues a callback and writes a byte to a pipe the loop watches (Python retries
an epoll a signal interrupted, so a flag alone would wait for the next event);
the loop wakes and runs the callback among the turn's events.

It exists instead of :mod:`selectors` because holderd must watch held sockets
for hang-ups only, which is an epoll registration with an empty event mask
(EPOLLHUP and EPOLLERR are always reported); selectors cannot express that.
Callbacks run one at a time, in the loop's thread; a callback that raises ends
:meth:`Loop.run_once` with that exception, so callbacks catch what they expect.

:attr:`Loop.woke_at` is when the turn's wait ended: the moment the turn's events
were noticed, from which a daemon can measure how long it took to act on one.

Limits: timers fire no earlier than asked, and late by however long the
callbacks before them took; the loop is single-threaded by design.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import resource
import select
import signal
import time
from typing import Callable

IN = select.EPOLLIN
OUT = select.EPOLLOUT
HANGUP = select.EPOLLHUP | select.EPOLLERR


class Timer:
    """A pending call; :meth:`cancel` it to stop it (a repeating one too)."""

    __slots__ = ("when", "callback", "interval", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None], interval: float | None):
        self.when = when
        self.callback = callback
        self.interval = interval
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._timers: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()
        self._after_events: list[Callable[[], None]] = []
        self.clock = clock
        #: When the last wait for events ended (``clock()``): when this turn's events were noticed.
        self.woke_at = clock()
        #: Callbacks a signal handler asked for, and the self-pipe that wakes the loop for them.
        self._signalled: list[Callable[[], None]] = []
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.add(self._wake_read, IN, self._run_signalled)

    # -- descriptors -----------------------------------------------------------------
    def add(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def watching(self, fd: int) -> bool:
        return fd in self._callbacks

    # -- timers ----------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` once, ``delay`` seconds from now."""
        return self._schedule(Timer(self.clock() + delay, callback, None))

    def call_every(self, interval: float, callback: Callable[[], None], first: float | None = None) -> Timer:
        """Call ``callback()`` every ``interval`` seconds (the first time after ``first``, else ``interval``)."""
        if interval <= 0:
            raise ValueError("a repeating timer needs a positive interval")
        delay = interval if first is None else first
        return self._schedule(Timer(self.clock() + delay, callback, interval))

    def after_events(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` at the end of every :meth:`run_once`, after the events and timers:
        the place for work that groups what they did (one commit for many changes)."""
        self._after_events.append(callback)

    def call_from_signal_handler(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the loop's next turn, with its events. Safe in a signal
        handler: it only appends to a list and writes a byte to the loop's self-pipe."""
        self._signalled.append(callback)
        try:
            os.write(self._wake_write, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already: the loop wakes anyway

    def _run_signalled(self, mask: int) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass
        while self._signalled:
            self._signalled.pop(0)()

    def _schedule(self, timer: Timer) -> Timer:
        heapq.heappush(self._timers, (timer.when, next(self._order), timer))
        return timer

    def _next_timeout(self, timeout: float | None) -> float:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until = max(self._timers[0][0] - self.clock(), 0.0)
            timeout = until if timeout is None else min(timeout, until)
        return -1 if timeout is None else timeout

    def _run_due_timers(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            if timer.interval is not None:
                # Keep the rhythm, but never make up for missed calls in a burst.
                timer.when += timer.interval
                if timer.when <= now:
                    timer.when = now + timer.interval
                self._schedule(timer)
            timer.callback()

    # -- running ---------------------------------------------------------------------
    def run_once(self, timeout: float | None = None) -> None:
        """Wait for events (at most ``timeout`` seconds, and no later than the next timer) and handle them."""
        try:
            events = self._epoll.poll(self._next_timeout(timeout))
        except InterruptedError:
            events = []
        self.woke_at = self.clock()
        for fd, mask in events:
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback(mask)
        self._run_due_timers()
        for callback in self._after_events:
            callback()

    def run_forever(self) -> None:
        while True:
            self.run_once()

    def close(self) -> None:
        self._epoll.close()
        os.close(self._wake_read)
        os.close(self._wake_write)


class AcceptPause:
    """Stops accepting for a moment when ``accept()`` fails for want of fds or memory.

    A listening socket stays readable while clients wait in its backlog, so an
    ``accept()`` that fails with EMFILE, ENFILE, ENOBUFS or ENOMEM and is tried
    again at the next event spins at full CPU and floods the log. Instead, on a
    failure every listener given to :meth:`add` is unwatched for ``seconds``
    (clients wait in the backlog meanwhile; the kernel completes their
    handshakes), the failure is logged once, however long it lasts, and the
    first accept that works again says how long it lasted.
    """

    def __init__(self, loop: Loop, logger: logging.Logger, what: str, seconds: float = 0.5):
        self.loop = loop
        self.log = logger
        self.what = what
        self.seconds = seconds
        self.paused = False
        self._listeners: list[int] = []
        self._failing_since: float | None = None

    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        """Watch listener ``fd`` on the loop, calling ``callback(mask)`` when a client waits."""
        self._listeners.append(fd)
        self.loop.add(fd, 0 if self.paused else IN, callback)

    def remove(self, fd: int) -> None:
        """Stop watching listener ``fd`` (before it is closed: its number may come back)."""
        if fd in self._listeners:
            self._listeners.remove(fd)
        self.loop.remove(fd)

    def failed(self, exc: OSError, detail: str = "") -> None:
        """``accept()`` raised ``exc`` (not EAGAIN): pause every listener."""
        if self.paused:
            return
        self.paused = True
        if self._failing_since is None:
            self._failing_since = self.loop.clock()
            self.log.error("%s: accept failed (%s)%s; not accepting for %.1f s at a time until it works again",
                           self.what, exc.strerror or exc, detail, self.seconds)
        for fd in self._listeners:
            if self.loop.watching(fd):
                self.loop.modify(fd, 0)
        self.loop.call_later(self.seconds, self._resume)

    def _resume(self) -> None:
        self.paused = False
        self._listeners = [fd for fd in self._listeners if self.loop.watching(fd)]
        for fd in self._listeners:
            self.loop.modify(fd, IN)

    def accepted(self) -> None:
        """An ``accept()`` worked: if it had been failing, say it is over."""
        if self._failing_since is not None:
            self.log.warning("%s: accepting again, after %.1f s of failures", self.what,
                             self.loop.clock() - self._failing_since)
            self._failing_since = None


def stop_on_signals(logger: logging.Logger, unless: Callable[[signal.Signals], bool] | None = None) -> None:
    """SIGTERM and SIGINT end the daemon's loop by raising SystemExit, unless ``unless(signal)``,
    asked first, takes the signal (True) to be handled otherwise: it runs in the handler, so it
    may only decide and ask the loop (:meth:`Loop.call_from_signal_handler`).

    Raising is needed: Python retries an epoll interrupted by a signal, so a flag
    set in a handler would not be seen until the next event.
    """

    def stop(signum, frame):
        if unless is not None and unless(signal.Signals(signum)):
            return
        logger.info("%s: stopping", signal.Signals(signum).name)
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one: holding sockets is the job."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard
