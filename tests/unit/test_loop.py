"""The event loop's timers and descriptors, with a clock the test moves."""

import errno
import logging
import os
import signal
import socket
import threading
import time

import pytest

from fdkeep.loop import IN, Loop, stop_on_signals
from fdkeep.peer import listen_unix


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_timers_fire_in_order_once_due_and_repeat_until_cancelled():
    clock = Clock()
    loop = Loop(clock)
    fired = []
    loop.call_later(2, lambda: fired.append("later"))
    every = loop.call_every(1, lambda: fired.append("every"))
    loop.run_once(0)
    assert fired == []
    clock.now += 1
    loop.run_once(0)
    assert fired == ["every"]
    clock.now += 1
    loop.run_once(0)
    assert fired == ["every", "every", "later"] or fired == ["every", "later", "every"]
    every.cancel()
    clock.now += 5
    loop.run_once(0)
    assert fired.count("every") == 2, "a cancelled timer does not fire"
    loop.close()


def test_a_late_repeating_timer_does_not_fire_a_burst():
    clock = Clock()
    loop = Loop(clock)
    fired = []
    loop.call_every(1, lambda: fired.append(clock.now), first=0)
    loop.run_once(0)
    clock.now += 10  # the loop was busy for ten intervals
    loop.run_once(0)
    loop.run_once(0)
    assert len(fired) == 2
    loop.close()


def test_the_wait_ends_at_the_next_timer():
    loop = Loop()
    fired = []
    loop.call_later(0.05, lambda: fired.append(1))
    loop.run_once()  # no descriptor: only the timer can end this wait
    assert fired == [1]
    loop.close()


def test_descriptor_callbacks_get_their_mask():
    loop = Loop()
    r, w = os.pipe()
    seen = []
    loop.add(r, IN, seen.append)
    os.write(w, b"x")
    loop.run_once(1)
    assert seen and seen[0] & IN
    loop.remove(r)
    assert not loop.watching(r)
    os.close(r), os.close(w)
    loop.close()


def test_a_signal_handler_wakes_the_loop_blocked_in_epoll_and_its_callback_runs_in_the_turn():
    loop = Loop()
    ran, timed_out = [], []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: loop.call_from_signal_handler(
        lambda: ran.append(time.monotonic())))
    try:
        loop.call_later(10, lambda: timed_out.append(True))  # the wait's end if nothing woke the loop
        sent_at = time.monotonic()
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        loop.run_once()
        assert ran and not timed_out, "Python retried the epoll: the handler's request was not seen"
        assert ran[0] - sent_at < 5
        loop.run_once(0)
        assert len(ran) == 1, "one request, one call"
    finally:
        signal.signal(signal.SIGUSR1, previous)
        loop.close()


def test_stop_on_signals_stops_unless_asked_to_leave_the_signal_to_the_loop():
    taken = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_on_signals(logging.getLogger("test"), unless=lambda signum: taken.append(signum) or
                        signum is signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # taken: no SystemExit
        with pytest.raises(SystemExit) as stopped:
            os.kill(os.getpid(), signal.SIGINT)
        assert stopped.value.code == 0
        assert taken == [signal.SIGTERM, signal.SIGINT]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_listen_unix_replaces_a_dead_process_socket_but_never_a_live_one(tmp_path):
    path = str(tmp_path / "control.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()  # as a killed process leaves it: the file stays, nobody listens
    live = listen_unix(path)
    try:
        with pytest.raises(OSError) as refused:
            listen_unix(path)
        assert refused.value.errno == errno.EADDRINUSE and path in str(refused.value)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)  # still the first one's
        assert live.accept()
    finally:
        live.close()
