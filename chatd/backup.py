"""What the holders keep for chatd, as one: its listening sockets, its journal, the bundles of its clients.

Theory of operation
-------------------
chatd keeps a few names in every holder (:mod:`chatd.holders`): the listeners'
(:mod:`chatd.listeners`), the journal's, the last words' (:mod:`chatd.lastwords`),
and the two ends of each bundle of client sockets (:mod:`chatd.bundles`). :class:`Backup` lists them
(:meth:`Backup.items`), stores them again in bulk on request (``chatctl backup``:
every bundle repacked, then each holder asked what it keeps, so the report is
the holders' word, not chatd's hope), and audits the holders now and then: a
holder that lost a name (holderd restarted empty, a stop emptied systemd's
store) gets it again.
"""

from __future__ import annotations

from typing import Callable

from .bundles import ClientBundles
from .holders import STATE_NAME, Holders, Item
from .journal import Journal
from .lastwords import LastWords
from .listeners import Listeners


class Backup:
    def __init__(self, holders: Holders, listeners: Listeners, bundles: ClientBundles,
                 journal: Callable[[], Journal | None], last_words: Callable[[], LastWords | None]):
        self.holders = holders
        self.listeners = listeners
        self.bundles = bundles
        self._journal = journal
        self._last_words = last_words

    def server_items(self) -> list[Item]:
        """The listeners, the journal and the last words (the bundles keep themselves as clients
        come and go)."""
        last_words = self._last_words()
        return (self.listeners.items() + [(STATE_NAME, b"{}", self._journal().fd)]
                + ([last_words.item()] if last_words is not None else []))

    def items(self) -> list[Item]:
        return self.server_items() + self.bundles.items()

    def store_server_items(self) -> None:
        self.holders.store(self.server_items())

    def now(self) -> dict:
        """Repack every bundle and store it, with the listeners and the journal, in every holder
        (asked now, even one that failed a moment ago: an operator is waiting); then report
        what each holder says it keeps, and which holders keep every one of ``fds``."""
        for holder in self.holders:
            holder.retry_now()
        sockets = self.bundles.rebuild_all()
        items = self.items()
        self.holders.store(items)  # all at once, again: a holder's answer (or refusal) covers everything
        reports = self.holders.confirm(items)
        return {"sockets": sockets, "fds": len(items), "holders": reports,
                "kept_whole_by": [report["holder"] for report in reports if not report["missing"]]}

    def audit(self) -> None:
        """Store again, in each holder, what it does not keep as chatd has it (once serving)."""
        if self.listeners.line is not None:
            self.holders.audit(self.items())
