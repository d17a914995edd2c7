"""chatd.bus.mailbox: commands and results cross between two threads, none lost, a burst woken once;
and the Bus over it: importing it loads no asyncio, closing it ends its thread.

The first tests take one side at a time, so what they check is exact (how many
wake-ups, what the eventfd holds). The last runs both sides as the bus runs
them: chatd's side waits only on the eventfd and the bus side (an asyncio loop
on a thread of its own) runs only when woken, so a lost wake-up on either side
shows as a stall, caught by a deadline.
"""

from __future__ import annotations

import asyncio
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from chatd.bus import Bus, BusError
from chatd.bus.mailbox import Mailbox
from fdkeep.errors import Error


class Wakes:
    """A bus thread's ``wake`` that only counts (the test plays the bus thread itself)."""

    def __init__(self):
        self.count = 0

    def __call__(self):
        self.count += 1


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.fixture
def mailbox():
    box = Mailbox(backlog_of=int)
    yield box
    box.close_eventfd()


def test_commands_posted_before_the_bus_thread_opens_wait_for_its_first_take(mailbox):
    mailbox.post_command("a")
    mailbox.post_command("b")  # nothing to wake yet, and nothing fails
    wakes = Wakes()
    assert mailbox.open(wakes) is True
    assert mailbox.take_commands() == ["a", "b"]
    assert wakes.count == 0


def test_a_burst_of_commands_wakes_the_bus_thread_once(mailbox):
    wakes = Wakes()
    mailbox.open(wakes)
    assert mailbox.take_commands() == []
    for k in range(100):
        mailbox.post_command(k)
    assert wakes.count == 1
    assert mailbox.take_commands() == list(range(100))
    mailbox.post_command("after the take")
    assert wakes.count == 2, "a command posted after a take wakes the bus thread again"
    assert mailbox.take_commands() == ["after the take"]


def test_a_burst_of_results_makes_the_eventfd_readable_once(mailbox):
    assert not readable(mailbox.fileno())
    for k in range(50):
        mailbox.post_result(f"r{k}")
    assert readable(mailbox.fileno())
    assert os.eventfd_read(mailbox.fileno()) == 1, "one write for the whole burst"
    assert mailbox.take_results() == [f"r{k}" for k in range(50)]
    assert not readable(mailbox.fileno()) and mailbox.take_results() == []
    mailbox.post_result("later")
    assert readable(mailbox.fileno()), "a result posted after a take makes the eventfd readable again"
    assert mailbox.take_results() == ["later"]
    assert not readable(mailbox.fileno())


def test_a_result_posted_while_chatd_takes_is_taken_or_signalled(mailbox, monkeypatch):
    """The window the order "read the eventfd, clear the flag, drain" closes: a result posted
    while chatd's thread takes is either in this take or makes the eventfd readable again."""
    mailbox.post_result("first")
    real_read = os.eventfd_read

    def read_then_race(fd):
        value = real_read(fd)
        mailbox.post_result("during the take")  # the bus thread, right after chatd read the eventfd
        return value

    monkeypatch.setattr(os, "eventfd_read", read_then_race)
    taken = mailbox.take_results()
    monkeypatch.undo()
    assert taken == ["first", "during the take"] or (taken == ["first"] and readable(mailbox.fileno()))



def test_the_backlog_counts_the_results_of_its_kind_posted_and_not_taken(mailbox):
    for result in [1, "a", 2, 3, b"b"]:
        mailbox.post_result(result)
    assert mailbox.backlog == 3
    mailbox.take_results()
    assert mailbox.backlog == 0
    mailbox.post_result(4)
    assert mailbox.backlog == 1


def test_closed_before_the_bus_thread_opens_it_tells_the_thread_to_end(mailbox):
    wakes = Wakes()
    mailbox.close()
    assert mailbox.open(wakes) is False
    assert wakes.count == 0


def test_closing_wakes_the_bus_thread_even_with_a_wake_up_on_its_way(mailbox):
    wakes = Wakes()
    mailbox.open(wakes)
    mailbox.close()
    assert mailbox.closed and wakes.count == 1


def test_closing_after_the_bus_thread_ended_is_quiet(mailbox):
    def loop_closed():
        raise RuntimeError("Event loop is closed")

    mailbox.open(loop_closed)
    mailbox.close()
    assert mailbox.closed


