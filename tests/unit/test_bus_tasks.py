"""chatd.bus.tasks: the one retry loop of the bus thread (its pauses, its gate, cancelling) and
the lanes that run one job at a time per key."""

from __future__ import annotations

import asyncio

import pytest

from chatd.bus import tasks
from chatd.bus.tasks import RETRY_FIRST, RETRY_LONGEST, Lanes, retry


@pytest.fixture
def pauses(monkeypatch):
    """The pauses retry() takes, in order (each taken as a yield to the loop, not a wait)."""
    taken: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay):
        taken.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(tasks.asyncio, "sleep", sleep)
    return taken


def failing(times: int, result="done"):
    """An attempt that raises ``times`` times, then returns ``result``; it records the n it was given."""
    seen: list[int] = []

    async def attempt(tries: int):
        seen.append(tries)
        if len(seen) <= times:
            raise ConnectionError(f"failure {len(seen)}")
        return result

    return attempt, seen


def test_the_first_success_is_returned_after_pauses_doubling_up_to_the_longest(pauses):
    attempt, seen = failing(8)
    failures: list[str] = []
    assert asyncio.run(retry(attempt, lambda exc: failures.append(str(exc)))) == "done"
    assert seen == list(range(9)), "each attempt is told how many came before it"
    assert failures == [f"failure {k}" for k in range(1, 9)]
    assert pauses == [0.05, 0.1, 0.2, 0.25, 0.25, 0.25, 0.25, 0.25]
    assert (RETRY_FIRST, RETRY_LONGEST) == (0.05, 0.25)


def test_a_success_at_once_takes_no_pause_and_says_nothing(pauses):
    attempt, seen = failing(0, result=None)
    assert asyncio.run(retry(attempt, lambda exc: pytest.fail("no failure"))) is None
    assert seen == [0] and pauses == []


def test_other_pauses_can_be_asked_for(pauses):
    attempt, _ = failing(4)
    asyncio.run(retry(attempt, lambda exc: None, first=0.5, longest=3.0))
    assert pauses == [0.5, 1.0, 2.0, 3.0]


def test_each_attempt_waits_for_the_gate(pauses):
    async def scenario():
        gate = asyncio.Event()
        attempt, seen = failing(1)

        def failed(exc):
            gate.clear()  # as if the bus lost its readiness after the failure

        task = asyncio.create_task(retry(attempt, failed, gate=gate))
        await asyncio.sleep(0)
        assert seen == [], "nothing is attempted before the gate opens"
        gate.set()
        while not seen:
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)
        assert seen == [0] and not task.done(), "the second attempt waits for the gate again"
        gate.set()
        assert await task == "done"
        assert seen == [0, 1]

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_cancelling_ends_the_retries_and_is_not_a_failure():
    async def scenario():
        failures = []

        async def never(tries):
            raise ConnectionError("down")

        task = asyncio.create_task(retry(never, failures.append, first=0.01, longest=0.01))
        while len(failures) < 3:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        count = len(failures)
        await asyncio.sleep(0.05)
        assert len(failures) == count and all(isinstance(exc, ConnectionError) for exc in failures)

    asyncio.run(asyncio.wait_for(scenario(), 10))


def test_lanes_run_one_job_at_a_time_per_key_in_order_and_keys_at_once():
    async def scenario():
        running: dict[str, int] = {}
        most_at_once = {"per key": 0, "overall": 0}
        done: list[tuple] = []
        tasks_made = []

        async def run(job):
            key, k = job
            running[key] = running.get(key, 0) + 1
            most_at_once["per key"] = max(most_at_once["per key"], running[key])
            most_at_once["overall"] = max(most_at_once["overall"], sum(running.values()))
            await asyncio.sleep(0.001 * (k % 3))
            running[key] -= 1
            done.append(job)

        lanes = Lanes(lambda coroutine: tasks_made.append(asyncio.create_task(coroutine)), run)
        for k in range(10):
            for key in ("a", "b", "c"):
                lanes.add(key, (key, k))
        while len(done) < 30:
            await asyncio.sleep(0.001)
        lanes.add("a", ("a", 10))  # a key whose lane emptied starts a new one
        await asyncio.gather(*tasks_made)
        assert most_at_once == {"per key": 1, "overall": 3}
        for key in ("a", "b", "c"):
            assert [k for other, k in done if other == key] == list(range(11 if key == "a" else 10))
        assert len(tasks_made) == 4

    asyncio.run(asyncio.wait_for(scenario(), 10))
