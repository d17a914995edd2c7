"""HolderCore, without a daemon: requests in, replies out, real descriptors."""

import base64
import os
import socket

import pytest

from helpers import is_open
from holderd.protocol import HolderCore, Limits, Watcher


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()




@pytest.fixture
def sockets():
    made = []

    def make(count):
        fds = []
        for _ in range(count):
            a, b = socket.socketpair()
            made.append(b)
            fds.append(a.detach())
        return fds

    yield make
    for sock in made:
        sock.close()


def store(core, uid, names, fds, metas=None):
    items = [{"name": n, "meta": b64(m)} for n, m in zip(names, metas or [b""] * len(names))]
    return core.handle(uid, {"op": "STORE", "id": 7, "items": items}, fds)


def test_store_list_retrieve_remove(sockets):
    core = HolderCore()
    fds = sockets(2)
    [reply] = store(core, 1000, ["a/1", "a/2"], fds, [b"one", b"two"])
    assert reply.body == {"id": 7, "ok": True, "stored": 2}
    [listed] = core.handle(1000, {"op": "LIST", "prefix": "a/"}, [])
    assert [(i["name"], base64.b64decode(i["meta"])) for i in listed.body["items"]] == [("a/1", b"one"), ("a/2", b"two")]
    [got] = core.handle(1000, {"op": "RETRIEVE", "prefix": "a/1"}, [])
    assert len(got.fds) == 1 and got.fds[0] not in fds
    assert os.fstat(got.fds[0]).st_ino == os.fstat(fds[0]).st_ino
    os.close(got.fds[0])
    [removed] = core.handle(1000, {"op": "REMOVE", "names": ["a/1", "missing"]}, [])
    assert removed.body["removed"] == 1 and not is_open(fds[0])


def test_each_uid_sees_only_its_own_names(sockets):
    core = HolderCore()
    store(core, 1, ["x"], sockets(1))
    [listed] = core.handle(2, {"op": "LIST"}, [])
    assert listed.body["items"] == []
    [removed] = core.handle(2, {"op": "REMOVE", "prefix": ""}, [])
    assert removed.body["removed"] == 0 and core.count(1) == 1


def test_storing_a_name_again_replaces_and_closes_the_old(sockets):
    core = HolderCore()
    old, new = sockets(2)
    store(core, 1, ["n"], [old])
    store(core, 1, ["n"], [new], [b"v2"])
    assert not is_open(old) and core.count(1) == 1


def test_retrieve_comes_in_chunks_of_253(sockets):
    core = HolderCore()
    fds = sockets(300)
    for start in range(0, 300, 253):
        store(core, 1, [f"s/{i:03}" for i in range(start, min(start + 253, 300))], fds[start:start + 253])
    replies = core.handle(1, {"op": "RETRIEVE"}, [])
    assert [len(r.fds) for r in replies] == [253, 47]
    assert [r.body["more"] for r in replies] == [True, False]
    for reply in replies:
        for fd in reply.fds:
            os.close(fd)


@pytest.mark.parametrize(
    "body, nfds, code",
    [
        ({"op": "DANCE"}, 0, "unknown-op"),
        ({"op": "STORE", "items": []}, 0, "bad-request"),
        ({"op": "STORE", "items": [{"name": "a"}, {"name": "b"}]}, 1, "fd-count-mismatch"),
        ({"op": "STORE", "items": [{"name": "has space"}]}, 1, "bad-name"),
        ({"op": "STORE", "items": [{"name": "a", "meta": "!!notbase64"}]}, 1, "bad-request"),
        ({"op": "STORE", "items": [{"name": "a", "meta": b64(b"m" * 5000)}]}, 1, "meta-too-large"),
        ({"op": "STORE", "items": [{"name": "a"}, {"name": "a"}]}, 2, "bad-request"),
        ({"op": "LIST"}, 1, "fd-count-mismatch"),
        ({"op": "REMOVE"}, 0, "bad-request"),
        ({"op": "RETRIEVE", "prefix": 5}, 0, "bad-request"),
    ],
)
def test_bad_requests_get_named_errors_and_their_fds_closed(sockets, body, nfds, code):
    core = HolderCore()
    fds = sockets(nfds)
    [reply] = core.handle(1, {**body, "id": 3}, fds)
    assert reply.body["ok"] is False and reply.body["error"] == code and reply.body["id"] == 3
    assert reply.body["message"]
    assert not any(is_open(fd) for fd in fds)
    assert core.count() == 0


