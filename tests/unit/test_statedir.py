"""The journal as a file (``--state-dir``): made and attached by path, sealed, its boot, its
blocks reserved; and what chatd.statedir serves from when the holders keep nothing."""

from __future__ import annotations

import errno
import logging
import os

import pytest

from chatd import journal as journal_module
from chatd.holders import STATE_NAME
from chatd.journal import SEAL, SEAL_OFFSET, UNKNOWN_FORMAT, Journal
from chatd.records import Record
from chatd.statedir import StateDir, journal_kept_on_disk, seal_file, settle_held_journal
from fdkeep.errors import Error
from holderd.client import Retrieved

RECORD = Record(1234, "line", "alice", "bob", 17)


@pytest.fixture
def state_dir(tmp_path):
    made = StateDir(str(tmp_path / "state"))
    made.prepare()
    return made


class FakeServer:
    """What chatd.statedir asks of a server: its state directory and holders."""

    def __init__(self, state_dir, stored=None):
        self.state_dir = state_dir
        self.max_clients = 4
        self.box_size = 0
        self.holders = self
        self.stored = [] if stored is None else stored

    def store(self, items):
        self.stored.extend((name, os.fstat(fd).st_ino) for name, _meta, fd in items)


def written(path: str, record: Record = RECORD) -> Journal:
    journal = Journal.create(4, path=path)
    journal.commit({journal.allocate(): record})
    return journal


def in_another_boot(monkeypatch):
    """What a journal looks like after a reboot: this boot's id is another one."""
    monkeypatch.setattr(journal_module, "boot_id", lambda: b"\x42" * 16)


# -- the file ---------------------------------------------------------------------------
def test_a_journal_made_at_a_path_is_whole_there_with_mode_0600_and_attached_by_path(state_dir):
    journal = written(state_dir.journal_path)
    assert oct(os.stat(state_dir.directory).st_mode & 0o777) == "0o700"
    assert oct(os.stat(state_dir.journal_path).st_mode & 0o777) == "0o600"
    assert os.listdir(state_dir.directory) == ["journal"], "no temporary file left"
    assert os.fstat(journal.fd).st_ino == os.stat(state_dir.journal_path).st_ino
    journal.close()
    again = Journal.attach(state_dir.journal_path)
    assert list(again.records()) == [(0, RECORD)] and again.on_disk and again.path == state_dir.journal_path
    again.close()


def test_a_new_journal_replaces_the_old_at_once_and_the_old_one_stays_whole_for_who_holds_it(state_dir):
    old = written(state_dir.journal_path)
    new = Journal.create(4, path=state_dir.journal_path)
    assert list(Journal.attach(os.dup(old.fd)).records()) == [(0, RECORD)], "the held one is as it was"
    assert list(Journal.attach(state_dir.journal_path).records()) == [], "the path names the new one"
    assert os.listdir(state_dir.directory) == ["journal"]
    old.close(), new.close()


def test_a_temporary_file_a_dead_chatd_left_is_removed_and_a_live_ones_kept(state_dir):
    dead = os.path.join(state_dir.directory, ".journal.new-999999999")
    live = os.path.join(state_dir.directory, f".journal.new-{os.getppid()}")
    for path in (dead, live):
        open(path, "w").close()
    Journal.create(4, path=state_dir.journal_path).close()
    assert sorted(os.listdir(state_dir.directory)) == sorted(["journal", os.path.basename(live)])


def test_a_journal_that_cannot_be_made_is_an_error_that_names_the_fix(tmp_path):
    with pytest.raises(Error) as caught:
        Journal.create(4, path=str(tmp_path / "missing" / "journal"))
    assert caught.value.code == "state-dir" and "--state-dir" in caught.value.message


def test_a_state_dir_that_is_a_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Error) as caught:
        StateDir(str(tmp_path / "file")).prepare()
    assert caught.value.code == "state-dir" and "--state-dir" in caught.value.message


@pytest.fixture
def on_disk(monkeypatch):
    """Files here are taken for files on a disk even where the tests' temporary directory is a
    tmpfs (the reservations are made either way: fallocate works there too)."""
    monkeypatch.setattr(journal_module, "_in_memory", lambda fd: False)


def test_what_lives_in_memory_is_told_from_what_lives_on_a_disk(tmp_path):
    memfd = os.memfd_create("test")
    assert journal_module._in_memory(memfd) and journal_module.is_memfd(memfd)
    os.close(memfd)
    if os.path.isdir("/dev/shm"):
        fd = os.open("/dev/shm", os.O_RDONLY)
        assert journal_module._in_memory(fd) and not journal_module.is_memfd(fd)
        os.close(fd)
    checkout = os.open(os.path.dirname(__file__), os.O_RDONLY)  # a source checkout is on a disk
    assert not journal_module._in_memory(checkout)
    os.close(checkout)


