"""Logging what clients do wrong, without letting a client flood the log.

Theory of operation
-------------------
A daemon logs each offence of a client (a bad frame, a refused request, a
limit reached) with who did it: its pid and uid and what it did. A client that
repeats an offence in a loop must not make the daemon log in a loop, so
:class:`Offences` logs the first offence of each kind per *key* (a uid and the
error code, say), then only counts the repeats of that key for ``interval``
seconds; the next line logged for that key says how many were not. No timer is
needed, at the price that repeats are told only with a later line of their key.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Hashable


class Offences:
    def __init__(self, logger: logging.Logger, interval: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger = logger
        self.interval = interval
        self.clock = clock
        #: key -> (when it was last logged, repeats not logged since)
        self._seen: dict[Hashable, tuple[float, int]] = {}

    def log(self, level: int, key: Hashable, message: str, *args) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval`` ago; True if logged."""
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            message += " (and %d more like it not logged in the %.0f s before)"
            args += (last[1], now - last[0])
        self.logger.log(level, message, *args)
        self._seen[key] = (now, 0)
        if len(self._seen) > 4096:
            # Keys of long ago tell nothing any more: forget them, so the table stays small.
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
        return True

    def warning(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.WARNING, key, message, *args)

    def info(self, key: Hashable, message: str, *args) -> bool:
        return self.log(logging.INFO, key, message, *args)
