"""ServiceManager and holderd's fd-store mirror against a notify socket made here
(``notify_socket`` in conftest.py; tests/systemd runs the real thing)."""

from __future__ import annotations

import os
import socket

import pytest

from holderd.mirror import FdStoreMirror, read_index
from holderd.protocol import HolderCore
from fdkeep.systemd import ServiceManager, valid_fdname, watchdog_interval


def manager_for(notify_socket, passed=None) -> ServiceManager:
    manager = ServiceManager({"NOTIFY_SOCKET": notify_socket.path})
    manager._passed = passed or {}
    return manager


def test_without_systemd_everything_is_a_no_op():
    manager = ServiceManager({})
    assert not manager.present
    assert manager.notify("READY=1") is False
    assert manager.take_passed_fds() == {}


def test_ready_status_and_store_reach_the_socket(notify_socket):
    manager = manager_for(notify_socket)
    manager.ready("2 clients")
    a, b = socket.socketpair()
    assert manager.store("chatd/client/1", a.fileno())
    notify_socket.drain()
    assert notify_socket.messages[0] == {"READY": "1", "STATUS": "2 clients"}
    [fd] = notify_socket.store["chatd/client/1"]
    assert os.fstat(fd).st_ino == os.fstat(a.fileno()).st_ino
    manager.remove("chatd/client/1")
    notify_socket.drain()
    assert notify_socket.store == {}
    a.close(), b.close()


@pytest.mark.parametrize("name", ["", "a:b", "with space", "x" * 256, "tab\t"])
def test_invalid_fdnames_are_refused(name):
    assert not valid_fdname(name)
    with pytest.raises(ValueError):
        ServiceManager({}).store(name, 0)


def test_read_index_replays_changes_and_ignores_a_cut_line():
    data = b"+ 1 0 a YQ==\n+ 2 0 b Yg==\n- 1\n+ 2 0 b Yw==\n+ 3 0 c"
    entries, complete = read_index(data)
    assert {serial: (e.name, e.meta) for serial, e in entries.items()} == {2: ("b", b"c")}
    assert complete == data.rfind(b"\n") + 1
    with pytest.raises(ValueError):
        read_index(b"? nonsense\n")


def test_holderd_takes_back_what_its_store_kept(notify_socket):
    sockets = [socket.socketpair() for _ in range(3)]
    core = HolderCore(watcher=FdStoreMirror(manager_for(notify_socket)))
    mirror = core.watcher
    for index, (a, _) in enumerate(sockets):
        core.handle(1000, {"op": "STORE", "items": [{"name": f"n{index}", "meta": "bWV0YQ=="}]}, [os.dup(a.fileno())])
    core.handle(1000, {"op": "REMOVE", "names": ["n0"]}, [])
    core.handle(1000, {"op": "STORE", "items": [{"name": "n1", "meta": "bmV3"}]}, [os.dup(sockets[1][0].fileno())])
    mirror.detach()  # a clean stop leaves the store as it is
    core.close()

    restarted = HolderCore(watcher=FdStoreMirror(manager_for(notify_socket, notify_socket.passed())))
    assert restarted.watcher.restore(restarted) == 2
    held = {held.name: held for _, held in restarted.held_items()}
    assert sorted(held) == ["n1", "n2"]
    assert held["n1"].meta == b"new"
    assert held["n2"].ino == os.fstat(sockets[2][0].fileno()).st_ino
    restarted.watcher.detach()
    restarted.close()
    for a, b in sockets:
        a.close(), b.close()


def test_watchdog_is_pinged_at_half_its_interval_only_when_it_is_ours(notify_socket, monkeypatch):
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "3000000"}) == 1.5
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}) == 1.5
    not_ours = str(os.getpid() + 1 if os.getpid() < 4_000_000 else os.getpid() - 1)  # never our own pid (we may be 1)
    assert watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": not_ours}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    manager = ServiceManager({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "2000000"})
    assert manager.watchdog_interval == 1.0
    manager.watchdog()
    manager.stopping("bye")
    assert notify_socket.drain() == [{"WATCHDOG": "1"}, {"STOPPING": "1", "STATUS": "bye"}]


def test_a_notification_systemd_does_not_take_is_reported_not_raised(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    manager = ServiceManager({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert manager.notify("READY=1") is False
    assert manager.store("x", 0) is False


def test_holderd_keeps_thousands_in_few_names_and_takes_them_back(notify_socket):
    sockets = [socket.socketpair() for _ in range(1500)]
    core = HolderCore(watcher=FdStoreMirror(manager_for(notify_socket)))
    items = [{"name": f"n{index}", "meta": "bWV0YQ=="} for index in range(len(sockets))]
    for start in range(0, len(sockets), 250):
        core.handle(1000, {"op": "STORE", "items": items[start:start + 250]},
                    [os.dup(a.fileno()) for a, _ in sockets[start:start + 250]])
    core.handle(1000, {"op": "REMOVE", "names": [f"n{index}" for index in range(1000)]}, [])
    notify_socket.drain()
    assert len(notify_socket.store) <= 1 + 2 * 16 + 2, "an index and two ends per bundle, not an fd each"
    assert sum(len(fds) for fds in notify_socket.store.values()) == len(notify_socket.store)
    core.watcher.detach()
    core.close()

    restarted = HolderCore(watcher=FdStoreMirror(manager_for(notify_socket, notify_socket.passed())))
    assert restarted.watcher.restore(restarted) == 500
    held = {held.name: held for _, held in restarted.held_items()}
    assert sorted(held) == sorted(f"n{index}" for index in range(1000, 1500))
    assert held["n1234"].ino == os.fstat(sockets[1234][0].fileno()).st_ino
    restarted.watcher.detach()
    restarted.close()
    for a, b in sockets:
        a.close(), b.close()