def test_a_slot_handed_out_has_its_blocks_reserved_and_a_full_disk_refuses_it_not_chatd(state_dir, on_disk,
                                                                                        monkeypatch, caplog):
    journal = Journal.create(4, path=state_dir.journal_path)
    before = os.stat(state_dir.journal_path).st_blocks
    slot = journal.allocate()
    reserved = os.stat(state_dir.journal_path).st_blocks
    assert (reserved - before) * 512 >= journal.in_size + journal.out_size
    journal.commit({slot: Record(1, "line", None, None, 0)})
    journal.commit({slot: None})
    assert os.stat(state_dir.journal_path).st_blocks == reserved, "kept for the next client"
    assert journal.allocate() == slot
    journal.commit({slot: None})

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(journal_module, "_fallocate", full)
    with caplog.at_level(logging.INFO, "chatd"):
        assert journal.allocate() is None and journal.allocate() is None
        assert caplog.text.count("no room for another client") == 1, "said once"
        monkeypatch.undo()
        assert journal.allocate() is not None
        assert "room again" in caplog.text
    journal.close()


def test_a_memfd_reserves_nothing_and_gives_a_freed_slots_pages_back():
    journal = Journal.create(4)
    assert not journal.on_disk
    slot = journal.allocate()
    empty = os.fstat(journal.fd).st_blocks
    journal.out_ring(slot)[:] = b"x" * journal.out_size
    journal.commit({slot: Record(1, "line", None, None, 0)})
    assert (os.fstat(journal.fd).st_blocks - empty) * 512 >= journal.out_size
    journal.commit({slot: None})
    assert os.fstat(journal.fd).st_blocks <= empty + 8
    journal.close()


# -- the boot and the seal ----------------------------------------------------------------
def test_attach_finds_the_boot_that_wrote_it(state_dir, monkeypatch):
    written(state_dir.journal_path).close()
    assert Journal.attach(state_dir.journal_path).boot_found == journal_module.boot_id()
    in_another_boot(monkeypatch)
    again = Journal.attach(state_dir.journal_path)
    assert again.boot_found != journal_module.boot_id()
    again.close()
    assert Journal.attach(state_dir.journal_path).boot_found == b"\x42" * 16, "stamped by the last attach"


def test_a_seal_holds_until_the_next_writer_which_clears_it_on_disk_first(state_dir, on_disk):
    journal = written(state_dir.journal_path)
    journal.seal()
    assert SEAL.unpack(os.pread(journal.fd, SEAL.size, SEAL_OFFSET)) == (1, journal.committed)
    journal.close()
    again = Journal.attach(state_dir.journal_path)
    assert again.sealed
    assert SEAL.unpack(os.pread(again.fd, SEAL.size, SEAL_OFFSET))[0] == 0, "cleared before anything is written"
    again.commit({1: RECORD})
    again.close()
    assert not Journal.attach(state_dir.journal_path).sealed


def test_a_seal_at_an_older_commit_is_no_seal(state_dir):
    journal = written(state_dir.journal_path)
    os.pwrite(journal.fd, SEAL.pack(1, journal.committed - 1), SEAL_OFFSET)
    journal.close()
    assert not Journal.attach(state_dir.journal_path).sealed


def test_chatd_seal_seals_a_journal_nobody_serves_from_and_refuses_one_a_live_chatd_does(state_dir, on_disk):
    journal = written(state_dir.journal_path)
    journal.set_owner(os.getpid(), _start_time(os.getpid()))
    with pytest.raises(Error) as caught:
        seal_file(state_dir.journal_path)
    assert caught.value.code == "serving" and f"pid {os.getpid()}" in caught.value.message
    assert SEAL.unpack(os.pread(journal.fd, SEAL.size, SEAL_OFFSET))[0] == 0
    journal.set_owner(0, 0)
    assert "sealed" in seal_file(state_dir.journal_path)
    journal.close()
    assert Journal.attach(state_dir.journal_path).sealed
    assert "nothing to seal" in seal_file(os.path.join(state_dir.directory, "none"))


def test_chatd_seal_refuses_a_journal_of_another_version(state_dir):
    written(state_dir.journal_path).close()
    os.pwrite(os.open(state_dir.journal_path, os.O_RDWR), b"CHATDJ04" + (4).to_bytes(4, "little"), 0)
    with pytest.raises(Error) as caught:
        seal_file(state_dir.journal_path)
    assert caught.value.code == UNKNOWN_FORMAT


def _start_time(pid: int) -> int:
    from chatd.journal import process_identity

    return process_identity(pid)[1]


# -- what the holders keeping nothing starts from -------------------------------------------
def test_nothing_on_disk_is_a_fresh_start(state_dir):
    assert journal_kept_on_disk(FakeServer(state_dir), []) is None
    assert journal_kept_on_disk(FakeServer(None), []) is None


def test_a_journal_written_in_this_boot_is_served_from(state_dir, caplog):
    written(state_dir.journal_path).close()
    with caplog.at_level(logging.INFO, "chatd"):
        journal, fd = journal_kept_on_disk(FakeServer(state_dir), [])
    assert fd == journal.fd and dict(journal.records()) == {0: RECORD}
    assert "written in this boot" in caplog.text and state_dir.journal_path in caplog.text
    journal.close()


