"""The counts since the service began (chatd.tally): in the journal's header, committed with the
records in the same atomic step, and read back by whoever attaches the journal next."""

import os

import pytest

from chatd.journal import PAGE, Journal
from chatd.records import Record
from chatd.tally import NAMES, RESTORE_BUCKETS, Tally
from recording_journal import Recording


def state_of(data: bytes) -> tuple:
    fd = os.memfd_create("replay")
    os.write(fd, data)
    journal = Journal.attach(fd)
    try:
        return journal.read(0), journal.tally["messages_relayed"], journal.tally["refused_max_clients"]
    finally:
        journal.close()


@pytest.mark.parametrize("commits_before", [1, 2], ids=["copy-1-spare", "copy-0-spare"])
def test_a_count_is_committed_with_the_records_or_not_at_all(commits_before):
    """Replay a commit's writes a byte at a time: every prefix reads the record and the counts
    as before, or both as after; never a message counted whose commit a crash cut short."""
    journal = Journal.create(2, PAGE, PAGE)
    for n in range(commits_before):
        journal.tally.add("messages_relayed", 3)
        journal.commit({0: Record(1, "line", "ann", "bob", n)})
    image = lambda: os.pread(journal.fd, os.fstat(journal.fd).st_size, 0)  # noqa: E731
    before_image = image()
    before = state_of(before_image)
    recorder = Recording(os.dup(journal.fd), 2, PAGE, PAGE, 0, journal._map)
    recorder.tally.add("messages_relayed")
    recorder.tally.add("refused_max_clients", 2)
    recorder.commit({0: Record(1, "line", "ann", "bob", 9)})
    after = state_of(image())
    assert after == (Record(1, "line", "ann", "bob", 9), 3 * commits_before + 1, 2)
    replayed, seen = bytearray(before_image), set()
    writes = [(offset + i, data[i:i + 1]) for offset, data in recorder.writes for i in range(len(data))]
    for count in range(len(writes) + 1):
        if count:
            offset, byte = writes[count - 1]
            replayed[offset:offset + 1] = byte
        state = state_of(bytes(replayed))
        assert state in (before, after), f"after {count} of {len(writes)} bytes: {state}"
        seen.add(state == after)
    assert seen == {False, True}
    os.close(recorder.fd)
    journal.close()


def test_a_count_alone_is_a_commit_and_every_commit_carries_the_counts():
    journal = Journal.create(1, PAGE, PAGE)
    journal.tally.add("refused_max_per_address")
    journal.commit({})  # a client refused: nothing else changed
    assert journal.committed == 1 and not journal.tally.unsaved
    journal.commit({})
    assert journal.committed == 1, "nothing to commit"
    for _ in range(3):  # the two copies take turns: each commit writes the counts into the spare
        journal.commit({0: Record(1, "line", None, None, 0)})
    assert Journal.attach(os.dup(journal.fd)).tally["refused_max_per_address"] == 1
    journal.close()


def test_a_restore_is_counted_under_how_the_predecessor_ended_and_in_its_bucket():
    tally = Tally()
    tally.restored("killed", 0.03, input_replayed=10, output_resent=20)
    tally.restored("planned", 20.0, 0, 5)
    assert (tally["ended_killed"], tally["ended_planned"], tally["ended_crashed"]) == (1, 1, 0)
    assert (tally["input_replayed_bytes"], tally["output_resent_bytes"]) == (10, 25)
    assert tally["restore_microseconds"] == 20_030_000 and tally["restores"] == 2
    buckets = dict(tally.restore_buckets())
    assert buckets[0.025] == 0 and buckets[0.05] == 1 and buckets[RESTORE_BUCKETS[-1]] == 1
    assert buckets[float("inf")] == 2, "a restore slower than every bound counts in +Inf only"


def test_names_fit_the_room_kept_for_them():
    assert len(NAMES) == len(set(NAMES)) and len(NAMES) <= 64
