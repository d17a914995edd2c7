"""A running holderd against bad input, strangers, limits and hang-ups."""

import array
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from ctl.launch import wait_until
from fdkeep.errors import Error
from fdkeep.frames import HEADER, encode_frame
from fdkeep.peer import FrameSocket
from helpers import OtherUser, lease_granted, needs_root_to_act_as_another_uid, tcp_pair
from holderd.client import HolderClient, Lease


def raw_connection(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(path)
    return sock


def read_reply(sock):
    return FrameSocket("raw", sock=sock).receive()


@pytest.fixture
def holder(procs):
    procs.start_holderd("--max-fds-per-uid", "50")
    return procs


def still_serves(procs):
    assert HolderClient(procs.holder_socket).ping()["version"] == 1
    assert procs.holderd.poll() is None


def test_store_and_retrieve_across_processes(holder):
    client, server = tcp_pair()
    with HolderClient(holder.holder_socket) as h:
        h.store([("t/conn", b"meta", server.fileno())])
    server.close()  # only holderd's copy is left
    with HolderClient(holder.holder_socket) as h:
        [got] = h.retrieve("t/")
    assert got.meta == b"meta"
    back = socket.socket(fileno=got.fd)
    back.sendall(b"still here")
    assert client.recv(100) == b"still here"
    back.close()
    client.close()


def test_garbage_and_oversized_frames(holder):
    sock = raw_connection(holder.holder_socket)
    sock.sendall(HEADER.pack(9, 0) + b"not json!")
    assert read_reply(sock).body["error"] == "bad-frame"
    sock.sendall(encode_frame({"op": "PING"}))
    assert read_reply(sock).body["ok"] is True, "a bad frame does not end the connection"
    sock.sendall(HEADER.pack(50_000_000, 0) + os.urandom(100))
    assert read_reply(sock).body["error"] == "frame-too-large"
    assert sock.recv(10) == b"", "an out-of-sync stream is closed"
    sock.close()
    still_serves(holder)


def test_random_bytes_never_kill_it(holder):
    for seed in range(20):
        sock = raw_connection(holder.holder_socket)
        sock.sendall(os.urandom(1 + seed * 37))
        sock.close()
    still_serves(holder)


def test_wrong_fd_counts(holder):
    sock = raw_connection(holder.holder_socket)
    client, server = tcp_pair()
    body = encode_frame({"op": "STORE", "items": [{"name": "a"}, {"name": "b"}]}, 2)
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server.fileno()]))])
    assert read_reply(sock).body["error"] == "fd-count-mismatch"
    body = encode_frame({"op": "STORE", "items": [{"name": "a"}]}, 2)
    sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server.fileno()]))])
    assert read_reply(sock).body["error"] == "fd-count-mismatch"
    sock.close()
    assert HolderClient(holder.holder_socket).list() == []
    client.close()
    server.close()
    still_serves(holder)


def test_client_vanishing_mid_frame_with_fds(holder):
    client, server = tcp_pair()
    sock = raw_connection(holder.holder_socket)
    frame = encode_frame({"op": "STORE", "items": [{"name": "half"}]}, 1)
    sock.sendmsg([frame[:10]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server.fileno()]))])
    sock.close()
    server.close()
    # holderd must not keep the half-delivered fd: the client then sees EOF.
    client.settimeout(5)
    assert client.recv(10) == b""
    still_serves(holder)
    assert HolderClient(holder.holder_socket).list() == []


def test_limits_give_clear_errors(holder):
    pairs = [tcp_pair() for _ in range(51)]
    with HolderClient(holder.holder_socket) as h:
        h.store([(f"l/{i}", b"", s.fileno()) for i, (_, s) in enumerate(pairs[:50])])
        with pytest.raises(Error) as caught:
            h.store([("l/50", b"", pairs[50][1].fileno())])
        assert caught.value.code == "limit-reached" and "--max-fds-per-uid" in caught.value.message
        with pytest.raises(Error) as caught:
            h.store([("l/0", b"x" * 5000, pairs[0][1].fileno())])
        assert caught.value.code == "meta-too-large"
        assert h.ping()["held"] == 50
    for c, s in pairs:
        c.close()
        s.close()


