"""Zero loss: nothing chatd read, counted or half-wrote dies with it.

The deterministic tests arm one crash point each (``CHATD_FAULT``, see
chatd/faults.py): chatd dies of ``os.abort()`` exactly there, a new chatd
restores, and every message must arrive exactly once, numbered on. Each also
checks, from the new chatd's restore summary, that bytes really were in
flight at the crash, so that it tests what it says it does.

The fault test streams between 20 pairs while chatd is killed at random (SIGKILL,
SIGSEGV, SIGABRT) 100 times; the same test with the in-flight bytes thrown
away on restore (``--no-replay``) must see loss, so it is known to be able to.
"""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from testkit import soak
from ctl.launch import wait_until
from ctl.probe import LineClient


def restart_with_fault(procs, fault: str):
    """Kill chatd, start the next with ``fault`` armed (it restores first, then serves)."""
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore", env={"CHATD_FAULT": fault})


def expect_abort_and_restore(procs) -> dict:
    """The armed chatd dies of SIGABRT; a clean one restores. Its restore summary."""
    assert procs.chatd.wait(20) == -signal.SIGABRT, procs.logs()
    procs.start_chatd("--restore")
    return procs.control("status")["restore"]


def test_crash_right_after_a_read_loses_none_of_what_was_read(paired):
    procs, a, b = paired
    procs.kill_chatd(signal.SIGKILL)
    a.sock.sendall("".join(f"MSG line {k}\n" for k in range(3000)).encode())
    procs.start_chatd("--restore", env={"CHATD_FAULT": "after-read"}, wait=False)  # reads, dies before handling
    summary = expect_abort_and_restore(procs)
    assert summary["input_replayed"] > 0, "the dead chatd had read some of the 3000 lines"
    assert b.lines(3000) == [f"FROM A {k + 2} line {k}" for k in range(3000)]
    assert b.silent_for(0.2)


def test_crash_after_handling_before_the_commit_handles_it_once(paired):
    procs, a, b = paired
    restart_with_fault(procs, "after-handle")
    a.send("MSG once")
    summary = expect_abort_and_restore(procs)
    assert summary["input_replayed"] == len("MSG once\n")
    assert b.line() == "FROM A 2 once"
    a.send("MSG next")
    assert b.line() == "FROM A 3 next", "n goes on, not repeated"


def test_crash_in_the_middle_of_a_partial_write_finishes_the_line(procs):
    procs.start_holderd()
    procs.start_chatd()
    a = procs.client("A", "B")
    slow = socket.socket()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a reader that takes little
    slow.connect(("127.0.0.1", procs.port))
    b = LineClient.from_socket(slow)
    procs.clients.append(b)
    b.send("NICK B", "PAIR A")
    assert b.lines(3) == ["OK NICK B", "OK PAIR A", "PAIRED A"] and a.line() == "PAIRED B"
    restart_with_fault(procs, "mid-write")
    # More than the kernel buffers between chatd and B hold (megabytes on loopback), so that
    # chatd's socket takes only part of a write; B reads nothing meanwhile. A writes from a
    # thread: chatd stops reading A while B's output waits (backpressure), so A's writes block.
    texts = [f"{k}:" + chr(97 + k % 26) * 60000 for k in range(160)]
    writer = threading.Thread(target=a.send, args=[f"MSG {text}" for text in texts], daemon=True)
    a.sock.settimeout(60)
    writer.start()
    summary = expect_abort_and_restore(procs)
    assert summary["output_resent"] > 0, "the dead chatd had output committed and not sent"
    b.sock.settimeout(30)
    for k, text in enumerate(texts):
        assert b.line() == f"FROM A {k + 1} {text}", f"message {k + 1} of 160"
    writer.join(30)
    assert b.silent_for(0.2)


def test_crash_after_a_commit_sends_nothing_twice(paired):
    procs, a, b = paired
    restart_with_fault(procs, "after-commit")
    a.send("MSG committed")
    assert b.line() == "FROM A 2 committed"
    summary = expect_abort_and_restore(procs)
    assert (summary["input_replayed"], summary["output_resent"]) == (0, 0)
    a.send("MSG after")
    assert b.line() == "FROM A 3 after", "the new chatd sent nothing again"


def test_the_window_between_accept_and_store_is_the_only_loss(paired):
    """A connection accepted but not yet stored dies with chatd: the client sees its
    connection end (the README says how short that window is). Nobody else is harmed."""
    procs, a, b = paired
    restart_with_fault(procs, "after-accept")
    lost = LineClient(procs.port)
    assert procs.chatd.wait(20) == -signal.SIGABRT
    with pytest.raises((EOFError, ConnectionResetError)):
        lost.line()
    lost.close()
    procs.start_chatd("--restore")
    a.send("MSG still here")
    assert b.line() == "FROM A 2 still here"
    procs.client("C")  # and the listener serves newcomers


