"""chatd.trial: a command tried in a forked child; only a child that dies (or hangs) makes it a poison."""

from __future__ import annotations

import os
import time

from chatd import trial


def test_a_child_that_handles_and_returns_survives():
    assert trial.survives(lambda: sum(range(1000)))


def test_an_exception_is_not_a_death():  # the server answers ERR internal-error for those
    assert trial.survives(lambda: 1 / 0)


def test_a_child_killed_by_the_command_does_not_survive():
    assert not trial.survives(os.abort)


def test_a_child_that_hangs_is_killed_and_does_not_survive():
    began = time.monotonic()
    assert not trial.survives(lambda: time.sleep(30), timeout=0.2)
    assert time.monotonic() - began < 5


def test_the_child_changes_nothing_in_the_parent():
    state = {"handled": 0}

    def handle():
        state["handled"] += 1

    assert trial.survives(handle)
    assert state == {"handled": 0}
