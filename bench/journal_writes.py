"""What a journal file costs against a memfd, the journal's own writes alone, in one process.

    .venv/bin/python bench/journal_writes.py [--seconds 70] [--clients 20] DIR ...

One journal a memfd, and one a file in each DIR (``--state-dir``: a new directory
made in DIR, removed after). Each message does what chatd's handling of a ``MSG``
does to the journal: the sender's line into its input ring, the ``FROM`` line into
the receiver's output ring, and a commit of both records. The journals take turns
in 20 ms slices, so whatever else the machine does falls on all of them alike;
``--seconds`` longer than the kernel's dirty expiry (30 s) lets the writeback
write pages out and the writes that follow fault them back in, as they would in a
chatd that runs for hours. Each journal's messages a second, and its ratio to the
memfd's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from chatd.journal import Journal  # noqa: E402
from chatd.records import Record  # noqa: E402

LINE = b"MSG " + b"x" * 100 + b"\n"
FROM = b"FROM a1 1 " + b"x" * 100 + b"\n"


class Writer:
    """Messages between ``clients`` clients, paired, written to one journal as chatd writes them."""

    def __init__(self, journal: Journal, clients: int):
        self.journal = journal
        self.slots = [journal.allocate() for _ in range(clients)]
        self.counts = {slot: 0 for slot in self.slots}
        journal.commit({slot: Record(0, "line", f"n{slot}", None, 0) for slot in self.slots})
        self.next = 0
        self.done = 0

    def message(self) -> None:
        journal, slots = self.journal, self.slots
        sender, receiver = slots[self.next], slots[self.next ^ 1]
        self.next = (self.next + 2) % len(slots)
        offset = self.counts[sender]
        in_ring, out_ring = journal.in_ring(sender), journal.out_ring(receiver)
        start = offset % (len(in_ring) - len(LINE))
        in_ring[start:start + len(LINE)] = LINE
        start = offset % (len(out_ring) - len(FROM))
        out_ring[start:start + len(FROM)] = FROM
        self.counts[sender] += len(LINE)
        self.counts[receiver] += 1
        journal.commit({sender: Record(0, "line", f"n{sender}", f"n{receiver}", self.counts[sender],
                                       in_handled=self.counts[sender]),
                        receiver: Record(0, "line", f"n{receiver}", f"n{sender}", self.counts[receiver],
                                         out_start=0, out_end=self.counts[receiver] * len(FROM))})
        self.done += 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directories", nargs="+", metavar="DIR", help="where a journal file goes, e.g. /dev/shm /var/lib")
    parser.add_argument("--seconds", type=float, default=70)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--slots", type=int, default=19715, help="the journal's size, as chatd's default makes it")
    args = parser.parse_args()
    made = [tempfile.mkdtemp(prefix="chatd-state-", dir=directory) for directory in args.directories]
    writers = {"memfd": Writer(Journal.create(args.slots), args.clients)}
    for directory, where in zip(args.directories, made):
        writers[f"file in {directory}"] = Writer(Journal.create(args.slots, path=os.path.join(where, "journal")),
                                                 args.clients)
    try:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            for writer in writers.values():
                slice_end = time.monotonic() + 0.02
                while time.monotonic() < slice_end:
                    for _ in range(50):
                        writer.message()
        memfd = writers["memfd"].done
        print(f"{args.clients} clients, {args.seconds:g} s, 20 ms turns\n")
        print("| journal | messages/s | vs memfd |")
        print("| --- | --- | --- |")
        share = args.seconds / len(writers)
        for name, writer in writers.items():
            print(f"| {name} | {writer.done / share:,.0f} | {writer.done / memfd:.2f}x |")
    finally:
        for writer in writers.values():
            writer.journal.close()
        for where in made:
            shutil.rmtree(where, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
