"""Process fixtures: real holderd and chatd processes on loopback, cleaned up always."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from ctl import control
from ctl.probe import LineClient
from ctl.story import free_port, read_logs, wait_for_answer
from holderd.client import HolderClient, HolderError


class Processes:
    """Starts holderd and chatd in a private directory; kills whatever is left at the end."""

    def __init__(self, directory):
        self.directory = str(directory)
        self.holder_socket = os.path.join(self.directory, "holderd.sock")
        self.control_socket = os.path.join(self.directory, "control.sock")
        self.port = free_port()
        self.env = {**os.environ, "HOLDERD_SOCKET": self.holder_socket, "CHATD_CONTROL": self.control_socket}
        self.started: list[subprocess.Popen] = []
        self.clients: list[LineClient] = []
        self.holderd = None
        self.chatd = None

    def spawn(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(os.path.join(self.directory, f"{name}-{len(self.started)}.log"), "w")
        with log:
            proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        self.started.append(proc)
        return proc

    def start_holderd(self, *extra: str) -> subprocess.Popen:
        self.holderd = self.spawn("holderd", "holderd.daemon", "--socket", self.holder_socket, *extra)
        wait_for_answer(self.holderd, HolderClient(self.holder_socket, timeout=1).ping, HolderError, 10, "holderd")
        return self.holderd

    def start_chatd(self, *extra: str, wait_ready: bool = True) -> subprocess.Popen:
        self.chatd = self.spawn(
            "chatd", "chatd.server", "--port", str(self.port), "--control", self.control_socket,
            "--holder", self.holder_socket, *extra,
        )
        if wait_ready:
            self.wait_chatd()
        return self.chatd

    def wait_chatd(self) -> dict:
        return wait_for_answer(self.chatd, lambda: self.control("status"), control.ControlError, 15, "chatd")

    def control(self, op: str) -> dict:
        return control.call(op, self.control_socket)

    def client(self, nick: str | None = None, pair: str | None = None) -> LineClient:
        client = LineClient(self.port)
        self.clients.append(client)
        if nick:
            client.send(f"NICK {nick}")
            assert client.line() == f"OK NICK {nick}"
        if pair:
            client.send(f"PAIR {pair}")
            assert client.line() == f"OK PAIR {pair}"
        return client

    def pair(self, a: str = "A", b: str = "B") -> tuple[LineClient, LineClient]:
        first = self.client(a, b)
        second = self.client(b)
        second.send(f"PAIR {a}")
        assert second.lines(2) == [f"OK PAIR {a}", f"PAIRED {a}"]
        assert first.line() == f"PAIRED {b}"
        return first, second

    def kill_chatd(self, sig: int) -> None:
        self.chatd.send_signal(sig)
        assert self.chatd.wait(10) == -sig

    def logs(self) -> str:
        return read_logs(self.directory)

    def cleanup(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.started:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(tmp_path, request):
    processes = Processes(tmp_path)
    yield processes
    processes.cleanup()
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(processes.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
