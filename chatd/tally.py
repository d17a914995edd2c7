"""What chatd counts since the service began: kept in the journal, committed with it.

Theory of operation
-------------------
A count that starts over at every crash is useless when the crash is what one
counts. So the counts of the chatd service (crashes survived, planned
restarts, the bytes that were in flight at each, messages relayed, clients
refused by each bound, sessions resumed, how long each restore took) live in
the journal's header (:mod:`chatd.journal`), which survives any chatd (the
holders keep it; with ``--state-dir`` it is a file on disk), and are written
by :meth:`chatd.journal.Journal.commit` in the same atomic step as the
records: two copies, chosen by the same selector byte as the committed
number. So a count goes up exactly when what it counts is committed: a
message relayed by a command that a crash cut short before its commit is
counted once, by the successor that handles the command again.

:class:`Tally` owns the values; those who count call :meth:`Tally.add` (the
server, as it carries out an outcome or refuses a client; the restore) and
the next commit writes them. A journal made afresh (a fresh start,
``--fresh``, a damaged journal replaced) counts from zero: that is where the
service, as chatd knows it, began. Names are only ever appended to
:data:`NAMES`: a journal written before a name existed reads zero for it
(those header bytes were zero), so the layout needs no version of its own.
A release that does not know the tally (0.2.0) commits without writing it;
after such a downgrade and back, the counts read may be those of a few commits
before: a counter reset to Prometheus, nothing worse.

The metrics (:mod:`chatd.metrics`) read them at scrape time.
"""

from __future__ import annotations

import struct

#: Upper bounds (seconds) of the buckets of the restore-duration histogram.
RESTORE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: How a predecessor ended, as the successor counts it (chatd.lastwords's words for a death,
#: and ``planned`` for a handover or a stop, which say so in the journal: no owner left).
ENDINGS = ("crashed", "hung", "killed", "planned")
#: The bounds that turn a client (or its request) away, as the metrics label them.
BOUNDS = ("max_clients", "max_per_address", "resume_rate", "stall_timeout")

NAMES = (
    *(f"ended_{how}" for how in ENDINGS),
    "input_replayed_bytes", "output_resent_bytes",
    "messages_relayed",
    *(f"refused_{bound}" for bound in BOUNDS),
    "sessions_resumed",
    "restores", "restore_microseconds",
    *(f"restore_bucket_{index}" for index in range(len(RESTORE_BUCKETS))),
)
#: Room kept for each copy in the header: 64 counts, to append to.
COPY_SIZE = 64 * 8
LAYOUT = struct.Struct(f"<{len(NAMES)}Q")
assert LAYOUT.size <= COPY_SIZE
_INDEX = {name: index for index, name in enumerate(NAMES)}
MAX_COUNT = 2 ** 64 - 1


class Tally:
    """The counts, in memory; :meth:`packed` is what a commit writes."""

    def __init__(self, values=None):
        self._values = list(values) if values is not None else [0] * len(NAMES)
        self._packed: bytes | None = None
        #: Changed since the last commit wrote them.
        self.unsaved = False

    @classmethod
    def unpack_from(cls, buffer, offset: int) -> "Tally":
        return cls(LAYOUT.unpack_from(buffer, offset))

    def packed(self) -> bytes:
        if self._packed is None:
            self._packed = LAYOUT.pack(*self._values)
        return self._packed

    def saved(self) -> None:
        self.unsaved = False

    def add(self, name: str, amount: int = 1) -> None:
        if amount <= 0:
            return
        index = _INDEX[name]
        self._values[index] = min(self._values[index] + amount, MAX_COUNT)
        self._packed = None
        self.unsaved = True

    def __getitem__(self, name: str) -> int:
        return self._values[_INDEX[name]]

    def restored(self, ended: str, seconds: float, input_replayed: int, output_resent: int) -> None:
        """A restore done: how the predecessor ended (:data:`ENDINGS`), how long it took, and
        the bytes in flight it finished (read and not handled, committed and not sent)."""
        self.add(f"ended_{ended}")
        self.add("input_replayed_bytes", input_replayed)
        self.add("output_resent_bytes", output_resent)
        self.add("restores")
        self.add("restore_microseconds", max(1, round(seconds * 1e6)))
        for index, bound in enumerate(RESTORE_BUCKETS):
            if seconds <= bound:
                self.add(f"restore_bucket_{index}")
                break

    def restore_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, cumulative count) per bucket, ``inf`` last: the histogram as Prometheus has it."""
        total, buckets = 0, []
        for index, bound in enumerate(RESTORE_BUCKETS):
            total += self[f"restore_bucket_{index}"]
            buckets.append((bound, total))
        buckets.append((float("inf"), self["restores"]))
        return buckets