def test_limit_per_uid(sockets):
    core = HolderCore(Limits(max_fds_per_uid=2))
    store(core, 1, ["a", "b"], sockets(2))
    fds = sockets(1)
    [reply] = store(core, 1, ["c"], fds)
    assert reply.body["error"] == "limit-reached" and not is_open(fds[0])
    [reply] = store(core, 1, ["a"], sockets(1))
    assert reply.body["ok"], "replacing a name does not count against the limit"


class Recorder(Watcher):
    def __init__(self):
        self.events = []

    def held(self, uid, held):
        self.events.append(("held", held.name))

    def released(self, uid, held):
        self.events.append(("released", held.name))

    def updated(self, uid, held):
        self.events.append(("updated", held.name, held.meta))


def test_watcher_sees_holds_and_releases(sockets):
    recorder = Recorder()
    core = HolderCore(watcher=recorder)
    fds = sockets(1)
    store(core, 1, ["w"], fds)
    assert core.drop_fd(fds[0]).name == "w"
    assert recorder.events == [("held", "w"), ("released", "w")]


def test_storing_the_same_socket_again_keeps_it_and_takes_the_new_meta(sockets):
    recorder = Recorder()
    core = HolderCore(watcher=recorder)
    (fd,) = sockets(1)
    again = os.dup(fd)
    core.handle(7, {"op": "STORE", "items": [{"name": "c", "meta": b64(b"old")}]}, [fd])
    [reply] = core.handle(7, {"op": "STORE", "items": [{"name": "c", "meta": b64(b"new")}]}, [again])
    assert reply.body["ok"]
    assert not is_open(again) and is_open(fd)  # the duplicate was closed, the held fd kept
    assert recorder.events == [("held", "c"), ("updated", "c", b"new")]
    [listed] = core.handle(7, {"op": "LIST"}, [])
    assert [item["meta"] for item in listed.body["items"]] == [b64(b"new")]
    core.close()


def test_a_lease_goes_to_the_first_and_passes_in_line_when_its_holder_is_gone():
    core = HolderCore()

    def lease(uid, peer, name="chatd"):
        [reply] = core.handle(uid, {"op": "LEASE", "id": 1, "lease": name}, [], peer)
        return reply.body

    assert lease(100, peer=1) == {"id": 1, "ok": True, "lease": "chatd", "granted": True}
    assert lease(100, peer=1)["granted"], "asking again keeps it"
    assert lease(100, peer=2) == {"id": 1, "ok": True, "lease": "chatd", "granted": False, "waiting": 1}
    assert lease(100, peer=3)["waiting"] == 2
    assert lease(200, peer=4)["granted"], "each uid has its own leases"
    assert core.peer_gone(3) == [], "a waiter leaving passes nothing"
    assert core.peer_gone(1) == [(2, {"id": None, "ok": True, "event": "lease-granted", "lease": "chatd"})]
    assert lease(100, peer=5)["granted"] is False
    assert core.peer_gone(2) == [(5, {"id": None, "ok": True, "event": "lease-granted", "lease": "chatd"})]
    assert core.peer_gone(5) == [] and lease(100, peer=6)["granted"], "free again"
    [bad] = core.handle(100, {"op": "LEASE", "lease": "no spaces"}, [], 7)
    assert bad.body["error"] == "bad-name"
