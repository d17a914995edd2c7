"""fdkeep.metrics: the scrape thread sees only whole snapshots the loop made, and a port a
predecessor still holds is asked for again until it is free."""

import logging
import socket
import time
import urllib.request

from prometheus_client.core import GaugeMetricFamily

from fdkeep.loop import Loop
from fdkeep.metrics import MetricsEndpoint

log = logging.getLogger("test")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        return answer.read().decode()


def test_a_scrape_shows_the_last_snapshot_and_the_process():
    loop = Loop()
    state = {"n": 1}
    endpoint = MetricsEndpoint(loop, log, "127.0.0.1", 0,
                               lambda: [GaugeMetricFamily("thing", "A thing.", value=state["n"])])
    try:
        endpoint.start()
        address = endpoint.listening
        assert address.startswith("127.0.0.1:")
        state["n"] = 2  # changed on the loop: not seen until the loop makes a snapshot
        text = scrape(address)
        assert "thing 1.0" in text and "process_open_fds " in text and "process_start_time_seconds " in text
        endpoint.snapshots.refresh()
        assert "thing 2.0" in scrape(address)
    finally:
        endpoint.close()
        loop.close()


def test_a_port_still_taken_is_asked_for_again_until_free():
    loop = Loop()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    endpoint = MetricsEndpoint(loop, log, "127.0.0.1", port, lambda: [])
    try:
        endpoint.start(retry_for=10)
        assert endpoint.listening is None
        loop.run_once(0.3)
        assert endpoint.listening is None, "still taken"
        holder.close()  # the predecessor's port, freed as it dies
        deadline = time.monotonic() + 5
        while endpoint.listening is None and time.monotonic() < deadline:
            loop.run_once(0.05)
        assert endpoint.listening == f"127.0.0.1:{port}"
        assert "process_max_fds" in scrape(endpoint.listening)
    finally:
        holder.close()
        endpoint.close()
        loop.close()


def test_a_port_taken_for_good_is_given_up_with_the_fix_and_nothing_dies(caplog):
    loop = Loop()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    endpoint = MetricsEndpoint(loop, log, "127.0.0.1", holder.getsockname()[1], lambda: [])
    try:
        with caplog.at_level(logging.ERROR, logger="test"):
            endpoint.start(retry_for=0.2)
            deadline = time.monotonic() + 3
            while "cannot listen" not in caplog.text and time.monotonic() < deadline:
                loop.run_once(0.05)
        assert endpoint.listening is None
        assert "pass another --metrics-port" in caplog.text
    finally:
        holder.close()
        endpoint.close()
        loop.close()