def test_held_socket_that_hangs_up_is_dropped(holder):
    client, server = tcp_pair()
    a, b = socket.socketpair()
    with HolderClient(holder.holder_socket) as h:
        h.store([("hup/tcp", b"", server.fileno()), ("hup/unix", b"", a.fileno())])
    server.close()
    a.close()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST: holderd's copy reports POLLERR/POLLHUP
    b.close()
    with HolderClient(holder.holder_socket) as h:
        wait_until(lambda: h.list("hup/") == [], 5, "hung-up sockets to be dropped")


STRANGER = """
from fdkeep.errors import Error
from holderd.client import HolderClient
try:
    h = HolderClient({path!r})
    print(h.ping()["held"], len(h.list()), h.remove(prefix=""))
except Error as exc:
    print(exc.code)
"""


@pytest.fixture
def stranger(procs):
    needs_root_to_act_as_another_uid()
    made = OtherUser()
    procs.holder_socket = made.path("h.sock")
    made.ping = lambda: made.run(STRANGER, path=procs.holder_socket).split()
    yield made
    procs.close()
    made.close()


def test_a_stranger_uid_is_refused_and_others_are_unharmed(procs, stranger):
    procs.start_holderd()
    client, server = tcp_pair()
    with HolderClient(procs.holder_socket) as mine:
        mine.store([("mine", b"", server.fileno())])
        assert stranger.ping() == ["not-allowed"]
        assert mine.ping()["held"] == 1, "the refusal did not disturb an allowed client"
    client.close()
    server.close()


def test_allowed_uids_have_separate_names(procs, stranger):
    procs.start_holderd("--allow-uid", "0", "--allow-uid", str(stranger.uid))
    client, server = tcp_pair()
    with HolderClient(procs.holder_socket) as mine:
        mine.store([("secret", b"", server.fileno())])
    assert stranger.ping() == ["0", "0", "0"]
    assert HolderClient(procs.holder_socket).ping()["held"] == 1
    client.close()
    server.close()


def test_big_metadata_is_batched_by_size_both_ways(procs):
    procs.start_holderd("--max-fds-per-uid", "400")
    pipes = [os.pipe() for _ in range(300)]
    meta = os.urandom(4096)  # 300 items of the largest metadata: several MB in all
    with HolderClient(procs.holder_socket) as h:
        assert h.store([(f"big/{i}", meta, r) for i, (r, _) in enumerate(pipes)]) == 300
        got = h.retrieve("big/")
        assert len(got) == 300 and all(item.meta == meta for item in got)
        assert len(h.list("big/")) == 300
        for item in got:
            os.close(item.fd)
        assert h.remove(names=["big/1", "big/1", "big/2"]) == 2  # a name twice is removed once
    for r, w in pipes:
        os.close(r), os.close(w)
    still_serves(procs)


@pytest.mark.parametrize(
    "frame, code",
    [
        (HEADER.pack(10, 0) + b'{"id":NaN}', "bad-frame"),  # JSON, not JavaScript
        (HEADER.pack(4, 0) + "{}".encode("utf-16-le"), "bad-frame"),  # UTF-8 only
    ],
    ids=["nan", "utf16"],
)
def test_bodies_must_be_strict_utf8_json(holder, frame, code):
    sock = raw_connection(holder.holder_socket)
    sock.sendall(frame)
    assert read_reply(sock).body["error"] == code
    sock.close()
    still_serves(holder)


def test_a_frame_announcing_more_than_253_fds_is_refused(holder):
    sock = raw_connection(holder.holder_socket)
    sock.sendall(HEADER.pack(2, 300) + b"{}")
    reply = read_reply(sock)
    assert reply.body["error"] == "bad-frame" and "253" in reply.body["message"]
    assert sock.recv(1) == b""  # the stream cannot be trusted any more: disconnected
    sock.close()
    still_serves(holder)


def test_out_of_fds_it_pauses_accepting_says_so_once_and_serves_again(procs):
    """holderd at its fd limit: accept() fails with EMFILE while clients wait in the backlog.
    It must not spin (it did: ~100 % CPU, megabytes of `accept failed`), and once fds are
    free again it serves."""
    procs.start_holderd(fd_limit=64)
    crowd = []
    for _ in range(100):  # more than 64 fds' worth; the backlog holds the rest
        crowd.append(raw_connection(procs.holder_socket))
    holderd_cpu = lambda: sum(int(x) for x in open(f"/proc/{procs.holderd.pid}/stat").read().split()[13:15])
    wait_until(lambda: "accept failed" in procs.logs(), 10, "holderd to run out of fds")
    before = holderd_cpu()
    time.sleep(2)
    spent = (holderd_cpu() - before) / os.sysconf("SC_CLK_TCK")
    assert spent < 0.5, f"holderd spent {spent:.2f} s of CPU in 2 s while out of fds: it spins"
    assert procs.logs().count("accept failed") == 1, "said once, not in a loop"
    for sock in crowd:
        sock.close()
    wait_until(lambda: HolderClient(procs.holder_socket, timeout=1).ping()["version"] == 1, 10,
               "holderd to serve again")
    wait_until(lambda: "accepting again" in procs.logs(), 10, "holderd to say it accepts again")
    still_serves(procs)


