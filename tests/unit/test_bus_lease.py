"""A host works out alone that its lease may have lapsed (a partition tells it nothing), and never
before the key can have expired in NATS: LeaseLapsed, then LeaseRenewed when a put is acked again."""

import asyncio
import time
from types import SimpleNamespace

from chatd.bus.directory import Directory
from chatd.bus.results import LeaseLapsed, LeaseRenewed

LEASE = 0.8


class CutOffEngine:
    """Puts are acknowledged until ``cut``, hang (as over a dropped link) until ``healed``."""

    def __init__(self):
        self.settings = SimpleNamespace(nick_bucket="nicks", host_bucket="hosts", host_id="h0", host_lease=LEASE)
        self.gauges = SimpleNamespace(lease_renewed=None)
        self.put_results: list = []
        self.acked_sends: list[float] = []  # when each acknowledged put was sent
        self.cut = self.healed = None

        async def publish(subject, value, timeout):
            sent = time.monotonic()
            if self.cut is not None and self.cut <= sent and (self.healed is None or sent < self.healed):
                await asyncio.sleep(timeout)
                raise asyncio.TimeoutError()
            self.acked_sends.append(sent)

        self.js = SimpleNamespace(publish=publish)

    def spawn(self, coroutine):
        return asyncio.get_running_loop().create_task(coroutine)

    def put(self, result):
        self.put_results.append((time.monotonic(), result))

    def say(self, code, message, fatal=False):
        pass


def test_the_lapse_is_told_after_the_lease_less_the_margin_and_the_renewal_after_it():
    engine = CutOffEngine()

    async def run():
        directory = Directory(engine)
        tasks = [asyncio.create_task(directory.keep_lease()), asyncio.create_task(directory.watch_own_lease())]
        await asyncio.sleep(LEASE)
        assert engine.put_results == [], "no lapse while the puts are acknowledged"
        engine.cut = time.monotonic()
        deadline = time.monotonic() + 10 * LEASE
        while not engine.put_results and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        engine.healed = time.monotonic()
        while len(engine.put_results) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()

    asyncio.run(run())
    [(lapsed_at, lapsed), (renewed_at, renewed)] = engine.put_results
    assert isinstance(lapsed, LeaseLapsed) and isinstance(renewed, LeaseRenewed)
    last_acked_before_cut = max(sent for sent in engine.acked_sends if sent < engine.cut)
    # Safe: not before the key can expire (the last acked put's sending, plus the lease) less the margin.
    assert lapsed_at >= last_acked_before_cut + LEASE - min(0.5, LEASE / 4)
    assert lapsed.seconds >= LEASE - LEASE / 4 - 0.001  # told rounded to the millisecond
    assert renewed_at >= engine.healed
