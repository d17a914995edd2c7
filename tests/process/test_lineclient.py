"""`chatctl client` as a real process against a real chatd: it ends when the server ends
the connection (BYE, EOF), with stdin still open, a pipe or a terminal, and says how; with a
session (the default) a connection cut in any way (through a proxy of the test's, on loopback)
is taken back: every message shown once, ``n`` contiguous, what was typed while cut sent once."""

import json
import os
import queue
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from ctl.launch import wait_until
from ctl.lineclient import BAD_SESSION_FILE, BYE, LOST, QUIT_WAIT

#: Reconnection fast enough for a test, and a half-open connection given up after 2 s.
QUICK = ["--backoff", "0.05", "--backoff-cap", "0.3", "--retries", "100", "--dead-after", "2"]


class ClientProcess:
    """``python -m ctl.cli client`` with stdin a pipe or a terminal (a pty) that the test keeps open;
    what it prints on stdout and stderr, in one list."""

    def __init__(self, procs, stdin_kind: str, nick: str | None, *extra: str, port: int | None = None,
                 ready: str | None = None):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        if stdin_kind == "tty":
            self._typing_fd, child_stdin = os.openpty()
        else:
            child_stdin, self._typing_fd = os.pipe()
        named = ["--nick", nick] if nick else []
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctl.cli", "client", "--port", str(port or procs.port), *named, *extra],
                stdin=child_stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=procs.env)
        finally:
            os.close(child_stdin)
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        if ready is None and nick:
            ready = f"[{nick}] < OK NICK {nick}"
        if ready:
            self.wait_for(ready)

    def _collect(self) -> None:
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, line: str, count: int = 1, timeout: float = 10) -> None:
        """Until ``line`` was printed ``count`` times (or, if it ends in "…", lines starting so)."""
        def matches(printed: str) -> bool:
            return printed.startswith(line[:-1]) if line.endswith("…") else printed == line

        def seen():
            if sum(map(matches, self.output())) >= count:
                return True
            assert self.proc.poll() is None, f"the client exited ({self.proc.returncode}): {self.output()}"
            return False

        wait_until(seen, timeout, repr(line))

    def count(self, text: str) -> int:
        return sum(text in line for line in self.output())

    def wait_for_count(self, text: str, count: int, timeout: float = 10) -> None:
        """Until ``count`` lines printed have ``text`` in them."""
        def seen():
            if self.count(text) >= count:
                return True
            assert self.proc.poll() is None, f"the client exited ({self.proc.returncode}): {self.output()}"
            return False

        wait_until(seen, timeout, f"{count} lines with {text!r}")

    def type(self, text: str) -> None:
        os.write(self._typing_fd, text.encode() + b"\n")

    def end_input(self) -> None:
        os.close(self._typing_fd)
        self._typing_fd = None

    def exit_status(self) -> int:
        """Its exit status: it must exit by itself, stdin still open and nothing more typed.
        Then all it printed is in :meth:`output`."""
        try:
            status = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client did not exit with its stdin open: {self.output()}")
        self._collector.join(10)
        return status

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        if self._typing_fd is not None:
            os.close(self._typing_fd)


@pytest.fixture
def clients(procs):
    made: list[ClientProcess] = []

    def make(stdin_kind: str, nick: str | None, *extra: str, **options) -> ClientProcess:
        made.append(ClientProcess(procs, stdin_kind, nick, *extra, **options))
        return made[-1]

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize("stdin_kind", ["pipe", "tty"])
def test_client_exits_0_on_bye_after_quit_with_stdin_open(procs, clients, stdin_kind):
    procs.start_holderd()
    procs.start_chatd()
    ann = clients(stdin_kind, "ann")
    ann.type("/quit")
    assert ann.exit_status() == BYE
    assert ann.output()[-1] == "[ann] < BYE"


@pytest.mark.parametrize("stdin_kind", ["pipe", "tty"])
def test_client_exits_0_when_chatctl_drain_says_bye(procs, clients, stdin_kind):
    procs.start_holderd()
    procs.start_chatd()
    ann = clients(stdin_kind, "ann")
    assert procs.control("drain")["drained"] == 1
    assert ann.exit_status() == BYE
    assert ann.output()[-1] == "[ann] < BYE"