# -- what one client may make holderd keep ---------------------------------------------------


def fds_of(proc) -> int:
    return len(os.listdir(f"/proc/{proc.pid}/fd"))


def settled_fds(proc) -> int:
    """holderd's fd count once it has closed what clients gone before left (the same twice, 0.3 s apart)."""
    counts = [fds_of(proc)]

    def same_again():
        time.sleep(0.3)
        counts.append(fds_of(proc))
        return counts[-1] == counts[-2]

    wait_until(same_again, 10, "holderd's fd count to settle")
    return counts[-1]


def back_to(proc, baseline: int, what: str) -> None:
    counts = []
    try:
        wait_until(lambda: counts.append(fds_of(proc)) or counts[-1] == baseline, 10, what)
    except Error:
        raise AssertionError(f"holderd has {counts[-1]} fds, not {baseline} as before: {what}") from None


def send_some(sock, data: bytes) -> None:
    """Send what the socket takes of ``data`` now, never waiting: a client that does not care."""
    sock.setblocking(False)
    try:
        sock.send(data)
    except OSError:
        pass


def replied(sock, timeout: float) -> bool:
    readable, _, _ = select.select([sock], [], [], timeout)
    return bool(readable)


def test_a_client_that_pipelines_retrieves_and_reads_nothing_takes_no_fds_from_others(procs):
    """It made holderd duplicate fds until RLIMIT_NOFILE, and every other client's STORE and
    RETRIEVE failed. Now holderd reads no more of its requests once it has a few fds unread
    (at an fd limit of 512: 32 per connection, 128 per uid), and everyone else is served."""
    procs.start_holderd(fd_limit=512)
    pipes = [os.pipe() for _ in range(8)]
    with HolderClient(procs.holder_socket) as h:
        h.store([(f"held/{i}", b"", r) for i, (r, _) in enumerate(pipes)])
    inos = sorted(os.fstat(r).st_ino for r, _ in pipes)
    for r, w in pipes:
        os.close(r), os.close(w)
    baseline = settled_fds(procs.holderd)
    greedy = raw_connection(procs.holder_socket)
    send_some(greedy, encode_frame({"op": "RETRIEVE", "prefix": "held/"}) * 3000)  # 24,000 fds' worth
    time.sleep(1)  # holderd takes what it will of them
    with HolderClient(procs.holder_socket) as honest:
        for round in range(20):
            assert honest.ping()["held"] == 8
            r, w = os.pipe()
            honest.store([("honest/new", b"", r)])
            got = honest.retrieve("")
            assert sorted(item.name for item in got) == sorted([f"held/{i}" for i in range(8)] + ["honest/new"])
            for item in got:
                os.close(item.fd)
            assert honest.remove(names=["honest/new"]) == 1
            os.close(r), os.close(w)
        kept = honest.list("held/")
    assert sorted(item["ino"] for item in kept) == inos, "holderd kept every fd it held"
    assert fds_of(procs.holderd) <= baseline + 32 + 5, "the greedy client's unsent fds are bounded"
    wait_until(lambda: "left" in procs.logs() and "unread" in procs.logs(), 30, "the greedy client to be logged")
    greedy.close()
    back_to(procs.holderd, baseline, "holderd to close what it had queued for the greedy client")
    assert procs.logs().count("of its replies unread") == 1, "logged once, not in a loop"
    assert f"pid={os.getpid()}" in procs.logs()
    still_serves(procs)


