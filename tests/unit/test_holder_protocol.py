"""HolderCore, without a daemon: requests in, replies out, real descriptors."""

import base64
import os

import pytest

from helpers import is_open
from fdkeep.errors import Error
from holderd.protocol import HolderCore, Limits, Watcher


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def store(core, uid, names, fds, metas=None):
    items = [{"name": n, "meta": b64(m)} for n, m in zip(names, metas or [b""] * len(names))]
    return core.handle(uid, {"op": "STORE", "id": 7, "items": items}, fds)


def test_store_list_retrieve_remove(sockets):
    core = HolderCore()
    fds = sockets.given(2)
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
    store(core, 1, ["x"], sockets.given(1))
    [listed] = core.handle(2, {"op": "LIST"}, [])
    assert listed.body["items"] == []
    [removed] = core.handle(2, {"op": "REMOVE", "prefix": ""}, [])
    assert removed.body["removed"] == 0 and core.count(1) == 1


def test_storing_a_name_again_replaces_and_closes_the_old(sockets):
    core = HolderCore()
    old, new = sockets.given(2)
    store(core, 1, ["n"], [old])
    store(core, 1, ["n"], [new], [b"v2"])
    assert not is_open(old) and core.count(1) == 1


def test_retrieve_comes_in_chunks_of_253(sockets):
    core = HolderCore()
    fds = sockets.given(300)
    for start in range(0, 300, 253):
        store(core, 1, [f"s/{i:03}" for i in range(start, min(start + 253, 300))], fds[start:start + 253])
    replies = list(core.handle(1, {"op": "RETRIEVE"}, []))
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
    fds = sockets.given(nfds)
    [reply] = core.handle(1, {**body, "id": 3}, fds)
    assert reply.body["ok"] is False and reply.body["error"] == code and reply.body["id"] == 3
    assert reply.body["message"]
    assert not any(is_open(fd) for fd in fds)
    assert core.count() == 0


def test_limit_per_uid(sockets):
    core = HolderCore(Limits(max_fds_per_uid=2))
    store(core, 1, ["a", "b"], sockets.given(2))
    fds = sockets.given(1)
    [reply] = store(core, 1, ["c"], fds)
    assert reply.body["error"] == "limit-reached" and not is_open(fds[0])
    [reply] = store(core, 1, ["a"], sockets.given(1))
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
    fds = sockets.given(1)
    store(core, 1, ["w"], fds)
    assert core.drop_fd(fds[0]).name == "w"
    assert recorder.events == [("held", "w"), ("released", "w")]


def test_storing_the_same_socket_again_keeps_it_and_takes_the_new_meta(sockets):
    recorder = Recorder()
    core = HolderCore(watcher=recorder)
    (fd,) = sockets.given(1)
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


# -- RETRIEVE made chunk by chunk -----------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened


@pytest.fixture
def pipe_copies():
    """``make(n)``: n fds, all of them one pipe's read end (holderd keeps fds, not files)."""
    made = []

    def make(count):
        r, w = os.pipe()
        made.extend([r, w])
        return [os.dup(r) for _ in range(count)]

    yield make
    for fd in made:
        os.close(fd)


@pytest.fixture
def free_fds_only():
    """``leave(n)``: from now on this process can open exactly n more fds (its soft
    RLIMIT_NOFILE just above its fds, the holes below them filled); undone after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []

    def leave(count):
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        while True:
            fd = os.open("/dev/null", os.O_RDONLY)
            if fd > highest:
                os.close(fd)
                break
            fillers.append(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1 + count, hard))

    yield leave
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for fd in fillers:
        os.close(fd)


def store_many(core, uid, fds, prefix="p/"):
    for start in range(0, len(fds), 253):
        batch = fds[start:start + 253]
        [reply] = store(core, uid, [f"{prefix}{i:05}" for i in range(start, start + len(batch))], batch)
        assert reply.body["ok"], reply.body


def test_a_retrieve_duplicates_each_chunk_only_when_it_is_taken(pipe_copies):
    core = HolderCore()
    store_many(core, 1, pipe_copies(300))
    before = open_fds()
    replies = core.handle(1, {"op": "RETRIEVE", "id": 4}, [])
    assert open_fds() == before, "no fd is duplicated before a chunk is taken"
    first = replies.take(10)
    assert len(first.fds) == 10 and first.body["more"] is True and first.body["id"] == 4
    assert open_fds() == before + 10
    os.close(first.fds[0])
    assert replies.take(0) is None, "no room for fds: no chunk"
    rest = list(replies)
    assert [len(r.fds) for r in rest] == [253, 37] and rest[-1].body["more"] is False
    names = [item["name"] for r in [first, *rest] for item in r.body["items"]]
    assert names == [f"p/{i:05}" for i in range(300)]
    for reply in [first, *rest]:
        for fd in reply.fds:
            if is_open(fd):
                os.close(fd)
    core.close()


def test_a_retrieve_of_everything_needs_free_fds_for_one_chunk_not_for_all_held(pipe_copies, free_fds_only):
    """holderd at its fd limit holding more than it has free: RETRIEVE of all of it failed
    with no-resources (every fd was duplicated up front); taken chunk by chunk, it works."""
    core = HolderCore()
    store_many(core, 1, pipe_copies(600))
    free_fds_only(200)  # 600 held
    got = []
    for reply in core.handle(1, {"op": "RETRIEVE"}, []):
        assert reply.body["ok"], reply.body
        got.extend(item["name"] for item in reply.body["items"])
        for fd in reply.fds:
            os.close(fd)  # the caller sends them; then they are free again
    assert got == [f"p/{i:05}" for i in range(600)]
    core.close()


def test_duplicating_leaves_the_reserve_free_and_says_when_nothing_is_to_spare(pipe_copies, free_fds_only):
    core = HolderCore(Limits(fd_reserve=20))
    store_many(core, 1, pipe_copies(100))
    free_fds_only(50)
    replies = core.handle(1, {"op": "RETRIEVE"}, [])
    first = replies.take(253)
    assert len(first.fds) == 50 - 20, "all but the reserve"
    spare = [os.dup(first.fds[0]) for _ in range(20)]  # the reserve is there
    with pytest.raises(OSError):
        os.dup(first.fds[0])
    for fd in spare:
        os.close(fd)
    assert replies.take(253) is None, "nothing to spare now: no chunk, and no error yet"
    assert not replies.done
    failed = replies.fail(Error("no-resources", "out of fds"))
    assert failed.body["error"] == "no-resources" and replies.done
    for fd in first.fds:
        os.close(fd)
    core.close()


def test_a_chunk_gives_what_is_held_when_it_is_made(pipe_copies, sockets):
    core = HolderCore()
    store_many(core, 1, pipe_copies(5))
    replies = core.handle(1, {"op": "RETRIEVE", "prefix": "p/"}, [])
    first = replies.take(2)
    assert [i["name"] for i in first.body["items"]] == ["p/00000", "p/00001"]
    core.handle(1, {"op": "REMOVE", "names": ["p/00002"]}, [])
    (new,) = sockets.given(1)
    store(core, 1, ["p/00003"], [new])  # replaced by another file
    rest = list(replies)
    items = [i for r in rest for i in r.body["items"]]
    assert [i["name"] for i in items] == ["p/00003", "p/00004"], "a name dropped meanwhile is skipped"
    fds = [fd for r in [first, *rest] for fd in r.fds]
    assert os.fstat(fds[2]).st_ino == items[0]["ino"] == os.fstat(new).st_ino, "a replaced name gives its new fd"
    for fd in fds:
        os.close(fd)
    core.close()
