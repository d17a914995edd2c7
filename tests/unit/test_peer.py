"""fdkeep.peer on real sockets and a real loop: FramePeer serving one end of a socketpair,
the test the client at the other end, reading only when it chooses to (as a slow or
hostile client would); Channel under a minimal subclass; FrameSocket, the blocking client.

Everything runs in this thread: a socketpair's bytes are in the other end's queue as
soon as ``send`` returns, so pumping the loop until nothing is ready (:meth:`Served.pump`)
is deterministic, no sleeps and no threads.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import subprocess
import sys

import pytest

from ctl.launch import wait_until
from fdkeep import peer as peer_module
from fdkeep.errors import Error
from fdkeep.fdpass import recv_with_fds
from fdkeep.frames import HEADER, FrameDecoder, encode_frame
from fdkeep.loop import Loop
from fdkeep.peer import (Channel, FramePeer, FrameSocket, OutputQueue, listen_unix, peer_credentials,
                         peer_pidfd, send_frame)
from helpers import is_open
from proptools import open_fds

BIG = 100_000  # one reply's padding: a few fill the socket, a few more pass HIGH_WATER
SEND_BUFFER = 64 << 10  # what our end's kernel queue may hold (doubled by the kernel), whatever
                        # the machine's default: then a few replies fill it, on any machine


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): ours with a small send buffer."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    return ours, theirs


class Clock:
    """The loop's clock, moved by the test (the frame timeout is measured on it)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Client:
    """The far end of the socketpair: sends frames, reads them only when asked, never blocks."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.decoder = FrameDecoder(1 << 24)
        self.eof = False

    def send(self, body: dict, fds=()) -> None:
        send_frame(self.sock, body, fds)

    def send_bytes(self, data: bytes, fds=()) -> None:
        socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.sendall(data)

    def read(self) -> list:
        """Every whole frame that has arrived (reading all the socket holds now)."""
        while not self.eof:
            try:
                data, fds = recv_with_fds(self.sock, flags=socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            self.eof = not data
            self.decoder.feed(data, fds)
        frames = []
        while (frame := self.decoder.next_frame()) is not None:
            frames.append(frame)
        return frames

    def close(self) -> None:
        self.decoder.close()
        self.sock.close()


class Served:
    """A FramePeer of ``peer_class`` on a loop of its own, and what it handed its owner."""

    def __init__(self, peer_class=FramePeer, on_frame=None, **options):
        self.clock = Clock()
        self.loop = Loop(self.clock)
        ours, theirs = socket_pair()
        self.client = Client(theirs)
        self.frames: list[tuple[dict, list[int]]] = []
        self.closes = 0
        self.drains = 0
        self.parked: list[tuple[int, int]] = []
        self._on_frame = on_frame
        self.peer = peer_class(self.loop, ours, self._frame, self._closed, on_drain=self._drained,
                               on_parked=self._on_parked, **options)

    def _frame(self, peer, body, fds):
        self.frames.append((body, fds))
        if self._on_frame is not None:
            self._on_frame(peer, body, fds)

    def _closed(self, peer):
        self.closes += 1

    def _drained(self, peer):
        self.drains += 1

    def _on_parked(self, peer):
        self.parked.append((peer.parked_bytes, peer.parked_fds))
        return None

    def pump(self, rounds: int = 50) -> None:
        """Run the loop until nothing is ready (each round handles what is ready now)."""
        for _ in range(rounds):
            self.loop.run_once(0)

    def run_until(self, condition, what: str):
        """Pump the loop (and let the client read) until ``condition()``; fail after 5 s."""
        return wait_until(lambda: (self.loop.run_once(0), condition())[1], 5, what, interval=0)

    def park_half_a_frame(self) -> None:
        """The client begins a frame with an fd and stops: the peer parks both (the fd is
        the peer's alone: the client's copies are closed)."""
        r, w = os.pipe()
        self.client.send_bytes(encode_frame({"half": True}, 1)[:8], [r])
        os.close(r), os.close(w)
        self.pump()
        assert (self.peer.parked_bytes, self.peer.parked_fds) == (8, 1)

    def close(self) -> None:
        self.peer.close()
        self.client.close()
        for _, fds in self.frames:
            for fd in fds:
                if is_open(fd):
                    os.close(fd)
        self.loop.close()


@pytest.fixture
def served():
    made = []

    def make(**options) -> Served:
        made.append(Served(**options))
        return made[-1]

    yield make
    for one in made:
        one.close()


def inode(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_a_frame_and_its_fds_come_in_and_a_reply_and_its_fds_go_out(served):
    s = served()
    r, w = os.pipe()
    try:
        s.client.send({"op": "PING", "id": 1}, [r])
        s.run_until(lambda: s.frames, "the frame")
        [(body, [received])] = s.frames
        assert body == {"op": "PING", "id": 1}
        assert received != r and inode(received) == inode(r), "its own duplicate of the fd sent"
        duplicate = os.dup(w)
        s.peer.send({"id": 1, "ok": True}, [duplicate])
        assert not is_open(duplicate), "a reply's fds are closed once sent: they were duplicates"
        [reply] = s.run_until(s.client.read, "the reply")
        assert reply.body == {"id": 1, "ok": True} and inode(reply.fds[0]) == inode(w)
        os.close(reply.fds[0])
    finally:
        os.close(r), os.close(w)
    assert (s.peer.pid, s.peer.uid, s.peer.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert peer_credentials(s.client.sock) == (os.getpid(), os.getuid(), os.getgid())


def test_pipelined_frames_come_in_order_and_a_frame_in_pieces_is_parked_until_whole(served):
    told = []
    s = served(frame_timeout=(60, "--frame-timeout"), on_overdue=lambda peer, error: told.append(error))
    s.client.send_bytes(b"".join(encode_frame({"n": n}) for n in range(5)))
    s.pump()
    assert [body["n"] for body, _ in s.frames] == list(range(5))
    data = encode_frame({"n": 5, "pad": "p" * 100}, 1)
    r, w = os.pipe()
    os.close(w)
    s.client.send_bytes(data[:10], [r])
    os.close(r)  # in flight now, in the peer's socket: the peer's copy is the only one
    s.pump()
    assert len(s.frames) == 5 and s.parked[-1] == (10, 1), "what a half frame parks is told after each read"
    assert s.peer.partial_since == s.clock.now
    s.clock.now += 30
    s.pump()
    assert told == [] and not s.peer.closed, "within its frame timeout"
    s.client.send_bytes(data[10:])
    s.pump()
    assert len(s.frames) == 6 and len(s.frames[5][1]) == 1, "the fd parked with it comes with it"
    assert s.peer.partial_since is None
    assert (s.peer.parked_bytes, s.peer.parked_fds) == (0, 0)
    s.clock.now += 100
    s.pump()
    assert told == [] and not s.peer.closed, "the deadline went with the frame it was for"


def test_a_frame_left_unfinished_past_its_timeout_is_refused_as_fatal_and_what_it_parked_goes(served):
    told = []
    s = served(frame_timeout=(60, "--frame-timeout"), on_overdue=lambda peer, error: told.append(error))
    s.park_half_a_frame()
    s.clock.now += 59
    s.pump()
    assert told == [], "not yet"
    s.clock.now += 2
    s.pump()
    [error] = told
    assert error.code == "timeout" and error.fatal and "--frame-timeout" in error.message
    [reply] = s.client.read()
    assert reply.body["error"] == "timeout"
    assert s.peer.closed and (s.peer.parked_bytes, s.peer.parked_fds) == (0, 0)


def test_a_bad_frame_gets_an_error_and_its_fds_are_closed_and_the_connection_goes_on(served):
    s = served()
    r, w = os.pipe()
    before = open_fds()
    body = b"[1, 2]"
    s.client.send_bytes(HEADER.pack(len(body), 1) + body, [r])
    s.pump()
    [refusal] = s.client.read()
    assert refusal.body["ok"] is False and refusal.body["error"] == "bad-frame"
    assert s.frames == [] and open_fds() == before, "the refused frame's fd is closed"
    s.client.send_bytes(HEADER.pack(2, 1) + b"{}")  # announces an fd that never comes
    s.pump()
    [refusal] = s.client.read()
    assert refusal.body["error"] == "fd-count-mismatch"
    s.client.send({"op": "PING"})
    s.pump()
    assert [body for body, _ in s.frames] == [{"op": "PING"}] and not s.peer.closed and s.closes == 0
    os.close(r), os.close(w)


def test_a_frame_over_the_limit_is_refused_and_the_peer_disconnected(served):
    s = served(max_frame=1024)
    s.client.send_bytes(HEADER.pack(1025, 0) + b"x" * 100)
    s.pump()
    [refusal] = s.client.read()
    assert refusal.body["error"] == "frame-too-large" and "1024" in refusal.body["message"]
    assert s.peer.closed and s.closes == 1 and s.client.eof, "a stream out of sync is ended after its error"
    assert s.frames == []


def test_a_peer_that_reads_no_replies_is_held_back_at_high_water_and_served_again_when_it_reads(served):
    def answer(peer, body, fds):
        peer.send({"id": body["id"], "pad": "x" * BIG})

    s = served(on_frame=answer)
    requests = 60
    s.client.send_bytes(b"".join(encode_frame({"id": n}) for n in range(requests)))
    s.pump()
    taken = len(s.frames)
    assert 0 < taken < requests, "it stopped taking requests"
    assert s.peer.lagging and not s.peer.reading
    assert s.peer.output.pending <= FramePeer.HIGH_WATER + BIG + 100, "what waits for it is bounded"
    s.pump()
    assert len(s.frames) == taken, "its requests wait in its socket while it does not read"
    replies = []
    s.run_until(lambda: replies.extend(s.client.read()) or len(replies) == requests, "every reply")
    assert [reply.body["id"] for reply in replies] == list(range(requests)), "each answered, in order"
    assert s.drains > 0 and s.peer.reading and not s.peer.lagging and not s.peer.closed


class SmallQueue(FramePeer):
    MAX_PENDING_OUTPUT = 1 << 16


def test_a_peer_that_lets_its_queue_reach_the_cap_is_disconnected_and_nothing_leaks(served):
    s = served(peer_class=SmallQueue)
    r, w = os.pipe()
    given = []
    while not s.peer.closed:
        given.append(os.dup(r))
        s.peer.send({"pad": "y" * 4000}, [given[-1]])
        assert len(given) < 1000, "the cap never came"
    assert s.closes == 1
    assert not any(is_open(fd) for fd in given), "queued, sent or refused: every fd given is closed"
    late = os.dup(r)
    s.peer.send({"late": True}, [late])
    assert not is_open(late), "a send to a closed peer closes its fds too"
    os.close(r), os.close(w)


def test_a_held_peer_is_taken_from_again_on_release(served):
    s = served(on_frame=lambda peer, body, fds: peer.hold(True))
    s.client.send_bytes(b"".join(encode_frame({"n": n}) for n in range(3)))
    s.pump()
    assert [body["n"] for body, _ in s.frames] == [0] and s.peer.held and not s.peer.reading
    s.peer.hold(False)  # the next frame received is taken, which holds it again
    assert [body["n"] for body, _ in s.frames] == [0, 1] and s.peer.held
    s.peer.hold(False)
    assert [body["n"] for body, _ in s.frames] == [0, 1, 2] and s.peer.held
    s.peer.hold(False)
    s.pump()
    assert len(s.frames) == 3 and not s.peer.held and s.peer.reading, "released, it is read from again"


def test_a_dropped_peer_closes_at_once_when_it_holds_none_of_our_fds(served):
    s = served()
    peer_fd = s.peer.sock.fileno()
    before = open_fds()
    s.park_half_a_frame()
    s.peer.send({"bye": True})  # no fds: nothing of ours in flight
    s.peer.drop()
    assert s.peer.closed and s.peer.dropped and s.closes == 1
    assert open_fds() == before - {peer_fd}, "what it parked is closed with it"
    assert [frame.body for frame in s.client.read()] == [{"bye": True}] and s.client.eof


def test_a_dropped_peer_is_kept_until_it_reads_the_fds_we_sent_it(served):
    s = served()
    r, w = os.pipe()
    s.peer.send({"here": True}, [os.dup(r)])
    s.peer.send({"and": "more"}, [os.dup(w)])
    assert s.peer.unread_fds == 2
    before = open_fds()
    s.park_half_a_frame()
    s.peer.drop()
    assert s.peer.dropped and not s.peer.closed and not s.peer.reading, "its fds are in flight, counted"
    assert s.peer.parked_fds == 0 and open_fds() == before, "what it parked goes at once"
    s.client.send({"op": "PING"})
    s.pump()
    assert s.frames == [] and not s.peer.closed, "a dropped peer is served no more"
    first = read_one_frame(s.client)
    os.close(first.fds[0])
    s.pump()
    assert not s.peer.closed and s.peer.unread_fds == 2, \
        "the kernel tells no count of fds read: until its socket is empty, all sent count"
    second = read_one_frame(s.client)
    os.close(second.fds[0])
    s.run_until(lambda: s.peer.closed, "the close once it read them")
    assert s.closes == 1
    os.close(r), os.close(w)


def read_one_frame(client: Client):
    """One frame, read a byte at a time so that what follows it stays in the socket."""
    while True:
        data, fds = recv_with_fds(client.sock, size=1)
        client.decoder.feed(data, fds)
        frame = client.decoder.next_frame()
        if frame is not None:
            return frame


def test_a_dropped_peer_that_hangs_up_unread_is_closed(served):
    s = served()
    r, w = os.pipe()
    s.peer.send({"here": True}, [os.dup(r)])
    s.peer.drop()
    assert not s.peer.closed
    s.client.sock.close()  # its unread fds die with its socket: not ours to count any more
    s.run_until(lambda: s.peer.closed, "the close on hang-up")
    assert s.closes == 1
    os.close(r), os.close(w)


def test_close_after_flush_sends_everything_then_ends(served):
    s = served()
    for n in range(6):
        s.peer.send({"n": n, "pad": "z" * BIG})
    s.peer.close_after_flush()
    assert not s.peer.closed, "more waits than the socket takes"
    frames = []
    s.run_until(lambda: frames.extend(s.client.read()) or s.client.eof, "the end")
    assert [frame.body["n"] for frame in frames] == list(range(6)) and s.peer.closed and s.closes == 1


def test_an_eof_closes_the_peer_once_and_frees_what_it_parked(served):
    s = served()
    peer_fd = s.peer.sock.fileno()
    before = open_fds()
    s.park_half_a_frame()
    s.client.sock.shutdown(socket.SHUT_WR)
    s.run_until(lambda: s.peer.closed, "the close on EOF")
    s.pump()
    assert s.closes == 1 and s.peer.parked_fds == 0
    assert open_fds() == before - {peer_fd}, "the fd parked with the half frame is closed"


class Recorder(Channel):
    """The least a Channel needs: what reading means (here, keeping the bytes)."""

    def __init__(self, loop: Loop, sock: socket.socket):
        self.received = b""
        self.write_errors: list[OSError] = []
        super().__init__(loop, sock, OutputQueue(1 << 24))

    def send(self, data: bytes, fds=()) -> bool:
        """Queue and send what the socket takes now; True once all is sent."""
        self.output.append(data, fds)
        return self._flush()

    def _readable(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            self.close()
        self.received += data

    def _write_failed(self, exc: OSError) -> None:
        self.write_errors.append(exc)


@pytest.fixture
def channel():
    loop = Loop()
    ours, theirs = socket_pair()
    recorder = Recorder(loop, ours)
    yield recorder, theirs, loop
    recorder.close()
    theirs.close()
    loop.close()


def pump(loop: Loop, rounds: int = 50) -> None:
    for _ in range(rounds):
        loop.run_once(0)


def test_a_channel_reads_only_while_reading_and_closes_on_a_hang_up_meanwhile(channel):
    recorder, theirs, loop = channel
    theirs.sendall(b"one")
    pump(loop)
    assert recorder.received == b"one"
    recorder.set_reading(False)
    theirs.sendall(b"two")
    pump(loop)
    assert recorder.received == b"one", "not reading: the bytes wait in the socket"
    recorder.set_reading(True)
    pump(loop)
    assert recorder.received == b"onetwo"
    recorder.set_reading(False)
    theirs.close()
    pump(loop)
    assert recorder.closed, "a hang-up is heard while not reading"


def test_a_channel_flushes_what_the_socket_did_not_take_when_it_is_writable(channel):
    recorder, theirs, loop = channel
    data = os.urandom(3 << 20)
    assert not recorder.send(data), "more than a socket takes at once"
    theirs.setblocking(False)
    got = bytearray()

    def read_some():
        try:
            got.extend(theirs.recv(1 << 20))
        except BlockingIOError:
            pass
        return len(got) == len(data)

    wait_until(lambda: (loop.run_once(0), read_some())[1], 5, "all the output", interval=0)
    assert bytes(got) == data and not recorder.output and recorder.output.pending == 0


def test_a_failed_write_drops_the_output_and_says_so(channel):
    recorder, theirs, loop = channel
    theirs.close()
    r, w = os.pipe()
    assert recorder.send(b"to no one", [r]), "nothing is left to send"
    assert [exc.errno for exc in recorder.write_errors] == [errno.EPIPE]
    assert not recorder.output and recorder.output.fds == 0 and not is_open(r), "the output is dropped"
    os.close(w)


def test_output_queue_refuses_past_its_cap_and_closes_the_refused_fds():
    queue = OutputQueue(10)
    r, w = os.pipe()
    assert queue.append(b"12345", [r])
    refused = os.dup(w)
    assert not queue.append(b"123456", [refused]) and not is_open(refused)
    assert queue.pending == 5 and queue.fds == 1
    queue.clear()
    assert not is_open(r) and not queue and queue.pending == 0
    os.close(w)


def test_frame_socket_sends_and_receives_and_says_when_the_far_end_is_gone():
    ours, theirs = socket.socketpair()
    with FrameSocket("a socketpair", sock=ours) as client:
        client.send({"op": "PING"})
        send_frame(theirs, {"ok": True})
        frame = client.receive()
        assert frame.body == {"ok": True}
        assert recv_with_fds(theirs)[0] == encode_frame({"op": "PING"})
        theirs.close()
        with pytest.raises(ConnectionError, match="a socketpair closed the connection"):
            client.receive()


def test_listen_unix_is_open_to_every_user_and_does_not_block(tmp_path):
    """(Which socket file it replaces and which not: test_loop.py.)"""
    path = str(tmp_path / "d.sock")
    listener = listen_unix(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666, "who is served is decided by uid, not file mode"
        assert not listener.getblocking()
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()


def test_an_error_reply_is_the_refusal_the_peer_sends(served):
    s = served()
    s.peer.refuse(Error("not-allowed", "you may not", fatal=False))
    assert not s.peer.closed
    s.peer.refuse(Error("gone", "and now you go", fatal=True))
    s.pump()
    assert [frame.body["error"] for frame in s.client.read()] == ["not-allowed", "gone"]
    assert s.peer.closed and s.closes == 1 and s.client.eof


@pytest.mark.parametrize("option", ["SO_PEERPIDFD", "pidfd_open"])
def test_peer_pidfd_is_readable_once_the_process_that_connected_exits_though_its_socket_lives_on(
        tmp_path, monkeypatch, option):
    """The pidfd names the peer's process, not its socket: a child that keeps the socket does
    not put it off. Where the kernel lacks SO_PEERPIDFD (an option it does not know), the
    SO_PEERCRED pid's pidfd_open does the same."""
    if option == "pidfd_open":
        monkeypatch.setattr(peer_module, "SO_PEERPIDFD", 0x7FFF)  # ENOPROTOOPT, as before Linux 6.5
    path = str(tmp_path / "s.sock")
    listener = listen_unix(path)
    script = ("import os, socket, sys\n"
              f"s = socket.socket(socket.AF_UNIX); s.connect({path!r})\n"
              # A child keeps s, until our end closes (not reading stdin: the line is the parent's).
              "if os.fork() == 0:\n    os.close(0); s.recv(1); os._exit(0)\n"
              "sys.stdin.readline()\n")
    connector = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE)
    conn = None
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()
        pid, _, _ = peer_credentials(conn)
        assert pid == connector.pid
        pidfd = peer_pidfd(conn, pid)
        assert select.select([pidfd], [], [], 0)[0] == [], "it lives"
        connector.stdin.write(b"exit\n")
        connector.stdin.flush()
        assert select.select([pidfd], [], [], 10)[0] == [pidfd], "it exited"
        conn.setblocking(False)
        with pytest.raises(BlockingIOError):
            conn.recv(1)  # no EOF: the child keeps the socket open
        os.close(pidfd)
        connector.wait()  # reaped: asked now, there is no pidfd, or one readable at once
        if option == "pidfd_open":
            with pytest.raises(ProcessLookupError):
                peer_pidfd(conn, pid)
        else:
            try:
                late = peer_pidfd(conn, pid)  # newer kernels keep what a reaped peer was
            except ProcessLookupError:
                pass
            else:
                assert select.select([late], [], [], 0)[0] == [late]
                os.close(late)
    finally:
        if conn is not None:
            conn.close()  # the child reads EOF and exits
        connector.kill()
        connector.wait()
        connector.stdin.close()
        listener.close()
