"""How the bus thread runs its work: retried until it succeeds, and one job at a time per key.

Imported by the bus thread only (it imports asyncio): see :mod:`chatd.bus.engine`.

* :func:`retry`: every network step of the bus (the setup, starting delivery and
  the watches, each publish, each nick operation) is retried through timeouts,
  lost connections and dead servers until it succeeds, with one backoff:
  :data:`RETRY_FIRST` after the first failure, doubling up to
  :data:`RETRY_LONGEST`, without jitter. What a failure means (a line for the log, or nothing for the usual timeout)
  is the caller's ``on_failure``.
* :class:`Lanes`: jobs queued by key (a subject, a nick) run one at a time per
  key, in the order added, and keys run at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Awaitable, Callable, Hashable, TypeVar

#: Backoff between retries: from the first pause to the longest, doubling. The longest is short:
#: what fails for long is a stream or the JetStream meta group without a leader (a node died), and
#: the step should go soon after the election ends (bench/nats_stall.py); each try is one small request.
RETRY_FIRST, RETRY_LONGEST = 0.05, 0.25

T = TypeVar("T")


async def retry(attempt: Callable[[int], Awaitable[T]], on_failure: Callable[[Exception], None], *,
                gate: asyncio.Event | None = None, first: float = RETRY_FIRST,
                longest: float = RETRY_LONGEST) -> T:
    """What ``attempt(n)`` returns for the first n = 0, 1, … that does not raise.

    After each failure, ``on_failure(exc)`` and a pause (``first``, doubling up to ``longest``).
    With a ``gate``, each attempt waits until it is set (the bus is ready). Cancelling stops it.
    """
    delay = first
    tries = 0
    while True:
        if gate is not None:
            await gate.wait()
        try:
            return await attempt(tries)
        except Exception as exc:  # not CancelledError (a BaseException): cancelling ends the retries
            on_failure(exc)
        tries += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, longest)


class Lanes:
    """Work that runs one job at a time per key (a subject, a nick), any number of keys at once.

    ``spawn(coroutine)`` starts a task; ``run(job)`` does one job.
    """

    def __init__(self, spawn: Callable[[Awaitable[None]], object], run: Callable[[tuple], Awaitable[None]]):
        self._spawn = spawn
        self._run = run
        self._queues: dict[Hashable, deque] = {}

    def add(self, key: Hashable, job: tuple) -> None:
        queue = self._queues.get(key)
        if queue is not None:
            queue.append(job)
            return
        self._queues[key] = deque([job])
        self._spawn(self._drain(key))

    async def _drain(self, key: Hashable) -> None:
        queue = self._queues[key]
        while queue:
            await self._run(queue[0])
            queue.popleft()
        del self._queues[key]  # no await since the last check: nothing was added meanwhile