def test_one_retrieve_takes_back_more_fds_than_holderd_has_free(procs):
    """Holding 1,400 fds at an fd limit of 2,000, a RETRIEVE of all of them failed with
    no-resources: every duplicate was made before the first was sent."""
    procs.start_holderd(fd_limit=2000)
    pipes = [os.pipe() for _ in range(1400)]
    with HolderClient(procs.holder_socket, timeout=30) as h:
        assert h.store([(f"many/{i:04}", b"m", r) for i, (r, _) in enumerate(pipes)]) == 1400
    inos = [os.fstat(r).st_ino for r, _ in pipes]
    for r, w in pipes:
        os.close(r), os.close(w)
    baseline = settled_fds(procs.holderd)
    assert baseline > 1400
    with HolderClient(procs.holder_socket, timeout=30) as h:
        got = h.retrieve("many/")
    assert [item.name for item in got] == [f"many/{i:04}" for i in range(1400)]
    assert [os.fstat(item.fd).st_ino for item in got] == inos
    for item in got:
        os.close(item.fd)
    back_to(procs.holderd, baseline, "holderd's fds to be back where they were")
    still_serves(procs)


def test_unfinished_frames_of_one_uid_park_at_most_8_mib_in_holderd(holder):
    """50 connections, each with most of a 1 MiB frame sent, parked 50 MB; the uid's total is bounded."""
    body = b'{"op":"PING","pad":"' + b"x" * (1_000_000 - 22) + b'"}'
    frame = HEADER.pack(len(body), 0) + body
    socks = []
    for _ in range(12):  # 900 KB each: the 10th goes past 8 MiB
        sock = raw_connection(holder.holder_socket)
        socks.append(sock)
        try:
            sock.sendall(frame[:900_000])
        except OSError:
            pass  # dropped while sending
    wait_until(lambda: "parked-limit" in holder.logs(), 10, "holderd to refuse the uid's 10th unfinished frame")
    refused = [sock for sock in socks if replied(sock, 0.5)]
    assert 1 <= len(refused) <= 4 and not any(sock in refused for sock in socks[:8])
    for sock in refused:
        reply = read_reply(sock).body
        assert reply["error"] == "parked-limit" and "--max-parked-bytes-per-uid" in reply["message"]
    still_serves(holder)
    for sock in socks:
        if sock not in refused:
            sock.sendall(frame[900_000:])
            assert read_reply(sock).body["ok"] is True, "the others' frames, once whole, are served"
        sock.close()
    assert holder.logs().count("(parked-limit)") == 1, "logged once, not for every connection dropped"


def test_unfinished_frames_of_one_uid_park_at_most_1024_fds(holder):
    """fds ride with a frame's first byte: a frame begun and never finished kept them, 253 a
    connection, as many connections as the client liked."""
    client, server = tcp_pair()
    baseline = settled_fds(holder.holderd)
    frame = encode_frame({"op": "STORE", "items": [{"name": f"n{i}"} for i in range(253)]}, 253)
    socks = []
    for _ in range(5):  # 253 fds each: the 5th goes past 1024
        sock = raw_connection(holder.holder_socket)
        sock.sendmsg([frame[:10]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server.fileno()] * 253))])
        socks.append(sock)
    wait_until(lambda: "parked-limit" in holder.logs(), 10, "holderd to refuse the 5th")
    assert not any(replied(sock, 0.2) for sock in socks[:4])
    reply = read_reply(socks[4]).body
    assert reply["error"] == "parked-limit" and "--max-parked-fds-per-uid" in reply["message"]
    with HolderClient(holder.holder_socket) as h:
        h.store([("honest", b"", server.fileno())])  # a STORE of one more fd: within the bound
        assert h.remove(names=["honest"]) == 1
    for sock in socks:
        sock.close()
    back_to(holder.holderd, baseline, "holderd to close every parked fd")
    server.close()
    client.settimeout(5)
    assert client.recv(10) == b"", "holderd kept none of them"
    client.close()


def test_a_frame_begun_must_be_whole_within_the_frame_timeout(procs):
    procs.start_holderd("--frame-timeout", "2")
    slow = raw_connection(procs.holder_socket)
    frame = encode_frame({"op": "PING", "id": 1})
    slow.sendall(frame[:8])
    started = time.monotonic()
    honest = raw_connection(procs.holder_socket)
    honest.sendall(frame[:8])
    time.sleep(0.5)
    honest.sendall(frame[8:])  # slow, but whole within the timeout
    assert read_reply(honest).body["ok"] is True
    slow.settimeout(30)
    reply = read_reply(slow).body
    assert reply["error"] == "timeout" and "--frame-timeout" in reply["message"]
    assert time.monotonic() - started >= 2
    assert slow.recv(10) == b"", "and it is dropped"
    slow.close()
    honest.sendall(frame)
    assert read_reply(honest).body["ok"] is True, "the honest connection lives on"
    honest.close()
    assert procs.logs().count("(timeout)") == 1
    still_serves(procs)