def test_a_poison_line_is_skipped_after_two_crashes(paired):
    procs, a, b = paired
    restart_with_fault(procs, "poison=boom")
    a.send("MSG boom")
    assert procs.chatd.wait(20) == -signal.SIGABRT
    procs.start_chatd("--restore", env={"CHATD_FAULT": "poison=boom"}, wait=False)  # handles it again: dies
    assert procs.chatd.wait(20) == -signal.SIGABRT
    procs.start_chatd("--restore", env={"CHATD_FAULT": "poison=boom"})  # third time: skipped
    assert a.line() == "ERR crashed-server"
    a.send("MSG fine")
    assert b.line() == "FROM A 2 fine", "the poison line never reached B"
    logs = procs.logs()
    # "MSG boom" begins at offset 26 of A's stream: after "NICK A", "PAIR B" and "MSG warm-up".
    assert "at input offset 26, of a fatal signal of its own (Aborted): 2 crashes there" in logs, logs
    assert "crashed chatd 2 times, and killed or hung a child process that tried it" in logs, logs


def test_two_crashes_on_one_line_that_do_not_come_from_it_skip_nothing(paired):
    """Two chatd in a row crash (SIGABRT, with last words) while handling the same line, but
    not of the line: an armed fault kills each, as a SIGSEGV or SIGABRT sent from outside can
    land there twice (the one serving, then the one taking over, in its restore), and no
    process can tell such a signal from its own crash. The third chatd, which the line does
    not kill, tries it in a child process before it would skip it, and handles it: nothing
    lost. (A SIGKILL counts nothing at all: tests/process/test_deaths.py.)"""
    procs, a, b = paired
    restart_with_fault(procs, "poison=boom")
    a.send("MSG boom")
    assert procs.chatd.wait(20) == -signal.SIGABRT
    procs.start_chatd("--restore", env={"CHATD_FAULT": "poison=boom"}, wait=False)  # dies of it again
    assert procs.chatd.wait(20) == -signal.SIGABRT
    procs.start_chatd("--restore")  # the line does not kill this one
    assert b.line() == "FROM A 2 boom", "the line was lost"
    a.send("MSG after")
    assert b.line() == "FROM A 3 after"
    logs = procs.logs()
    assert "2 crashes there" in logs and "crashed-server" not in logs, logs
    assert "a child process handled it and lived" in logs, logs


def random_kills(procs, *extra: str):
    def crash(rng):
        procs.chatd.send_signal(rng.choice((signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)))
        procs.chatd.wait(20)
        procs.start_chatd("--restore", *extra, wait=False)

    return crash


def test_twenty_pairs_streaming_through_a_hundred_random_kills_lose_nothing(procs):
    procs.start_holderd()
    procs.start_chatd()
    tally = soak.run(procs.port, pairs=20, crashes=100, crash=random_kills(procs))
    print("fault test:", tally.row())
    assert tally.crashes == 100 and tally.sent > 5000
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


def test_the_fault_test_sees_loss_when_what_was_in_flight_is_thrown_away(procs):
    procs.start_holderd()
    procs.start_chatd("--no-replay")
    tally = soak.run(procs.port, pairs=20, crashes=30, crash=random_kills(procs, "--no-replay"))
    print("fault test with --no-replay:", tally.row())
    assert tally.lost + tally.garbled + tally.n_gaps > 0, "the fault test must be able to fail"


def test_output_waiting_at_the_crash_is_sent_even_if_nothing_new_comes(procs):
    """B reads nothing; A's messages fill B's queue until chatd holds A back. chatd is
    killed then: the new one must send B's queued output by itself, though A, held back
    by that very output, brings nothing new."""
    procs.start_holderd()
    procs.start_chatd()
    a, b = procs.pair()
    texts = [f"{k}:" + chr(97 + k % 26) * 60000 for k in range(160)]
    a.sock.settimeout(60)
    writer = threading.Thread(target=a.send, args=[f"MSG {text}" for text in texts], daemon=True)
    writer.start()
    queued = []

    def held_back():  # B's queue has stopped growing: chatd holds A back
        queued.append(next(row["queued"] for row in procs.control("clients")["clients"] if row["nick"] == "B"))
        return len(queued) > 5 and queued[-1] == queued[-5] > 100_000

    wait_until(held_back, 30, "B's output to pile up until chatd holds A back", interval=0.1)
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore")
    assert procs.control("status")["restore"]["output_resent"] > 100_000
    b.sock.settimeout(30)
    for k, text in enumerate(texts):
        assert b.line() == f"FROM A {k + 1} {text}", f"message {k + 1} of 160"
    writer.join(30)


def test_a_little_output_waiting_at_the_crash_is_sent_without_any_nudge(procs):
    """Output queued for a reader, too little to hold anyone back, and nothing new after the
    crash (as with clients that wait for replies before sending more): still sent."""
    procs.start_holderd()
    procs.start_chatd()
    a, b = procs.pair()

    def queued_for_b():
        return next(row["queued"] for row in procs.control("clients")["clients"] if row["nick"] == "B")

    sent = 0
    while queued_for_b() == 0:  # until B's socket takes no more and chatd keeps the rest
        sent += 1
        assert sent < 400, "B's socket never filled up"
        a.send(f"MSG {sent}:" + "w" * 30000)
        time.sleep(0.005)
    assert queued_for_b() < 100_000
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore")
    b.sock.settimeout(10)
    for k in range(1, sent + 1):
        assert b.line() == f"FROM A {k} {k}:" + "w" * 30000, f"message {k} of {sent}"
