"""Debian's real Prometheus scrapes chatd and holderd; a crash shows in its answers.

Two chatd take turns (``--lease``), as the units run them; the one serving listens for
scrapes, its standby takes the same port over with its clients. Prometheus (its own
storage and port, a one-second scrape interval) is asked with PromQL, over its HTTP
API, what it saw: the crash counted once, the takeover's time, counters that went
on across the crash (no reset: they live in the journal), and the alert that fired.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from chatd.control import instance_socket
from ctl import control
from ctl.launch import wait_for_answer, wait_until
from testkit.prometheus import Prometheus, listening_ports, missing_prometheus, scrape_config

from helpers import skip_or_fail

ALERTS = Path(__file__).resolve().parents[2] / "docs" / "prometheus" / "chatd-alerts.yml"


def require_prometheus() -> None:
    """Skip where prometheus or promtool is missing; under CI, fail instead: scripts/test installs them."""
    missing = missing_prometheus()
    if missing:
        skip_or_fail(f"needs {missing}", "the Prometheus tests")


def lease_chatd(procs, instance: str, metrics_port: int, role: str) -> tuple[subprocess.Popen, dict]:
    proc = procs.spawn("chatd", "chatd", "--port", str(procs.port or 0), "--http-port", "-1",
                       "--control", procs.control_socket, "--holder", procs.holder_socket,
                       "--lease", "--instance", instance, "--metrics-port", str(metrics_port))
    def asked() -> dict:
        return control.call("status", instance_socket(procs.control_socket, instance))

    status = wait_for_answer(proc, asked, 15, "chatd")
    assert status["role"] == role, status
    if role == "serving":  # its metrics listen a moment after it serves (chatd.lifecycle.METRICS_AFTER)
        status = wait_until(lambda: (found := asked())["metrics"] and found, 10, "chatd's metrics to listen")
    return proc, status


def scrape(address: str) -> bytes:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        assert answer.status == 200
        return answer.read()


@pytest.mark.parametrize("crash, how", [("chatctl crash", "killed"), ("SIGSEGV", "crashed")])
def test_prometheus_sees_the_crash_and_the_takeover(procs, tmp_path, crash, how):
    require_prometheus()
    procs.start_holderd("--metrics-port", "0")
    holderd_ports = wait_until(lambda: listening_ports(procs.holderd.pid), 10, "holderd's metrics port")
    holderd_metrics = f"127.0.0.1:{holderd_ports[0]}"
    # Port 0: the kernel's choice; the standby then asks for that one, which it takes over.
    first, status = lease_chatd(procs, "1", 0, "serving")
    procs.port, chatd_metrics = status["port"], status["metrics"]
    assert chatd_metrics.startswith("127.0.0.1:"), status
    second, _ = lease_chatd(procs, "2", int(chatd_metrics.rsplit(":", 1)[1]), "standby")
    a, b = procs.pair()
    for n in (1, 2):
        a.send(f"MSG before {n}")
        assert b.line() == f"FROM A {n} before {n}"

    for address in (chatd_metrics, holderd_metrics):
        checked = subprocess.run(["promtool", "check", "metrics"], input=scrape(address), capture_output=True)
        assert checked.returncode == 0, (address, checked.stdout, checked.stderr)

    config = scrape_config([chatd_metrics], [holderd_metrics], interval="1s")
    with open(tmp_path / "chatd-alerts.yml", "w") as rules:
        rules.write(ALERTS.read_text())
    config += "rule_files: [chatd-alerts.yml]\n"
    with Prometheus(str(tmp_path), config) as prometheus:
        prometheus.start()
        prometheus.wait_for('chatd_messages_relayed_total', lambda value: value == 2)
        assert prometheus.value("sum(chatd_crashes_survived_total)") == 0
        prometheus.wait_for('holderd_lease_waiting{lease="chatd"}', lambda value: value == 1)
        assert prometheus.value('sum(holderd_held_names)') >= 4  # listener, journal, last words, a bundle

        if crash == "chatctl crash":
            subprocess.run([sys.executable, "-m", "ctl", "crash"], env=procs.env, check=True, timeout=10,
                           stdout=subprocess.DEVNULL)
        else:
            first.send_signal(signal.SIGSEGV)
        assert first.wait(10) == -signal.SIGSEGV
        served = wait_for_answer(second, lambda: control.call("status", procs.control_socket), 15, "the standby")
        assert served["pid"] == second.pid and served["restore"]["ended"] == how, served
        a.send("MSG after")
        assert b.line() == "FROM A 3 after"  # the same connections, through the takeover

        # The crash, counted once, under how it died; and the takeover's time, as chatd measured it.
        went_up = prometheus.wait_for(
            "sum(max_over_time(chatd_crashes_survived_total[10m]) - min_over_time(chatd_crashes_survived_total[10m]))",
            lambda value: value >= 1)
        assert went_up == 1
        assert prometheus.value(f'chatd_crashes_survived_total{{how="{how}"}}') == 1
        assert prometheus.value("chatd_restore_duration_seconds_count") == 1
        took = prometheus.value("chatd_last_restore_duration_seconds")
        assert took == pytest.approx(served["restore"]["milliseconds"] / 1000, abs=1e-5)
        assert prometheus.value("chatd_restore_duration_seconds_sum") == pytest.approx(took, abs=1e-5)
        # Counters since the service began went on across the crash: Prometheus saw no reset.
        prometheus.wait_for("chatd_messages_relayed_total", lambda value: value == 3)
        assert prometheus.value("resets(chatd_messages_relayed_total[10m])") == 0
        assert prometheus.value("resets(chatd_journal_commits_total[10m])") == 0
        assert prometheus.value('holderd_lease_passes_total{lease="chatd"}') == 1
        prometheus.wait_for('ALERTS{alertname="ChatdCrashed", alertstate="firing"}', lambda value: value == 1)
        print(f"after a {crash}: crashes survived went up by {went_up:g} ({how}); "
              f"the takeover's restore took {took * 1000:.2f} ms")


def samples(address: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(scrape(address).decode()) for sample in family.samples}


def test_a_handover_and_a_stop_count_as_planned_and_no_crash(procs):
    """No Prometheus needed: the scrape itself. A handover, then a stop (SIGTERM, no standby)
    and a start: two planned restarts, no crash, the relayed count going on."""
    procs.start_holderd()
    first, status = lease_chatd(procs, "1", 0, "serving")
    procs.port, address = status["port"], status["metrics"]
    port = address.rsplit(":", 1)[1]
    second, _ = lease_chatd(procs, "2", int(port), "standby")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"

    subprocess.run([sys.executable, "-m", "ctl", "handover"], env=procs.env, check=True, timeout=15,
                   stdout=subprocess.DEVNULL)
    assert first.wait(10) == 0
    wait_until(lambda: control.call("status", procs.control_socket)["pid"] == second.pid, 15, "the standby to serve")
    a.send("MSG two")
    assert b.line() == "FROM A 2 two"
    after_handover = wait_until(lambda: scraped(address), 15, "the successor's scrape")
    assert after_handover[("chatd_planned_restarts_total", ())] == 1
    assert sum(value for (name, _), value in after_handover.items() if name == "chatd_crashes_survived_total") == 0

    second.send_signal(signal.SIGTERM)  # no standby now: a stop at the end of the turn
    assert second.wait(10) == 0
    third, _ = lease_chatd(procs, "3", int(port), "serving")
    a.send("MSG three")
    assert b.line() == "FROM A 3 three"
    after_stop = wait_until(lambda: scraped(address), 15, "the third chatd's scrape")
    assert after_stop[("chatd_planned_restarts_total", ())] == 2
    assert sum(value for (name, _), value in after_stop.items() if name == "chatd_crashes_survived_total") == 0
    assert after_stop[("chatd_restore_duration_seconds_count", ())] == 2
    wait_until(lambda: samples(address)[("chatd_messages_relayed_total", ())] == 3, 5, "the third message counted")


def scraped(address: str) -> dict | None:
    """The scrape's samples; None while nothing answers (the predecessor has exited: whoever
    answers is its successor)."""
    try:
        return samples(address)
    except OSError:
        return None


def test_across_hosts_the_stream_and_the_forwards_are_scraped(tmp_path):
    """Two chatd hosts over a real NATS JetStream cluster: a pair across them chats, and each
    host's scrape shows the cluster as its status does (connected, both hosts alive, the lag)."""
    from ctl.hosts import Hosts
    from helpers import line_client, require_nats

    require_nats()
    with Hosts(2, 3, lease=2.0, workdir=str(tmp_path / "hosts")) as cluster:
        cluster.start("--metrics-port", "0")
        ann = line_client(cluster.ports[0], "ann", "bob", timeout=15)
        bob = line_client(cluster.ports[1], "bob", "ann", timeout=15)
        try:
            assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
            ann.send("MSG hello", "MSG across")
            assert bob.lines(2) == ["FROM ann 1 hello", "FROM ann 2 across"]
            receiver = wait_until(lambda: cluster.status(1)["metrics"], 10, "h1's metrics to listen")
            found = wait_until(lambda: (got := scraped(receiver)) and got.get(("chatd_messages_relayed_total", ()))
                               == 2 and got, 10, "h1's scrape to count the two messages")
            assert found[("chatd_cluster_connected", ())] == 1
            assert found[("chatd_cluster_other_hosts_alive", ())] == 1
            assert found[("chatd_cluster_forwards_in_flight", ())] == 0
            assert found[("chatd_cluster_stashed", ())] == 0
            assert found.get(("chatd_cluster_stream_lag_messages", ())) == 0
            sender = scraped(wait_until(lambda: cluster.status(0)["metrics"], 10, "h0's metrics to listen"))
            assert sender[("chatd_messages_relayed_total", ())] == 0, "h0 forwarded them: h1 relayed them"
        finally:
            ann.close(), bob.close()
