"""Which deaths count against the command chatd was handling: kills from outside never drop it.

chatd is made to stop (SIGSTOP) or hang in the middle of handling one message
(``CHATD_FAULT=stall=TEXT``, ``hang=TEXT``: chatd/faults.py), then killed from
outside as the world kills it: SIGKILL (``kill -9``, the OOM killer), or
SIGQUIT with a SIGCONT (what systemd's watchdog sends, units/chatd@.service).
Each restarted chatd is armed again, so it stops or hangs again in its restore,
on the same command, more times than any count would allow. The message must
then arrive exactly once, numbered on, and nothing be skipped; while a message
that really hangs chatd is skipped after one watchdog kill (a child process
tried it, and hung too), and chatd goes on. The poison that crashes chatd is
tests/process/test_zero_loss.py's.
"""

from __future__ import annotations

import os
import signal

import pytest

from chatd.journal import MARKER_OFFSET
from chatd.lastwords import WATCHDOG_SIGNAL
from chatd.server import SKIP_AFTER_DEATHS
from ctl.launch import wait_until
from holderd.client import HolderClient

KILLS = SKIP_AFTER_DEATHS + 1


def stopped(proc) -> bool:
    with open(f"/proc/{proc.pid}/stat", "rb") as stat:
        return stat.read().rsplit(b")", 1)[1].split()[0] == b"T"


def handling_a_command(procs) -> bool:
    """The journal holderd keeps says a command is being handled (its marker is set)."""
    with HolderClient(procs.holder_socket) as holder:
        items = holder.retrieve("chatd/state")
    try:
        return bool(items) and os.pread(items[0].fd, 1, MARKER_OFFSET) == b"\x01"
    finally:
        for item in items:
            os.close(item.fd)


def kill_from_outside(proc, how: str) -> None:
    if how == "SIGKILL":
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    else:  # as systemd's watchdog: its signal, then SIGCONT (a stopped process dies of it at once)
        proc.send_signal(WATCHDOG_SIGNAL)
        proc.send_signal(signal.SIGCONT)
        assert proc.wait(10) == -WATCHDOG_SIGNAL


@pytest.mark.parametrize("how", ["SIGKILL", "watchdog"])
def test_a_command_chatd_is_killed_in_again_and_again_is_handled_once(paired, how):
    """Killed from outside while handling the same message, more times than the crash-loop guard
    allows crashes: the message is never skipped; the first chatd the world leaves alone sends
    it, once."""
    procs, a, b = paired
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore", env={"CHATD_FAULT": "stall=slow"})
    a.send("MSG slow 2")
    for kill in range(KILLS):
        wait_until(lambda: stopped(procs.chatd), 20, "chatd to stop while handling the message")
        kill_from_outside(procs.chatd, how)
        # The next one handles the message again in its restore, and stops there again; the last one is let be.
        armed = {"CHATD_FAULT": "stall=slow"} if kill < KILLS - 1 else None
        procs.start_chatd("--restore", env=armed, wait=armed is None)
    assert b.line() == "FROM A 2 slow 2", "the message was lost"
    a.send("MSG after")
    assert b.line() == "FROM A 3 after"
    assert a.silent_for(0.2) and b.silent_for(0.2), "an answer or a message came twice"
    logs = procs.logs()
    assert "crashed-server" not in logs and "of a fatal signal of its own" not in logs, logs
    if how == "SIGKILL":
        assert logs.count("with no last words: SIGKILL from outside") == KILLS, logs
    else:  # each successor tried it in a child first, which lived: handled
        assert logs.count("of the watchdog's SIGQUIT (it had stopped answering there): not counted") == KILLS, logs
        assert logs.count("hung chatd, but a child process handled it and lived") == KILLS, logs


def test_a_command_that_hangs_chatd_is_skipped_after_one_watchdog_kill_and_chatd_goes_on(paired):
    procs, a, b = paired
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore", env={"CHATD_FAULT": "hang=slow"})
    a.send("MSG slow")
    wait_until(lambda: handling_a_command(procs), 20, "chatd to hang handling the message")
    kill_from_outside(procs.chatd, "watchdog")
    # Armed too: the message hangs it again, and the child that tries it first (for a second).
    procs.start_chatd("--restore", env={"CHATD_FAULT": "hang=slow"})
    assert a.line() == "ERR crashed-server"
    a.send("MSG fine")
    assert b.line() == "FROM A 2 fine", "the hanging message reached B, or chatd did not go on"
    logs = procs.logs()
    assert "hung chatd, and killed or hung a child process that tried it" in logs, logs
    assert "the chatd before this one died of the watchdog's SIGQUIT while handling a command" in logs, logs
    assert procs.control("status")["role"] == "serving"
