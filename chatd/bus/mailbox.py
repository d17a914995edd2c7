"""Where chatd's thread and the bus thread meet: commands one way, results the other.

Theory of operation
-------------------
chatd's thread runs an epoll loop and must never block on the bus thread; the
bus thread runs asyncio and must never block on chatd's. A :class:`Mailbox` is
all they share (besides read-only settings and the bus thread's gauges), and
each of its methods is called by one side only:

============================  ==========================================
chatd's thread                the bus thread
============================  ==========================================
:meth:`~Mailbox.post_command`  :meth:`~Mailbox.open` (once, first)
:meth:`~Mailbox.take_results`  :meth:`~Mailbox.take_commands`
:meth:`~Mailbox.fileno`        :meth:`~Mailbox.post_result`
:meth:`~Mailbox.close`
:meth:`~Mailbox.close_eventfd`
============================  ==========================================

Each direction is a deque (``append`` and ``popleft`` are atomic) and a flag
that says a wake-up is already on its way, so that a burst costs one wake-up:

* **commands**: :meth:`post_command` appends, and wakes the bus thread (with the
  ``wake`` it gave :meth:`open`) only if ``_wake_pending`` is clear, setting it.
  The bus thread clears it in :meth:`take_commands` *before* it drains: a
  command appended after the drain began either is drained too or finds the
  flag clear and wakes the thread again. The flag starts set: until the bus
  thread opens the mailbox there is nothing to wake, and its first
  :meth:`take_commands` takes everything posted before.
* **results**: :meth:`post_result` appends, and makes the eventfd readable only
  if ``_eventfd_armed`` is clear, setting it. chatd's thread, woken by the
  eventfd, reads it, clears the flag and *then* drains: a result appended after
  the drain finds the flag clear and writes the eventfd again. No wake-up is
  lost either way.

:meth:`close` sets ``closed`` and wakes the bus thread, which ends when its
:meth:`take_commands` finds it set; if the bus thread has not opened the mailbox
yet, :meth:`open` says so and the thread ends at once.

The mailbox also counts the results of one kind (``backlog_of``) posted and not
yet taken, so that the bus thread can stop producing them while chatd is behind.
Which thread writes which field is said beside each field below; a field is
read, never written, by the other side.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Callable


class Mailbox:
    """Two queues, an eventfd and two wake-up flags between chatd's thread and the bus thread."""

    def __init__(self, backlog_of: type | None = None):
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._commands: deque = deque()  # appended by chatd's thread, taken by the bus thread
        self._results: deque = deque()  # appended by the bus thread, taken by chatd's thread
        #: A wake-up of the bus thread is on its way: set by chatd's thread, cleared by the bus thread.
        self._wake_pending = True
        #: The eventfd is (or is about to be) readable: set by the bus thread, cleared by chatd's thread.
        self._eventfd_armed = False
        #: How chatd's thread wakes the bus thread: given once by the bus thread (open).
        self._wake: Callable[[], Any] | None = None
        #: No more commands; the bus thread is to stop: set by chatd's thread.
        self.closed = False
        self._backlog_of = backlog_of
        self._backlog_posted = 0  # written by the bus thread
        self._backlog_taken = 0  # written by chatd's thread

    @property
    def backlog(self) -> int:
        """Results of the ``backlog_of`` kind posted and not yet taken (either thread may ask)."""
        return self._backlog_posted - self._backlog_taken

    # -- chatd's thread ----------------------------------------------------------------
    def fileno(self) -> int:
        """The eventfd: readable when :meth:`take_results` has something."""
        return self._eventfd

    def post_command(self, command) -> None:
        """Queue ``command`` for the bus thread, waking it unless a wake-up is on its way."""
        self._commands.append(command)
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def take_results(self) -> list:
        """Every result posted since the last call, oldest first (and the eventfd read)."""
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass
        self._eventfd_armed = False  # after the read, before the drain: see the theory of operation
        results = self._results
        taken = [results.popleft() for _ in range(len(results))]
        if self._backlog_of is not None:
            self._backlog_taken += sum(1 for result in taken if type(result) is self._backlog_of)
        return taken

    def close(self) -> None:
        """No more commands: wake the bus thread (if it opened the mailbox) to see ``closed`` and stop."""
        self.closed = True
        wake = self._wake
        if wake is not None:
            try:
                wake()
            except RuntimeError:
                pass  # the bus thread's loop has already ended

    def close_eventfd(self) -> None:
        """Once the bus thread has ended (or been given up on): take the mailbox off chatd's loop first."""
        os.close(self._eventfd)

    # -- the bus thread ----------------------------------------------------------------
    def open(self, wake: Callable[[], Any]) -> bool:
        """``wake`` is called on chatd's thread and must make the bus thread call
        :meth:`take_commands` soon (``loop.call_soon_threadsafe``). False: closed already, stop."""
        self._wake = wake
        return not self.closed  # read after _wake is set: close() either sees the wake or is seen here

    def take_commands(self) -> list:
        """Every command posted since the last call, oldest first; then look at ``closed``."""
        self._wake_pending = False  # before draining: see the theory of operation
        commands = self._commands
        return [commands.popleft() for _ in range(len(commands))]

    def post_result(self, result) -> None:
        """Queue ``result`` for chatd's thread, making the eventfd readable unless it is already."""
        if self._backlog_of is not None and type(result) is self._backlog_of:
            self._backlog_posted += 1  # before the append: the backlog is never seen below 0
        self._results.append(result)
        if not self._eventfd_armed:
            self._eventfd_armed = True
            try:
                os.eventfd_write(self._eventfd, 1)
            except OSError:
                pass  # closed under us by close_eventfd(): nobody listens any more
