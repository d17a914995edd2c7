"""Both holders behind chatd's Holder interface, in-process: holderd (a real Holderd
serving on a thread) and systemd's store (the notify socket of conftest.py)."""

from __future__ import annotations

import logging
import os

from chatd.holders import Holder, HolderdHolder, Holders, SystemdHolder
from fdkeep.systemd import ServiceManager
from helpers import RunningHolderd


Running = RunningHolderd  # a real Holderd on a thread (tests/helpers.py)


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_holderd_holder_keeps_gives_back_and_forgets(tmp_path, sockets):
    running = Running(str(tmp_path / "h.sock"))
    try:
        holder: Holder = HolderdHolder(str(tmp_path / "h.sock"))
        listen, client = sockets.fds(2)
        assert holder.store([("chatd/listen", b"{}", listen), ("chatd/client/3", b'{"nick":"a"}', client)])
        assert holder.working is True
        assert holder.held().keys() == {"chatd/listen", "chatd/client/3"}
        back = {item.name: item for item in holder.retrieve()}
        assert back["chatd/client/3"].meta == b'{"nick":"a"}' and back["chatd/client/3"].ino == inode(client)
        for item in back.values():
            os.close(item.fd)
        assert holder.remove(["chatd/client/3"]) and holder.held().keys() == {"chatd/listen"}
        assert holder.forget_all("a test") and holder.held().keys() == set()
    finally:
        running.stop()


def test_holderd_holder_says_when_holderd_is_gone_and_when_it_is_back(tmp_path, sockets, caplog):
    caplog.set_level(logging.INFO)
    path = str(tmp_path / "h.sock")
    holder = HolderdHolder(path)
    (fd,) = sockets.fds(1)
    assert holder.store([("chatd/listen", b"", fd)]) is False and holder.working is False
    assert holder.remove(["chatd/listen"]) is False
    assert holder.retrieve() == [] and holder.held() is None
    assert caplog.text.count("holderd unavailable") == 1, "a failure is logged once, not per call"
    running = Running(path)
    try:
        assert holder.store([("chatd/listen", b"", fd)]) is False, "not asked again until RETRY_AFTER"
        holder._retry_at = 0  # as if RETRY_AFTER had passed
        assert holder.store([("chatd/listen", b"", fd)]) is True and holder.working is True
        assert "works again" in caplog.text
    finally:
        running.stop()


def test_systemd_holder_sends_each_socket_once_per_name(notify_socket, sockets):
    manager = ServiceManager({"NOTIFY_SOCKET": notify_socket.path})
    holder: Holder = SystemdHolder(manager)
    first, second = sockets.fds(2)
    holder.store([("chatd/client/1", b"ignored", first)])
    holder.store([("chatd/client/1", b"ignored", first)])  # the same socket again: not re-sent
    notify_socket.drain()
    assert len(notify_socket.messages) == 1
    holder.store([("chatd/client/1", b"", second)])  # another socket under the name: replaced
    notify_socket.drain()
    [kept] = notify_socket.store["chatd/client/1"]
    assert inode(kept) == inode(second)
    assert holder.held().keys() == {"chatd/client/1"}
    holder.remove(["chatd/client/1"])
    notify_socket.drain()
    assert notify_socket.store == {} and holder.held().keys() == set()


def test_systemd_holder_takes_back_what_was_passed_and_drops_strangers(notify_socket, sockets):
    manager = ServiceManager({"NOTIFY_SOCKET": notify_socket.path})
    ours, stranger = sockets.fds(2)
    manager._passed = {os.dup(ours): "chatd/listen", os.dup(stranger): "someone-else"}
    holder = SystemdHolder(manager)
    [item] = holder.retrieve()
    assert (item.name, item.ino, item.meta) == ("chatd/listen", inode(ours), b"")
    os.close(item.fd)
    notify_socket.drain()
    assert notify_socket.messages == [{"FDSTOREREMOVE": "1", "FDNAME": "someone-else"}]
    assert holder.held().keys() == {"chatd/listen"}


class Recorder:
    """A holder that only remembers names and inodes (a stand-in to watch the fan-out)."""

    def __init__(self, label, items=()):
        self.label, self.working, self.names, self.stored = label, True, {}, []
        self.store(items)
        self.stored.clear()

    def store(self, items):
        self.stored.append([name for name, _, _ in items])
        self.names |= {name: os.fstat(fd).st_ino for name, _, fd in items}
        return True

    def remove(self, names):
        for name in names:
            self.names.pop(name, None)
        return True

    def retrieve(self):
        return []

    def forget_all(self, why=""):
        self.names.clear()
        return True

    def held(self):
        return dict(self.names)


def test_the_fan_out_refills_a_holder_that_lost_names(sockets):
    listen, client = sockets.fds(2)
    items = [("chatd/listen", b"", listen), ("chatd/client/0", b"", client)]
    full, empty = Recorder("full", items), Recorder("empty")
    holders = Holders([full, empty])
    holders.audit(items)
    assert full.stored == [] and empty.stored == [["chatd/listen", "chatd/client/0"]]
    assert holders.report() == ({"full": True, "empty": True}, {"full": 2, "empty": 2})
    holders.remove(["chatd/client/0"])
    assert full.names.keys() == empty.names.keys() == {"chatd/listen"}


def test_the_audit_sees_a_name_kept_for_another_fd_and_is_not_fooled_by_other_names(sockets):
    """Only (name, inode) pairs of chatd's own items count: a holder that keeps the right
    names, one of them for a stale socket, plus other names of the same uid, is refilled
    with just what it lacks."""
    listen, state, stale, other = sockets.fds(4)
    items = [("chatd/listen", b"", listen), ("chatd/state", b"", state)]
    holder = Recorder("holderd", [("chatd/listen", b"", listen), ("chatd/state", b"", stale),
                                  ("chatd/old-thing", b"", other), ("someone/else", b"", other)])
    Holders([holder]).audit(items)
    assert holder.stored == [["chatd/state"]]
    assert holder.names["chatd/state"] == os.fstat(state).st_ino
