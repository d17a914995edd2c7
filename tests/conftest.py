"""Shared by every test: real holderd and chatd processes on loopback (the ``procs``
fixture), cleaned up always; and each phase's report, so fixtures can tell a failure."""

from __future__ import annotations

import pytest

from ctl.launch import Launcher
from ctl.probe import LineClient
from helpers import line_client


class Processes(Launcher):
    """The launcher of the demo, plus line clients that are closed with it."""

    def __init__(self, directory):
        super().__init__(str(directory))
        self.clients: list[LineClient] = []

    def client(self, nick: str | None = None, pair: str | None = None) -> LineClient:
        client = line_client(self.port, nick, pair)
        self.clients.append(client)
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

    def close(self) -> None:
        for client in self.clients:
            client.close()
        super().close()


@pytest.fixture
def paired(procs):
    """holderd, chatd and a pair A-B that has chatted once, ready for a crash."""
    procs.start_holderd()
    procs.start_chatd()
    a, b = procs.pair()
    a.send("MSG warm-up")
    assert b.line() == "FROM A 1 warm-up"
    return procs, a, b


@pytest.fixture
def procs(tmp_path, request):
    processes = Processes(tmp_path)
    yield processes
    processes.close()
    if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
        print(processes.logs())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