class EchoThread:
    """The bus thread's part, as the bus plays it: an asyncio loop on its own thread that runs
    only when woken through the mailbox, and answers every command with a result."""

    def __init__(self, mailbox: Mailbox):
        self.mailbox = mailbox
        self.wakes = 0
        self.thread = threading.Thread(target=self._run, name="mailbox-echo", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        stopping = asyncio.Event()

        def wake():
            self.wakes += 1  # on chatd's thread, but only the test reads it, at the end
            loop.call_soon_threadsafe(take)

        def take():
            for command in self.mailbox.take_commands():
                # Answered a little later, so that results are posted while chatd's thread drains.
                loop.call_soon(self.mailbox.post_result, ("echo", command))
            if self.mailbox.closed:
                stopping.set()

        try:
            if self.mailbox.open(wake):
                loop.call_soon(take)  # what was posted before the thread ran
                loop.run_until_complete(stopping.wait())
        finally:
            loop.close()


def test_two_threads_pass_every_command_and_result_in_order_without_a_lost_wake_up():
    box = Mailbox()
    echo = EchoThread(box)
    rng = random.Random(22)
    total = 20_000
    received: list = []
    sent = 0
    poll = select.poll()
    poll.register(box.fileno(), select.POLLIN)
    try:
        while sent < total:
            burst = min(rng.choice([1, 1, 2, 7, 50, 300]), total - sent)
            for _ in range(burst):
                box.post_command(sent)
                sent += 1
            if sent < total and rng.random() < 0.5:  # carry on posting, taking only what is there
                if poll.poll(0):
                    received.extend(box.take_results())
                continue
            # Wait for every answer, on the eventfd only, as chatd's loop does: a command or a
            # result whose wake-up was lost would never come.
            give_up = time.monotonic() + 10
            while len(received) < sent:
                assert time.monotonic() < give_up, f"stalled: {len(received)} of {sent} sent came back"
                if poll.poll(100):
                    received.extend(box.take_results())
        assert received == [("echo", k) for k in range(total)]
        assert 1 <= echo.wakes < total, "bursts share wake-ups"
    finally:
        box.close()
        echo.thread.join(10)
        box.close_eventfd()
    assert not echo.thread.is_alive(), "close() ends the bus thread"


def test_importing_chatd_bus_loads_neither_asyncio_nor_nats_py():
    """The bus thread imports them: chatd's start-up (a restore after a crash) does not wait for them."""
    code = ("import sys, chatd.bus, chatd.cluster; "
            "print(sorted(m for m in ('asyncio', 'nats', 'chatd.bus.engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_bus_closed_while_its_thread_still_tries_to_connect_ends_that_thread():
    """The real bus thread, through the mailbox: it reports what fails, and close() ends it."""
    nothing_listens = socket.socket()
    nothing_listens.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = nothing_listens.getsockname()[1]
    bus = Bus([f"nats://127.0.0.1:{port}"], "unit-host")
    try:
        assert bus.status()["last_delivered"] == 0 and bus.status()["hosts_alive"] == []
        bus.start(41)
        assert bus.status()["last_delivered"] == 41
        bus.publish("t", "unit-host", "bob", "id-1", b"waits for a server")
        assert bus.status()["publishes_pending"] == 1
        poll = select.poll()
        poll.register(bus.fileno(), select.POLLIN)
        errors = []
        give_up = time.monotonic() + 20
        while not any(error.code == "unreachable" for error in errors):
            assert time.monotonic() < give_up, f"no 'unreachable' error came; got {errors}"
            if poll.poll(100):
                errors += [result for result in bus.results() if isinstance(result, BusError)]
        unreachable = next(error for error in errors if error.code == "unreachable")
        assert f"127.0.0.1:{port}" in unreachable.message and not unreachable.fatal
        assert [thread for thread in threading.enumerate() if thread.name == "chatd-bus-unit-host"]
    finally:
        bus.close()
        nothing_listens.close()
    assert not [thread for thread in threading.enumerate() if thread.name == "chatd-bus-unit-host"], \
        "close() ended the bus thread"
    with pytest.raises(Error) as caught:
        bus.publish("t", "unit-host", "bob", "id-2", b"x")
    assert caught.value.code == "closed"
