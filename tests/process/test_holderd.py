"""A running holderd against bad input, strangers, limits and hang-ups."""

import array
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from ctl.launch import SOURCE_ROOT, wait_until
from fdkeep.errors import Error
from fdkeep.frames import HEADER, encode_frame
from fdkeep.peer import FrameSocket
from helpers import tcp_pair
from holderd.client import HolderClient


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


def needs_root_to_act_as_another_uid():
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("CI runs as root: this test must not be skipped there")
        pytest.skip("needs root to act as another uid")


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
import sys
sys.path.insert(0, {root!r})
from fdkeep.errors import Error
from holderd.client import HolderClient
try:
    h = HolderClient({path!r})
    print(h.ping()["held"], len(h.list()), h.remove(prefix=""))
except Error as exc:
    print(exc.code)
"""


class Stranger:
    """Another uid's client: the system's python and a private copy of the client
    library in a world-readable directory, so that it works wherever the checkout
    lies (root's home is mode 700 on Debian, and so is a venv inside it)."""

    def __init__(self, uid: int = 65534):
        self.uid = uid
        self.directory = tempfile.mkdtemp(prefix="holderd-stranger-")
        os.chmod(self.directory, 0o755)
        for package in ("fdkeep", "holderd"):
            shutil.copytree(os.path.join(SOURCE_ROOT, package), os.path.join(self.directory, "lib", package),
                            ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(self.directory):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755)
        self.socket_path = os.path.join(self.directory, "h.sock")

    def ping(self) -> list[str]:
        """What the stranger's client saw: holderd's error code, or held/listed/removed counts."""
        script = STRANGER.format(root=os.path.join(self.directory, "lib"), path=self.socket_path)
        out = subprocess.run(["/usr/bin/python3", "-I", "-c", script], user=self.uid, capture_output=True,
                             text=True, timeout=20, cwd=self.directory)
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def stranger(procs):
    needs_root_to_act_as_another_uid()
    made = Stranger()
    procs.holder_socket = made.socket_path
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