def test_one_uid_may_have_at_most_256_connections(holder):
    socks = []
    ping = encode_frame({"op": "PING"})
    for _ in range(256):
        sock = raw_connection(holder.holder_socket)
        sock.sendall(ping)
        assert read_reply(sock).body["ok"] is True
        socks.append(sock)
    for _ in range(20):
        extra = raw_connection(holder.holder_socket)
        reply = read_reply(extra).body
        assert reply["error"] == "too-many-connections" and "--max-connections-per-uid" in reply["message"]
        assert extra.recv(10) == b""
        extra.close()
    assert holder.logs().count("(too-many-connections)") == 1, "logged once, not each time"
    socks.pop().close()

    def served():
        try:
            return HolderClient(holder.holder_socket, timeout=2).ping()["ok"]
        except Error as exc:  # holderd may take the new connection before it sees the old one end
            assert exc.code == "too-many-connections"
            return False

    wait_until(served, 10, "a free connection")
    for sock in socks:
        sock.close()
    still_serves(holder)


# -- leases: the holder's process dying passes the lease, whatever keeps its socket ---------

FORKING_LEASE_ASKER = """
import os, sys
from holderd.client import Lease
lease = Lease({name!r}, {path!r})
print("granted" if lease.request() else "waiting", flush=True)
child = os.fork()  # a child that keeps a copy of every fd, the lease's connection among them
if child == 0:
    sys.stdin.read()  # until the test closes our stdin
    os._exit(0)
print(child, flush=True)
sys.stdin.read()
"""


class ForkingLeaseAsker:
    """A process that asks holderd for a lease, then forks a child that keeps the lease's
    connection open (a copy of it) for as long as the test keeps this one's stdin open."""

    def __init__(self, procs, name: str):
        script = FORKING_LEASE_ASKER.format(name=name, path=procs.holder_socket)
        self.proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=procs.env, text=True)
        self.answer = self.proc.stdout.readline().strip()
        self.child = int(self.proc.stdout.readline())

    def child_alive(self) -> bool:
        try:
            with open(f"/proc/{self.child}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()  # the child reads EOF and exits
        self.proc.stdout.close()
        wait_until(lambda: not self.child_alive(), 10, "the lease asker's child to exit")


@pytest.fixture
def forking_lease_asker(procs):
    made = []

    def make(name: str) -> ForkingLeaseAsker:
        made.append(ForkingLeaseAsker(procs, name))
        return made[-1]

    yield make
    for asker in made:
        asker.close()



def test_a_lease_passes_when_its_holder_dies_though_a_child_keeps_its_connection(procs, forking_lease_asker):
    procs.start_holderd()
    holder = forking_lease_asker("t-lease")
    assert holder.answer == "granted"
    waiter = Lease("t-lease", procs.holder_socket)
    assert waiter.request() is False
    killed_at = time.monotonic()
    holder.proc.kill()
    assert lease_granted(waiter, 10), "the holder died: the lease is the waiter's, however long its child lives"
    took = time.monotonic() - killed_at
    assert holder.child_alive(), "the holder's connection lived on in its child all along"
    print(f"SIGKILL of the holder -> the waiter granted the lease: {took * 1000:.2f} ms")
    # holderd logs it after sending the grant: the log may come a moment after.
    [passed] = wait_until(lambda: [line for line in procs.logs().splitlines() if "passes to" in line], 5,
                          "holderd to log the lease passing")
    print(passed)
    assert f"(its holder, pid {holder.proc.pid}, is gone: its process exited (pidfd) first;" in passed
    waiter.close()


def test_a_waiter_that_dies_leaves_the_line_though_a_child_keeps_its_connection(procs, forking_lease_asker):
    procs.start_holderd()
    holder = Lease("t-lease", procs.holder_socket)
    assert holder.request() is True
    dead = forking_lease_asker("t-lease")
    assert dead.answer == "waiting"
    dead.proc.kill()
    dead.proc.wait()
    waiter = Lease("t-lease", procs.holder_socket)
    assert waiter.request() is False
    holder.close()
    assert lease_granted(waiter, 10), "the lease went to the waiter that died before this one"
    assert dead.child_alive()
    waiter.close()
