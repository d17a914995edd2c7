"""What release 0.1.0 kept beyond a process (tests/data/, written by that release's own code:
scripts/make-format-data) reads back with this release's code, field by field; and each
format's version constant is what docs/formats.md says. A format changed without its version
and a migration fails here."""

from __future__ import annotations

import gzip
import json
import os
import socket
from pathlib import Path

import pytest

from chatd import directory, forwards, journal
from chatd.bus import checks
from chatd.journal import Journal
from chatd.records import Record
from chatd.rings import Outbox
from fdkeep import bundle
from fdkeep.bundle import Bundle
from fdkeep.errors import Error
from holderd import mirror
from holderd.mirror import IndexEntry, read_index

DATA = Path(__file__).parent.parent / "data"
ROOT = Path(__file__).parent.parent.parent


def held_journal(name: str) -> Journal:
    """The file as a memfd, as the holders keep it, attached by this release."""
    fd = os.memfd_create("journal-from-a-release")
    os.write(fd, gzip.decompress((DATA / name).read_bytes()))
    return Journal.attach(fd)


def test_the_version_constants_are_those_documented():
    documented = (ROOT / "docs" / "formats.md").read_text()
    constants = {
        "chatd.journal.VERSION": (journal.VERSION, 3),
        "chatd.journal.MAGIC": (journal.MAGIC, b"CHATDJ03"),
        "fdkeep.bundle.MAGIC": (bundle.MAGIC, 0xB0DE),
        "fdkeep.bundle.VERSION": (bundle.VERSION, 1),
        "holderd.mirror.INDEX_VERSION": (mirror.INDEX_VERSION, 1),
        "chatd.forwards.FORWARD_VERSION": (forwards.FORWARD_VERSION, 1),
        "chatd.directory.ENTRY_VERSION": (directory.ENTRY_VERSION, 1),
        "chatd.bus.checks.LEASE_VERSION": (checks.LEASE_VERSION, 1),
    }
    for name, (value, expected) in constants.items():
        assert value == expected, f"{name} changed: a new version needs its reader of the old one and tests/data"
        assert f"`{name}`" in documented, f"docs/formats.md does not list {name}"


def test_a_journal_written_by_0_1_0_reads_back_whole():
    kept = held_journal("journal-v3.bin.gz")
    try:
        assert (kept.slots, kept.in_size, kept.out_size, kept.box_size) == (3, 128 * 1024, 256 * 1024, 128 * 1024)
        assert (kept.committed, kept.cursor) == (2, 42)
        assert kept.handling() == (1, 90) and kept.owner() == (4242, 123456789)
        pending_in, pending_out = b"MSG half a li", b"FROM bob 4 committed, unsent\n"
        assert dict(kept.records()) == {
            0: Record(1001, "line", "ann", "bob", received=4, in_handled=130, out_start=200,
                      out_end=200 + len(pending_out), incarnation=11),
            1: Record(1002, "websocket", "bob", "ann", received=2, in_handled=90, out_start=300, out_end=300,
                      flags=1, codec=b"\x02ws", poison_offset=70, poison_count=1),
            2: Record(1003, "line", "dan", "eve", received=1, in_handled=40, out_start=10, out_end=10, flags=2,
                      incarnation=2 ** 63 + 5, sent=7, peer_incarnation=99, last_k=6, box_start=0, box_end=98),
        }
        assert bytes(kept.in_ring(0)[130:130 + len(pending_in)]) == pending_in
        assert bytes(kept.out_ring(0)[200:200 + len(pending_out)]) == pending_out
        (start, end, payload), = Outbox(kept.box_ring(2), 0, 98).entries()
        (forward,) = forwards.decode_forwards(9, payload)
        assert (start, end) == (0, 98)
        assert (forward.sender, forward.receiver, forward.incarnation, forward.k, forward.text) == \
            ("dan", "eve", 2 ** 63 + 5, 7, "hi eve, from h1")
        # A release before the tally (chatd.tally) left those header bytes zero: every count reads 0.
        assert kept.tally.packed() == bytes(len(kept.tally.packed()))
        # And this release goes on from it: the next commit lands on the spare copies.
        kept.tally.add("ended_crashed")
        kept.commit({0: None})
        assert kept.read(0) is None and kept.read(1) is not None
        assert Journal.attach(os.dup(kept.fd)).tally["ended_crashed"] == 1
    finally:
        kept.close()


def test_a_holderd_index_written_by_0_1_0_reads_back():
    data = (DATA / "holderd-index-v1.txt").read_bytes()
    entries, complete = read_index(data)
    assert entries == {
        1: IndexEntry(0, "chatd/listen", b""),
        2: IndexEntry(0, "chatd/state", b"{}"),
        3: IndexEntry(1000, "other/thing", b"newer meta"),  # its metadata changed: the last line wins
    }
    assert complete == data.rindex(b"\n") + 1, "the line a crash cut short is not part of it"


def test_a_bundle_message_written_by_0_1_0_parses():
    data = (DATA / "bundle-message-v1.bin").read_bytes()
    pairs = [socket.socketpair() for _ in range(3)]
    fds = [os.dup(a.fileno()) for a, _ in pairs]
    try:
        entries = Bundle._parse(data, fds)
        assert [key for key, _ in entries] == [0, 7, 2 ** 64 - 1]
        assert [fd for _, fd in entries] == fds
    finally:
        for fd in fds:
            os.close(fd)
        for a, b in pairs:
            a.close(), b.close()


def test_forwards_written_by_0_1_0_decode():
    found = forwards.decode_forwards(5, (DATA / "forwards-v1.bin").read_bytes())
    assert [(f.seq, f.sender, f.receiver, f.incarnation, f.k, f.text) for f in found] == [
        (5, "dan", "eve", 2 ** 63 + 5, 7, "hi eve, from h1"),
        (5, "dan", "eve", 2 ** 63 + 5, 8, "two\nlines ünï"),
    ]


def test_directory_entries_and_leases_written_by_0_1_0_read():
    values = json.loads((DATA / "cluster-values-v1.json").read_text())
    assert directory.read_entry(values["directory_entry"].encode()) == ("h1", "eve")
    assert directory.read_entry(values["directory_entry_unpaired"].encode()) == ("h1", None)
    assert checks.holder(values["host_lease"].encode()) == "h1"


def test_a_json_value_of_a_newer_version_is_refused_not_misread():
    with pytest.raises(ValueError, match="version 2"):
        forwards.decode_forwards(1, b'{"v":2,"from":"a","to":"b","inc":1,"k":1,"host":"h","len":0}\n')
    with pytest.raises(ValueError, match="version 2"):
        directory.read_entry(b'{"v":2,"host":"h1","target":"eve"}')
    assert checks.holder(b'{"v":2,"host":"h1"}') is None and checks.holder(b'{"v":1,"host":"h1"}') == "h1"


def test_a_holderd_index_of_another_version_is_refused_not_forgotten():
    data = (DATA / "holderd-index-v1.txt").read_bytes()
    assert read_index(b"v 1\n" + data)[0] == read_index(data)[0], "v 1 is what no v line means"
    with pytest.raises(Error) as caught:
        read_index(b"v 2\n" + data)
    assert caught.value.code == "unknown-format" and "version 2" in caught.value.message
