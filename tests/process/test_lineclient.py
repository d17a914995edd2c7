"""`chatctl client` as a real process against a real chatd: it ends when the server ends
the connection (BYE, EOF), with stdin still open, a pipe or a terminal, and says how."""

import os
import signal
import subprocess
import sys
import threading

import pytest

from ctl.launch import wait_until
from ctl.lineclient import BYE, LOST, QUIT_WAIT


class ClientProcess:
    """``python -m ctl.cli client`` with stdin a pipe or a terminal (a pty) that the test keeps open."""

    def __init__(self, procs, stdin_kind: str, nick: str):
        self.lines: list[str] = []
        self._lock = threading.Lock()
        if stdin_kind == "tty":
            self._typing_fd, child_stdin = os.openpty()
        else:
            child_stdin, self._typing_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctl.cli", "client", "--port", str(procs.port), "--nick", nick],
                stdin=child_stdin, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=procs.env)
        finally:
            os.close(child_stdin)
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        self.wait_for(f"[{nick}] < OK NICK {nick}")

    def _collect(self) -> None:
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def output(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, line: str) -> None:
        def seen():
            if line in self.output():
                return True
            assert self.proc.poll() is None, f"the client exited ({self.proc.returncode}): {self.output()}"
            return False

        wait_until(seen, 10, repr(line))

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

    def make(stdin_kind: str, nick: str) -> ClientProcess:
        made.append(ClientProcess(procs, stdin_kind, nick))
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
    ann = clients(stdin_kind, "ann")
    bob = clients(stdin_kind, "bob")
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
