"""chatd.lastwords: a process's own fatal signals, and the watchdog's, leave words; a SIGKILL leaves none.

Each case dies for real, in a forked child that listens into the file as chatd does once it serves.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time

import pytest

from chatd import faults, lastwords, trial
from chatd.lastwords import CRASHED, HUNG, KILLED, LastWords, death_of


def words_of_a_child(die, then=None) -> tuple[int, bytes]:
    """Fork a child that listens into a new file and calls ``die()``; the parent may then
    ``then(pid)`` (kill it). The child's exit code, and the words a successor takes."""
    words = LastWords.create()
    pid = os.fork()
    if pid == 0:
        try:
            words.listen()
            die()
        finally:
            os._exit(0)
    try:
        if then is not None:
            time.sleep(0.2)  # let it listen first
            then(pid)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), words.take()
    finally:
        words.close()


def segfault():
    ctypes.string_at(0)


@pytest.mark.parametrize("die, code, how", [
    (os.abort, -signal.SIGABRT, "Aborted"),
    (segfault, -signal.SIGSEGV, "Segmentation fault"),
])
def test_a_fatal_signal_the_process_raised_is_a_crash(die, code, how):
    exit_code, words = words_of_a_child(die)
    assert exit_code == code
    assert death_of(words) == (CRASHED, f"a fatal signal of its own ({how})")
    assert b"most recent call first" in words  # where it was: the successor logs it


def test_the_watchdogs_signal_is_a_hang_and_still_kills():
    def watchdog(pid):  # as systemd's watchdog: its signal, with a SIGCONT
        os.kill(pid, lastwords.WATCHDOG_SIGNAL)
        os.kill(pid, signal.SIGCONT)

    exit_code, words = words_of_a_child(lambda: time.sleep(30), then=watchdog)
    assert exit_code == -lastwords.WATCHDOG_SIGNAL
    assert death_of(words)[0] == HUNG and b"most recent call first" in words


def test_a_sigkill_from_outside_leaves_no_words():
    exit_code, words = words_of_a_child(lambda: time.sleep(30), then=lambda pid: os.kill(pid, signal.SIGKILL))
    assert exit_code == -signal.SIGKILL
    assert words == b"" and death_of(words)[0] == KILLED


def test_the_words_are_taken_once_and_the_file_written_from_its_start_again():
    words = LastWords.create()
    try:
        os.write(words.fd, b"Fatal Python error: Aborted\n\nold stack\n")
        assert death_of(words.take())[0] == CRASHED
        assert words.take() == b""
        os.write(words.fd, b"Current thread 0x1 (most recent call first):\n")  # the next process's words
        assert os.pread(words.fd, 100, 0).startswith(b"Current thread")
        assert death_of(words.take())[0] == HUNG
    finally:
        words.close()


def test_a_trials_child_dies_without_words():
    """The child a command is tried in may die of it: its death is its parent's to judge."""
    words = LastWords.create()
    pid = os.fork()
    if pid == 0:
        try:
            words.listen()
            os._exit(0 if not trial.survives(os.abort) else 1)
        finally:
            os._exit(2)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert words.take() == b""
    finally:
        words.close()


def test_the_message_fault_points_parse():
    assert faults.parse("hang=slow") == ("hang", 1, "slow")
    assert faults.parse("stall=slow") == ("stall", 1, "slow")
    for bad in ("hang", "stall", "after-read=x"):
        with pytest.raises(Exception, match="CHATD_FAULT"):
            faults.parse(bad)


def test_a_stall_acts_in_the_process_that_armed_it_only():
    """A trial's child is never stalled (a stall is the world's doing): it handles the command and lives."""
    pid = os.fork()
    if pid == 0:  # a process of its own, so that arming touches nothing of the test's
        try:
            faults.arm("stall=slow")
            survived = trial.survives(lambda: faults.handling_message("a slow one"), timeout=2)
            os._exit(0 if survived else 1)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_hang_hangs_a_trials_child_too():
    pid = os.fork()
    if pid == 0:
        try:
            faults.arm("hang=slow")
            survived = trial.survives(lambda: faults.handling_message("a slow one"), timeout=0.3)
            os._exit(1 if survived else 0)
        finally:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