@pytest.mark.parametrize("stdin_kind", ["pipe", "tty"])
def test_client_exits_nonzero_on_eof_without_bye(procs, clients, stdin_kind):
    procs.start_chatd("--no-holderd")  # no holder keeps the sockets: they die with chatd
    ann = clients(stdin_kind, "ann", "--no-session")
    bob = clients(stdin_kind, "bob", "--no-session")
    ann.type("/pair bob")
    bob.type("/pair ann")
    bob.wait_for("[bob] < PAIRED ann")
    ann.type("hello")
    bob.wait_for("[bob] #1 FROM ann 1 hello")
    procs.kill_chatd(signal.SIGKILL)
    assert (ann.exit_status(), bob.exit_status()) == (LOST, LOST)
    assert ann.output()[-1] in ("[ann] EOF", "[ann] connection lost: Connection reset by peer")
    assert bob.output()[-1] in ("[bob] EOF", "[bob] connection lost: Connection reset by peer")


def test_client_sends_quit_at_the_end_of_input_and_exits_0_on_bye(procs, clients):
    procs.start_holderd()
    procs.start_chatd()
    ann = clients("pipe", "ann")
    ann.type("/who")
    ann.wait_for("[ann] < END")
    ann.end_input()
    assert ann.exit_status() == BYE
    assert ann.output()[-3:] == ["[ann] < USER ann -", "[ann] < END", "[ann] < BYE"]


def test_client_gives_up_with_3_when_no_bye_follows_quit(procs, clients):
    """chatd dead (its sockets kept in holderd): the QUIT at the end of input is not answered,
    and the client closes after QUIT_WAIT seconds instead of hanging."""
    procs.start_holderd()
    procs.start_chatd()
    ann = clients("pipe", "ann")
    procs.kill_chatd(signal.SIGKILL)
    ann.end_input()
    assert ann.exit_status() == LOST
    assert ann.output()[-1] == f"[ann] no BYE from chatd within {QUIT_WAIT:.0f} s of QUIT: closing"