def test_after_a_reboot_a_sealed_journal_is_served_from(state_dir, on_disk, monkeypatch):
    journal = written(state_dir.journal_path)
    journal.seal()
    journal.close()
    in_another_boot(monkeypatch)
    journal, _ = journal_kept_on_disk(FakeServer(state_dir), [])
    assert dict(journal.records()) == {0: RECORD}
    journal.close()


def test_after_a_power_loss_an_unsealed_journal_is_set_aside_and_chatd_starts_afresh(state_dir, on_disk,
                                                                                     monkeypatch, caplog):
    journal = written(state_dir.journal_path)
    journal.seal()
    journal.commit({1: RECORD})  # written after the seal: the seal no longer holds
    journal.close()
    in_another_boot(monkeypatch)
    with caplog.at_level(logging.INFO, "chatd"):
        assert journal_kept_on_disk(FakeServer(state_dir), []) is None
    assert os.listdir(state_dir.directory) == ["journal.previous"]
    assert "earlier boot and not sealed" in caplog.text and "sessions it kept are lost" in caplog.text


def test_a_damaged_journal_is_set_aside(state_dir):
    written(state_dir.journal_path).close()
    os.truncate(state_dir.journal_path, 8192)
    assert journal_kept_on_disk(FakeServer(state_dir), []) is None
    assert os.listdir(state_dir.directory) == ["journal.previous"]


def test_a_journal_of_another_version_is_refused_and_left_untouched(state_dir):
    written(state_dir.journal_path).close()
    fd = os.open(state_dir.journal_path, os.O_RDWR)
    os.pwrite(fd, b"CHATDJ04" + (4).to_bytes(4, "little"), 0)
    before = os.pread(fd, os.fstat(fd).st_size, 0)
    with pytest.raises(Error) as caught:
        journal_kept_on_disk(FakeServer(state_dir), [])
    assert caught.value.code == UNKNOWN_FORMAT and state_dir.journal_path in caught.value.message
    assert "`chatd --fresh`" in caught.value.message
    assert os.pread(fd, len(before), 0) == before and os.listdir(state_dir.directory) == ["journal"]
    os.close(fd)


def test_a_single_hosts_journal_is_set_aside_when_chatd_now_joins_a_cluster(state_dir):
    from chatd.journal import BOX_RING

    written(state_dir.journal_path).close()
    server = FakeServer(state_dir)
    server.box_size = BOX_RING
    assert journal_kept_on_disk(server, []) is None
    assert os.listdir(state_dir.directory) == ["journal.previous"]
    Journal.create(4, box_size=BOX_RING, path=state_dir.journal_path).close()
    journal, _ = journal_kept_on_disk(server, [])
    assert journal.box_size == BOX_RING
    journal.close()


def test_a_journal_on_disk_that_the_holders_kept_another_one_of_is_stale(state_dir):
    written(state_dir.journal_path).close()
    other = Journal.create(4)
    held = [Retrieved(STATE_NAME, b"{}", other.fd, os.fstat(other.fd).st_ino)]
    assert journal_kept_on_disk(FakeServer(state_dir), held) is None
    assert os.listdir(state_dir.directory) == ["journal.previous"]
    same = [Retrieved(STATE_NAME, b"{}", -1, os.stat(state_dir.journal_path + ".previous").st_ino)]
    os.rename(state_dir.journal_path + ".previous", state_dir.journal_path)
    journal, _ = journal_kept_on_disk(FakeServer(state_dir), same)
    journal.close(), other.close()


# -- a held journal and the state directory ----------------------------------------------------
def test_the_held_journal_that_is_the_file_is_served_as_it_is(state_dir):
    journal = written(state_dir.journal_path)
    server = FakeServer(state_dir)
    assert settle_held_journal(server, journal, journal.fd) == (journal, journal.fd)
    assert server.stored == []
    journal.close()


def test_a_held_memfd_is_copied_into_the_state_dir_and_the_holders_keep_the_copy(state_dir, on_disk):
    held = Journal.create(4)
    slot = held.allocate()
    held.commit({slot: RECORD})
    held.out_ring(slot)[:5] = b"hello"
    written(state_dir.journal_path, Record(1, "line", "stale", None, 0)).close()  # an old one there
    server = FakeServer(state_dir)
    held_fd = held.fd
    copy, fd = settle_held_journal(server, held, held_fd)
    assert fd == copy.fd != held_fd and os.fstat(fd).st_ino == os.stat(state_dir.journal_path).st_ino
    assert dict(copy.records()) == {slot: RECORD} and bytes(copy.out_ring(slot)[:5]) == b"hello"
    assert server.stored == [(STATE_NAME, os.fstat(fd).st_ino)], "given to the holders before it is written"
    assert copy.on_disk and os.fstat(fd).st_blocks * 512 >= copy.in_size + copy.out_size, "its slot reserved"
    os.fstat(held_fd)  # still open: the caller's, closed with the rest of what was retrieved
    os.close(held_fd)
    copy.close()
