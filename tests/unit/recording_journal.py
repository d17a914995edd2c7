"""A journal that logs every byte it writes, so a test can replay a commit a byte at a time (a
crash at every point of it): tests/unit/test_journal.py and test_tally.py."""

from chatd.journal import Journal


class Recording(Journal):
    """A journal that logs every byte it writes, and can stop mid-commit like a crash."""

    def __init__(self, *args):
        self.writes: list[tuple[int, bytes]] = []
        super().__init__(*args)

    def _write(self, offset, data):
        self.writes.append((offset, bytes(data)))
        super()._write(offset, data)