# -- sessions: a connection cut is taken back --------------------------------------------------
class CuttingProxy:
    """A TCP proxy on loopback in front of chatd's line port, which the test cuts.

    One thread owns every socket (a selector); :meth:`cut` and :meth:`refuse` hand it a request
    and return once it is carried out. Cuts (every connection open at that moment):

    - ``reset``: both sides get a TCP reset (a proxy in front restarted, a NAT forgot);
    - ``server-silent``: the client's side is closed (it reads EOF), chatd's stays open and is
      read and never written (until chatd closes it: a resume replaces it);
    - ``client-silent``: chatd's side is closed, the client's stays open and nothing more goes
      through it either way (a phone that left the Wi-Fi): the client finds out by its silence.

    While refusing, connections accepted are reset at once (the network still down: the client's
    connect succeeds, and its RESUME meets a reset)."""

    CUTS = ("reset", "server-silent", "client-silent")

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.other: dict[socket.socket, socket.socket] = {}  # each side of a link to the other
        self.pending: dict[socket.socket, bytearray] = {}  # what is to be written to a side
        self.silent: set[socket.socket] = set()
        self.refusing = False
        self.requests: queue.Queue = queue.Queue()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def cut(self, how: str) -> int:
        """Cut every connection open now; how many there were."""
        assert how in self.CUTS, how
        return self._ask(how)

    def refuse(self, refusing: bool) -> None:
        self._ask("refuse" if refusing else "accept")

    def _ask(self, what: str):
        done: queue.Queue = queue.Queue()
        self.requests.put((what, done))
        return done.get(timeout=10)

    def close(self) -> None:
        self.stopping = True
        self.thread.join(10)
        for sock in [*self.other, self.listener]:
            sock.close()

    def _run(self) -> None:
        while not self.stopping:
            while not self.requests.empty():
                what, done = self.requests.get()
                done.put(self._carry_out(what))
            for key, events in self.selector.select(0.01):
                sock = key.fileobj
                if sock is self.listener:
                    self._accept()
                elif sock in self.other or sock in self.silent:
                    if events & selectors.EVENT_READ:
                        self._read(sock)
                    if events & selectors.EVENT_WRITE and sock in self.pending:
                        self._flush(sock)

    def _carry_out(self, what: str):
        if what in ("refuse", "accept"):
            self.refusing = what == "refuse"
            return None
        clients = [sock for sock in self.other if self._is_client(sock) and sock not in self.silent]
        for client in clients:
            server = self.other[client]
            if what == "reset":
                self._drop(client, reset=True)
                self._drop(server, reset=True)
            elif what == "server-silent":
                self._drop(client)
                self.silent.add(server)
            else:
                self._drop(server)
                self.silent.add(client)
        return len(clients)

    def _is_client(self, sock: socket.socket) -> bool:
        return sock.getpeername() != self.target

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.refusing:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            return
        server = socket.create_connection(self.target, timeout=5)
        for sock in (client, server):
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ)
            self.pending[sock] = bytearray()
        self.other[client], self.other[server] = server, client

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # its end closed it: the link ends (a silent side was cut already)
            other = self.other.get(sock)
            self._drop(sock)
            if other is not None and other not in self.silent:
                self._drop(other)
            return
        if sock in self.silent or self.other.get(sock) is None or self.other[sock] in self.silent:
            return  # cut: nothing goes through
        target = self.other[sock]
        self.pending[target] += data
        self._flush(target)

    def _flush(self, sock: socket.socket) -> None:
        pending = self.pending[sock]
        try:
            sent = sock.send(pending)
        except BlockingIOError:
            sent = 0
        except OSError:
            return
        del pending[:sent]
        self.selector.modify(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0))

    def _drop(self, sock: socket.socket, reset: bool = False) -> None:
        """Close one side; the other, if still linked, forgets it (and stays, silent or not)."""
        other = self.other.pop(sock, None)
        if other is not None:
            self.other.pop(other, None)
            if other in self.pending and other not in self.silent:
                self.silent.add(other)  # no one to forward to: what comes is thrown away
        self.silent.discard(sock)
        self.pending.pop(sock, None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


@pytest.fixture
def proxy(procs):
    made: list[CuttingProxy] = []

    def make() -> CuttingProxy:
        made.append(CuttingProxy(procs.port))
        return made[-1]

    yield make
    for each in made:
        each.close()


def shown_messages(client: ClientProcess, nick: str) -> list[tuple[int, int, str]]:
    """(#k, n, text) of every message ``client`` showed."""
    shown = []
    for line in client.output():
        if line.startswith(f"[{nick}] #"):
            number, _, sender, n, text = line[len(nick) + 3:].split(" ", 4)
            shown.append((int(number[1:]), int(n), text))
    return shown


def messages_to(peer, count: int) -> list[tuple[int, str]]:
    """The next ``count`` lines ``peer`` (a LineClient) gets, each a FROM: (n, text); then nothing."""
    got = []
    for _ in range(count):
        word, _, n, text = peer.line().split(" ", 3)
        assert word == "FROM", (word, n, text)
        got.append((int(n), text))
    assert peer.silent_for(0.3), "more than expected"
    return got


def test_a_cut_client_resumes_showing_every_message_once_and_sending_what_was_typed_once(procs, clients, proxy):
    """Each way of cutting, while the network stays down a moment (chatd refused) and both sides
    go on: bob (a direct line client) sends, ann types. Then cuts in the middle of a burst."""
    procs.start_holderd()
    procs.start_chatd()
    cutter = proxy()
    bob = procs.client("bob", "ann")
    ann = clients("pipe", "ann", "--pair", "bob", *QUICK, port=cutter.port)
    assert bob.line() == "PAIRED ann"
    ann.wait_for("[ann] session …")
    sent_by_bob, typed_by_ann = [], []

    def bob_sends(count: int, size: int = 0) -> None:
        for _ in range(count):
            sent_by_bob.append(f"b:{len(sent_by_bob) + 1}:" + "b" * size)
            bob.send(f"MSG {sent_by_bob[-1]}")

    def ann_types(count: int, size: int = 0) -> None:
        for _ in range(count):
            typed_by_ann.append(f"a:{len(typed_by_ann) + 1}:" + "a" * size)
            ann.type(typed_by_ann[-1])

    def last_from_bob() -> str:
        return f"[ann] #{len(sent_by_bob)} FROM bob {len(sent_by_bob)} {sent_by_bob[-1]}"

    for round_, how in enumerate(CuttingProxy.CUTS, 1):
        bob_sends(3)
        ann_types(2)
        ann.wait_for(last_from_bob())
        losses = ann.count("connection lost (")
        cutter.refuse(True)
        assert cutter.cut(how) == 1
        bob_sends(3)  # into ann's session while it is away (or into the silent old connection)
        ann_types(2)  # queued while cut; or, half-open, sent into the void and sent again after RESUMED
        if how == "client-silent":
            ann.wait_for("[ann] connection lost (nothing from chatd for 2 s): reconnecting…")
        ann.wait_for_count("connection lost (", losses + 3)  # the cut, then two tries meeting a reset
        cutter.refuse(False)
        ann.wait_for("[ann] resumed local-port=…", count=round_)
    assert ann.count("command(s) chatd had not handled go now") >= 2, \
        "what was typed while cut went on resume (half-open: sent again above the handled count)"

    for round_ in range(len(CuttingProxy.CUTS) + 1, len(CuttingProxy.CUTS) + 4):  # cuts amid traffic both ways
        bob_sends(20)
        ann_types(6)
        assert cutter.cut("reset") == 1
        bob_sends(5)
        ann.wait_for("[ann] resumed local-port=…", count=round_)
    # More than chatd keeps unacknowledged for ann (its 256 KiB output ring) and than ann may send
    # unconfirmed (64 KiB): both go on only while ann says what it has (ACK) and learns the count.
    bob_sends(40, size=8000)
    ann_types(12, size=10000)
    assert cutter.cut("reset") == 1
    bob_sends(2)
    ann_types(2)
    ann.wait_for(last_from_bob(), timeout=20)

    shown = shown_messages(ann, "ann")
    assert [text for _, _, text in shown] == sent_by_bob, "each once, in order"
    assert [n for _, n, _ in shown] == list(range(1, len(sent_by_bob) + 1)), "n contiguous"
    assert [number for number, _, _ in shown] == list(range(1, len(sent_by_bob) + 1))
    assert messages_to(bob, len(typed_by_ann)) == list(enumerate(typed_by_ann, 1)), \
        "what ann typed, each once and in order, n contiguous: bob saw nothing of the cuts"
    assert ann.count("not shown again") == 0, "RESUME named the last message shown: none came twice"
    ann.end_input()
    assert ann.exit_status() == BYE


def test_a_client_says_what_it_has_shown_so_its_peer_is_not_held_back(procs, clients):
    """chatd keeps what it sent a session's client until the client says it has it (ACK), in an
    output ring of 256 KiB; bob sends far more than that to an ann that only reads (no typing,
    no heartbeat): it goes through only if ann acknowledges as it shows (every 16 messages)."""
    procs.start_holderd()
    procs.start_chatd()
    bob = procs.client("bob", "ann")
    ann = clients("pipe", "ann", "--pair", "bob", "--dead-after", "0")
    assert bob.line() == "PAIRED ann"
    ann.wait_for("[ann] session …")
    texts = [f"{k}:" + "x" * 8000 for k in range(1, 101)]
    for text in texts:  # 800 KB: bob's sends would block (and time out) were chatd holding it back
        bob.send(f"MSG {text}")
    ann.wait_for("[ann] #100 FROM bob 100 100:…", timeout=20)
    assert [text for _, _, text in shown_messages(ann, "ann")] == texts


def test_a_session_past_its_grace_falls_back_to_a_new_client(procs, clients, proxy):
    """Cut off longer than chatd's --session-grace: RESUME gets ERR unknown-session, and the client
    goes on as a new one: NICK and PAIR again, what was typed meanwhile sent, n from 1 again."""
    procs.start_holderd()
    procs.start_chatd("--session-grace", "0.5")
    cutter = proxy()
    bob = procs.client("bob", "ann")
    ann = clients("pipe", "ann", "--pair", "bob", *QUICK, port=cutter.port)
    assert bob.line() == "PAIRED ann"
    ann.wait_for("[ann] session …")
    bob.send("MSG one", "MSG two")
    ann.wait_for("[ann] #2 FROM bob 2 two")
    cutter.refuse(True)
    cutter.cut("reset")
    assert bob.line() == "UNPAIRED ann", "the grace ran out: ann's session ended as QUIT would"
    bob.send("PAIR ann")
    assert bob.line() == "OK PAIR ann"
    ann.type("typed while away")
    ann.wait_for_count("connection lost (", 3)  # the cut, then two tries meeting a reset
    cutter.refuse(False)
    ann.wait_for("[ann] chatd no longer has this session (unknown-session…")
    assert bob.lines(2) == ["PAIRED ann", "FROM ann 1 typed while away"], "a new ann, and what it typed, once"
    ann.wait_for("[ann] < PAIRED bob")
    bob.send("MSG three")
    ann.wait_for("[ann] #3 FROM bob 1 three")  # a new session counts from 1: not taken for a repeat
    ann.end_input()
    assert ann.exit_status() == BYE


def test_a_client_started_again_with_its_session_file_takes_the_session_back(procs, clients, tmp_path):
    procs.start_holderd()
    procs.start_chatd()
    path = tmp_path / "ann.session"
    bob = procs.client("bob", "ann")
    first = clients("pipe", "ann", "--pair", "bob", "--session-file", str(path), *QUICK)
    assert bob.line() == "PAIRED ann"
    first.wait_for("[ann] session …")
    assert os.stat(path).st_mode & 0o777 == 0o600
    bob.send("MSG one")
    first.wait_for("[ann] #1 FROM bob 1 one")
    first.type("hi")
    assert bob.line() == "FROM ann 1 hi"
    first.proc.send_signal(signal.SIGKILL)  # no QUIT: the session waits for its grace
    first.exit_status()
    bob.send("MSG two", "MSG three")
    again = clients("pipe", None, "--session-file", str(path), *QUICK, ready="resumed local-port=…")
    again.wait_for("#2 FROM bob 3 three")
    assert [(n, text) for _, n, text in shown_messages_unnamed(again)] == [(2, "two"), (3, "three")], \
        "one is not shown again, two and three once"
    assert "resumed local-port=" in next(line for line in again.output() if "resumed" in line) \
        and ": ann, paired with bob" in next(line for line in again.output() if "resumed" in line)
    again.type("back")
    assert bob.line() == "FROM ann 2 back"
    again.end_input()
    assert again.exit_status() == BYE
    assert path.read_text() == "", "the session ended with BYE: nothing left to take back"


def shown_messages_unnamed(client: ClientProcess) -> list[tuple[int, int, str]]:
    shown = []
    for line in client.output():
        if line.startswith("#"):
            number, _, sender, n, text = line.split(" ", 4)
            shown.append((int(number[1:]), int(n), text))
    return shown


def test_a_session_file_with_a_wrong_token_starts_a_new_client(procs, clients, tmp_path):
    procs.start_holderd()
    procs.start_chatd()
    path = tmp_path / "ann.session"
    path.write_text(json.dumps({"token": "0" * 32, "last_n": 7, "numbered": 2, "written": 1,
                                "commands": [[2, "MSG never handled\n"]], "nick": "ann", "target": "bob"}))
    path.chmod(0o600)
    bob = procs.client("bob", "ann")
    ann = clients("pipe", "ann", "--pair", "bob", "--session-file", str(path), *QUICK)
    ann.wait_for("[ann] chatd no longer has this session (unknown-session…")
    assert bob.line() == "PAIRED ann"
    ann.wait_for("[ann] session …")

    def saved_token():
        try:
            return json.loads(path.read_text())["token"]
        except ValueError:  # caught between the client's two writes
            return None

    wait_until(lambda: saved_token() not in (None, "0" * 32), 10, "the new session's token kept instead")
    assert any("1 command(s) sent before were not confirmed" in line for line in ann.output())
    bob.send("MSG one")
    ann.wait_for("[ann] #1 FROM bob 1 one")


def test_a_session_file_others_may_read_is_refused(procs, clients, tmp_path):
    procs.start_holderd()
    procs.start_chatd()
    path = tmp_path / "ann.session"
    path.write_text("")
    path.chmod(0o644)
    ann = clients("pipe", "ann", "--session-file", str(path), ready="")
    assert ann.exit_status() == BAD_SESSION_FILE
    assert f"chmod 600 {path}" in ann.output()[-1]


def test_a_client_gives_up_after_its_retries_with_chatd_gone_for_good(procs, clients):
    procs.start_chatd("--no-holderd")  # no holder keeps the sockets (nor the sessions): gone with chatd
    ann = clients("pipe", "ann", "--retries", "3", "--backoff", "0.05", "--backoff-cap", "0.1")
    ann.wait_for("[ann] session …")
    procs.kill_chatd(signal.SIGKILL)
    assert ann.exit_status() == LOST
    output = ann.output()
    assert sum("reconnecting… (try" in line for line in output) == 3
    assert "gave up after 3 tries to take the session back from chatd" in output[-1]
