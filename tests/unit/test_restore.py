"""chatd's restore path in-process: a ChatServer dies (its fds closed without a
shutdown, as a crash closes them), a new one takes back what a holder kept."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

import pytest

from chatd.holders import Holders
from chatd.journal import MAGIC, UNKNOWN_FORMAT, VERSION
from chatd.restore import restore
from chatd.server import ChatServer
from ctl.probe import LineClient
from helpers import line_client
from fdkeep.errors import Error
from holderd.client import Retrieved


class MemoryHolder:
    """Keeps duplicates in this process: the Holder interface with nothing behind it."""

    label = "memory"

    def __init__(self):
        self.working = True
        self.items: dict[str, tuple[bytes, int]] = {}

    def store(self, items):
        for name, meta, fd in items:
            self._drop(name)
            self.items[name] = (meta, os.dup(fd))
        return True

    def _drop(self, name):
        if name in self.items:
            os.close(self.items.pop(name)[1])

    def remove(self, names):
        for name in names:
            self._drop(name)
        return True

    def retrieve(self):
        return [Retrieved(name, meta, os.dup(fd), os.fstat(fd).st_ino) for name, (meta, fd) in self.items.items()]

    def forget_all(self, why=""):
        self.remove(list(self.items))
        return True

    def held(self):
        return {name: os.fstat(fd).st_ino for name, (meta, fd) in self.items.items()}


@contextmanager
def serving(server: ChatServer):
    """Run the server's loop on a thread while the test talks to it as a client would."""
    stop = threading.Event()

    def run():
        while not stop.is_set():
            server.loop.run_once(0.01)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(5)


def die(server: ChatServer) -> None:
    """What a crash does to a process's descriptors: closed, no shutdown, no goodbye."""
    for connection in server.connections.values():
        connection.sock.close()
    server.listeners.line.close()
    server.journal.close()
    server.loop.close()


def connect(port: int, nick: str, pair: str | None = None) -> LineClient:
    return line_client(port, nick, pair)


def chatting_pair(server: ChatServer) -> tuple[LineClient, LineClient]:
    a = connect(server.port, "A", "B")
    b = connect(server.port, "B", "A")
    assert b.line() == "PAIRED A" and a.line() == "PAIRED B"
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    return a, b


def test_a_new_server_takes_back_listener_journal_and_clients():
    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)
    first.bind("127.0.0.1", 0)
    with serving(first):
        a, b = chatting_pair(first)
    port = first.port
    die(first)

    second = ChatServer(Holders([holder]), 8)
    summary = restore(second)
    assert (summary["clients"], summary["pairs"], summary["port"]) == (2, 1, port)
    with serving(second):
        a.send("MSG two")
        assert b.line() == "FROM A 2 two", "the count went on: it came from the journal"
    a.close(), b.close()
    holder.forget_all()


