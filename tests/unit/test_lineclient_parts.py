"""`chatctl client`'s pure parts: the backoff, which lines chatd counts, the session file."""

import json
import os
import random

import pytest

from chatd.protocols.line import parse_line
from chatd.room import SESSION_COMMANDS
from ctl.lineclient import SESSION_VERBS, SessionFile, SessionFileError, backoff_delay, to_wire, verb_of


def test_the_backoff_is_full_jitter_under_a_cap_applied_before_it():
    rng = random.Random(1)
    delays = [[backoff_delay(attempt, 1.0, 15.0, rng=rng) for _ in range(2000)] for attempt in range(8)]
    for attempt, tries in enumerate(delays):
        bound = min(15.0, 2.0 ** attempt)
        assert all(0 <= delay <= bound for delay in tries)
        # full jitter: spread over the whole range, not bunched near the bound (mean about half)
        assert 0.4 * bound < sum(tries) / len(tries) < 0.6 * bound
        assert min(tries) < 0.05 * bound
    assert backoff_delay(10_000, 1.0, 15.0, rng=rng) <= 15.0, "a huge attempt does not overflow"


def test_busy_seconds_are_a_floor():
    rng = random.Random(2)
    assert all(backoff_delay(0, 1.0, 15.0, floor=3.0, rng=rng) == 3.0 for _ in range(100)), \
        "the first try's jitter is at most 1 s: chatd's 3 s win"
    assert all(backoff_delay(6, 1.0, 15.0, floor=3.0, rng=rng) >= 3.0 for _ in range(100))


@pytest.mark.parametrize("typed", ["hello", "/who", "/pair bob", "/session", "/Ack 3", "/ack x", "/resume t 1",
                                   "/ſession", "/quit now", "/", ""])
def test_the_client_counts_as_chatd_does(typed):
    """Every line chatd would read as a session command (which it does not count) is one the client
    keeps to itself while it has a session, so the client's numbers are chatd's count."""
    wire = to_wire(typed).encode("utf-8", "surrogateescape")
    if isinstance(parse_line(wire), SESSION_COMMANDS):
        assert verb_of(wire) in SESSION_VERBS


def test_a_session_file_is_0600_and_survives_a_kill_between_its_two_writes(tmp_path):
    path = tmp_path / "s"
    store = SessionFile(str(path))
    assert store.load() is None
    assert os.stat(path).st_mode & 0o777 == 0o600
    long_state = {"token": "t" * 32, "last_n": 5, "numbered": 9, "written": 1,
                  "commands": [[9, "MSG " + "x" * 500 + "\n"]], "nick": "ann", "target": "bob"}
    store.save(long_state)
    short = json.dumps({**long_state, "last_n": 6, "commands": []}).encode()
    os.pwrite(store.fd, short, 0)  # killed before the file was cut to the new length
    state = store.load()
    assert (state["last_n"], state["commands"]) == (6, [])
    store.save(None)
    assert path.read_text() == "" and store.load() is None
    store.close()


def test_a_session_file_in_use_or_readable_by_others_is_refused(tmp_path):
    path = tmp_path / "s"
    first = SessionFile(str(path))
    with pytest.raises(SessionFileError, match="another chatctl client uses"):
        SessionFile(str(path))
    first.close()
    path.chmod(0o640)
    with pytest.raises(SessionFileError, match="chmod 600"):
        SessionFile(str(path))
    path.chmod(0o600)
    path.write_text("not json")
    with pytest.raises(SessionFileError, match="remove it to start a new session"):
        SessionFile(str(path)).load()