def count(server: ChatServer, name: str, **labels) -> float | None:
    """A metric's value as Prometheus would read it from the server's scrape (chatd.metrics)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from chatd.metrics import endpoint

    metrics = endpoint(server, "127.0.0.1", 0, None)
    metrics.snapshots.refresh()  # as the loop does, without listening
    registry = CollectorRegistry()
    registry.register(metrics.snapshots)
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


@pytest.mark.parametrize("owner_left, ended", [(True, "killed"), (False, "planned")],
                         ids=["died-serving", "stopped-on-purpose"])
def test_the_counts_since_the_service_began_go_on_across_a_restore(owner_left, ended):
    from chatd.journal import process_identity

    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)
    first.bind("127.0.0.1", 0)
    first.journal.set_owner(*process_identity(os.getpid()))  # as chatd.lifecycle does once it serves
    with serving(first):
        a, b = chatting_pair(first)
    if not owner_left:
        first.journal.set_owner(0, 0)  # as a handover or a stop does
    commits = first.journal.committed
    die(first)

    second = ChatServer(Holders([holder]), 8)
    summary = restore(second)
    assert summary["ended"] == ended
    with serving(second):
        a.send("MSG two")
        assert b.line() == "FROM A 2 two"
    assert count(second, "chatd_messages_relayed_total") == 2, "one before the crash, one after"
    assert count(second, "chatd_crashes_survived_total", how="killed") == (1 if owner_left else 0)
    assert count(second, "chatd_planned_restarts_total") == (0 if owner_left else 1)
    assert count(second, "chatd_restore_duration_seconds_count") == 1
    assert count(second, "chatd_last_restore_duration_seconds") == summary["milliseconds"] / 1000
    assert count(second, "chatd_journal_commits_total") > commits
    assert count(second, "chatd_clients") == 2 and count(second, "chatd_pairs") == 1
    a.close(), b.close()
    holder.forget_all()


def test_without_the_journal_clients_keep_their_connections_as_new_members():
    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)
    first.bind("127.0.0.1", 0)
    with serving(first):
        leaver = connect(first.port, "L")
        a, b = chatting_pair(first)
        leaver.send("QUIT")
        assert leaver.line() == "BYE"
    assert holder.held().keys() == {"chatd/listen", "chatd/state", "chatd/last-words", "chatd/bundle/0/1/w", "chatd/bundle/0/1/r"}
    die(first)
    holder.remove(["chatd/state"])  # the journal is lost: the sockets are all that is left

    second = ChatServer(Holders([holder]), 8)
    summary = restore(second)
    assert (summary["clients"], summary["pairs"]) == (2, 0), "the connections, not their chat state"
    assert holder.held().keys() == {"chatd/listen", "chatd/state", "chatd/last-words", "chatd/bundle/0/1/w", "chatd/bundle/0/1/r"}, \
        "a new journal is kept in its place"
    with serving(second):
        a.send("NICK A", "PAIR B")
        b.send("NICK B", "PAIR A")
        assert a.lines(2) == ["OK NICK A", "OK PAIR B"] and b.lines(3) == ["OK NICK B", "OK PAIR A", "PAIRED A"]
        a.send("MSG two")
        assert b.line() == "FROM A 1 two", "without the journal the count starts again"
    a.close(), b.close(), leaver.close()
    holder.forget_all()


def test_a_journal_of_another_version_is_refused_and_nothing_held_is_touched():
    """A newer release's journal is not damage: no new journal over the live connections
    (which would lose every nick, pairing and count), the restore refused, everything held."""
    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)
    first.bind("127.0.0.1", 0)
    with serving(first):
        a, b = chatting_pair(first)
    die(first)
    meta, state = holder.items["chatd/state"]
    os.pwrite(state, b"CHATDJ04" + (4).to_bytes(4, "little"), 0)  # as a newer release would write it
    held = holder.held()
    journal_bytes = os.pread(state, os.fstat(state).st_size, 0)
    fds_before = set(os.listdir("/proc/self/fd"))

    second = ChatServer(Holders([holder]), 8)
    with pytest.raises(Error) as caught:
        restore(second)
    assert caught.value.code == UNKNOWN_FORMAT and "version 4" in caught.value.message
    assert holder.held() == held, "the same names and inodes held"
    assert os.pread(state, len(journal_bytes), 0) == journal_bytes, "the journal untouched"
    assert second.connections == {} and second.journal is None
    second.loop.close()
    assert set(os.listdir("/proc/self/fd")) <= fds_before, "the duplicates it took are closed"
    # The connections are still open: a restore by the release that reads it serves them.
    os.pwrite(state, MAGIC + VERSION.to_bytes(4, "little"), 0)
    third = ChatServer(Holders([holder]), 8)
    assert restore(third)["pairs"] == 1
    with serving(third):
        a.send("MSG two")
        assert b.line() == "FROM A 2 two"
    a.close(), b.close()
    holder.forget_all()


def test_a_crash_during_a_restore_loses_nothing():
    """Reading bundles back does not consume them: a restore that dies half-way leaves
    everything for the next one."""
    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)
    first.bind("127.0.0.1", 0)
    with serving(first):
        a, b = chatting_pair(first)
    die(first)
    half = ChatServer(Holders([holder]), 8)
    assert restore(half)["clients"] == 2
    die(half)  # as if it crashed right after taking everything back
    third = ChatServer(Holders([holder]), 8)
    assert restore(third)["clients"] == 2
    with serving(third):
        a.send("MSG two")
        assert b.line() == "FROM A 2 two"
    a.close(), b.close()
    holder.forget_all()


def test_nothing_held_means_nothing_to_restore():
    holder = MemoryHolder()
    assert restore(ChatServer(Holders([holder]), 8)) is None


def with_state_dir(server: ChatServer, directory) -> ChatServer:
    from chatd.statedir import StateDir

    server.state_dir = StateDir(str(directory))
    server.state_dir.prepare()
    return server


def test_with_nothing_held_the_state_dirs_journal_is_served_its_records_as_those_whose_sockets_are_gone(tmp_path):
    """holderd and the fd store gone with chatd: the journal on disk is attached, new listeners
    bound, and every record goes as one whose socket did not come back (freed: its nick free)."""
    holder = MemoryHolder()
    first = with_state_dir(ChatServer(Holders([holder]), 8), tmp_path)
    first.bind("127.0.0.1", 0)
    assert os.fstat(holder.items["chatd/state"][1]).st_ino == os.stat(tmp_path / "journal").st_ino
    with serving(first):
        a, b = chatting_pair(first)
    die(first)
    holder.forget_all()  # the holders are gone too
    a.close(), b.close()

    second = with_state_dir(ChatServer(Holders([holder]), 8), tmp_path)
    summary = restore(second, listen=lambda: second.listeners.open("127.0.0.1", 0, None))
    assert (summary["journal"], summary["clients"], summary["pairs"]) == ("state-dir", 0, 0)
    assert second.journal.path == str(tmp_path / "journal") and list(second.journal.records()) == []
    assert holder.held().keys() == {"chatd/listen", "chatd/state", "chatd/last-words"}, "the holders keep the new listener and the file"
    with serving(second):
        again = connect(second.port, "A", "B")  # the nick is free again
        again.close()
    second.listeners.line.close()
    second.journal.close()
    holder.forget_all()


def test_a_held_memfd_is_moved_into_the_state_dir_at_the_restore(tmp_path):
    holder = MemoryHolder()
    first = ChatServer(Holders([holder]), 8)  # no state directory: a memfd
    first.bind("127.0.0.1", 0)
    with serving(first):
        a, b = chatting_pair(first)
    die(first)

    second = with_state_dir(ChatServer(Holders([holder]), 8), tmp_path)
    summary = restore(second)
    assert (summary["journal"], summary["clients"], summary["pairs"]) == ("held", 2, 1)
    assert holder.held()["chatd/state"] == os.stat(tmp_path / "journal").st_ino, "the holders keep the file"
    with serving(second):
        a.send("MSG two")
        assert b.line() == "FROM A 2 two", "the count went on: the copy is the journal"
    die(second)
    third = ChatServer(Holders([holder]), 8)
    assert restore(third)["pairs"] == 1, "and a crash now restores from the file"
    with serving(third):
        a.send("MSG three")
        assert b.line() == "FROM A 3 three"
    a.close(), b.close()
    holder.forget_all()
