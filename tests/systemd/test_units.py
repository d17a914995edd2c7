"""The real units on a real systemd: a container booted with systemd-nspawn.

The container is provisioned with ``scripts/provision``, the script the
Vagrantfile uses: it builds a virtualenv in /opt/process-backup from the
checkout (offline, from wheels built here), runs ``chatctl install-units``,
``systemctl enable --now chatd`` and ``chatctl selftest``. The tests then drive
it with ``systemctl`` and ``chatctl`` inside, and chat from here: the container
shares this machine's network, so its chatd is on 127.0.0.1.

The tests run in file order and share the container; each leaves chatd serving.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import socket
import time
from pathlib import Path

import pytest

from ctl.launch import wait_until
from testkit import soak
from ctl.probe import LineClient
from harness import BootedSystemd, CommandFailed, machine_can_boot_containers
from helpers import free_port, offline_wheels, previous_release

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/opt/process-backup"
CHATCTL = f"{PREFIX}/bin/chatctl"

can_boot, why_not = machine_can_boot_containers()
if not can_boot:
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"CI must run the systemd tests, but this machine cannot boot a container: {why_not}")
    pytest.skip(f"cannot boot a systemd container here: {why_not}", allow_module_level=True)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> Path:
    """Wheels of the dependencies, so the container installs offline (pip caches the builds)."""
    directory = tmp_path_factory.mktemp("wheels")
    offline_wheels(directory)
    directory.chmod(0o755)
    return directory


@pytest.fixture(scope="module")
def machine(wheels):
    port, http_port, metrics_port = free_port(), free_port(), free_port()
    with BootedSystemd(binds=[str(REPO), str(wheels)], boot_timeout=90) as container:
        container.port, container.http_port, container.metrics_port = port, http_port, metrics_port
        # The metrics on a port of the test's own rather than the unit's 9471: the container shares this network.
        result = container.run(
            "bash", str(REPO / "scripts" / "provision"), "--source", str(REPO), "--wheels", str(wheels),
            "--chatd-options", f"--port {port} --http-port {http_port} --metrics-port {metrics_port}", check=False,
            timeout=600,
        )
        print(result.stdout, result.stderr)
        if result.returncode != 0:
            journal = container.run("journalctl", "--no-pager", "-n", "200", check=False).stdout
            pytest.fail(f"provisioning failed:\n{result.stdout}\n{result.stderr}\n--- journal ---\n{journal}")
        yield container


def chatctl(machine, *args: str) -> dict:
    return json.loads(machine.run(CHATCTL, *args, "--json").stdout)


def restarts(machine, unit: str) -> int:
    return int(machine.show(unit, "NRestarts"))


def main_pid(machine, unit: str) -> int:
    return int(machine.show(unit, "MainPID"))


def wait_active(machine, unit: str, other_than_pid: int, timeout: float = 30) -> int:
    """Wait until ``unit`` is active (READY=1 arrived) with a new main process."""

    def ready():
        if machine.show(unit, "ActiveState") != "active":
            return None
        pid = main_pid(machine, unit)
        return pid if pid not in (0, other_than_pid) else None

    return wait_until(ready, timeout, f"{unit} active again with a new pid")


def pair(machine, a: str, b: str) -> tuple[LineClient, LineClient]:
    first, second = LineClient(machine.port), LineClient(machine.port)
    first.send(f"NICK {a}", f"PAIR {b}")
    second.send(f"NICK {b}", f"PAIR {a}")
    assert first.lines(2) == [f"OK NICK {a}", f"OK PAIR {b}"]
    assert second.lines(3) == [f"OK NICK {b}", f"OK PAIR {a}", f"PAIRED {a}"]
    assert first.line() == f"PAIRED {b}"
    return first, second


def chat(clients, nicks, n: int) -> None:
    """One message each way; ``n`` is the count each receiver must show."""
    (first, second), (a, b) = clients, nicks
    first.send(f"MSG hello {n}")
    assert second.line() == f"FROM {a} {n} hello {n}"
    second.send(f"MSG hi {n}")
    assert first.line() == f"FROM {b} {n} hi {n}"


def now(machine) -> str:
    """The container's clock, as journalctl --since takes it."""
    return machine.run("date", "+%Y-%m-%d %H:%M:%S.%N").stdout.strip()[:-3]


CHATD_UNITS = ("chatd@1", "chatd@2")


def serving(machine) -> tuple[str, int]:
    """(unit, pid) of the chatd that serves: either unit may, they take turns."""
    pid = chatctl(machine, "status")["chatd"]["pid"]
    for unit in CHATD_UNITS:
        if main_pid(machine, unit) == pid:
            return unit, pid
    raise AssertionError(f"no chatd unit has the serving pid {pid}")


def serving_other_than(machine, old_pid: int) -> tuple[str, int] | None:
    """The chatd serving, once it is not ``old_pid`` (None meanwhile, while nobody answers)."""
    try:
        found = serving(machine)
    except (CommandFailed, AssertionError):
        return None
    return found if found[1] != old_pid else None


def other(unit: str) -> str:
    return CHATD_UNITS[1 - CHATD_UNITS.index(unit)]


def chatd_journal(machine, since: str | None = None) -> str:
    """Both chatd units' journal, interleaved."""
    argv = ["journalctl", "-u", "chatd@*", "--no-pager", "-o", "short-precise"]
    return machine.run(*argv, *(["--since", since] if since else [])).stdout


def crash_chatd(machine) -> float:
    """``chatctl crash`` the chatd serving; wait until the other serves and the crashed unit,
    restarted by systemd, stands by. The gap: the crashed process's exit to the restore done."""
    unit, old = serving(machine)
    before = restarts(machine, unit)
    since = now(machine)
    chatctl(machine, "crash")
    try:
        wait_until(lambda: serving_other_than(machine, old), 30, "another chatd to serve")
        wait_active(machine, unit, old)
    except Exception:
        print(f"--- chatd's journal since the crash\n{chatd_journal(machine, since)[-8000:]}")
        raise
    assert restarts(machine, unit) == before + 1
    return takeover_gap_ms(machine, since)


def takeover_gap_ms(machine, since: str, end: str = "Main process exited") -> float:
    """From the journal: the dead process's exit (its first line with ``end``) to the next one's restore.

    Each entry is placed at the time it was made where the journal knows it (systemd's own
    lines carry it), else when the journal received it (chatd's stdout): a standby may log its
    restore before PID 1 has written its line about the exit, so the order of lines is no guide."""
    entries = [(stamp * 1000, message) for stamp, _, message in machine.journal_entries("chatd@*", since)]
    died = next((stamp for stamp, message in entries if end in message), None)
    restored = next((stamp for stamp, message in entries
                     if died is not None and stamp >= died and "restored" in message), None)
    assert died is not None and restored is not None, entries
    return round(restored - died, 1)


def test_start_brings_holderd_and_two_clients_chat(machine):
    assert machine.show("holderd", "ActiveState") == "active"
    assert machine.show("chatd", "ActiveState") == "active"
    for unit in CHATD_UNITS:
        wait_until(lambda: machine.show(unit, "ActiveState") == "active", 10, f"{unit} to be active")
        assert machine.show(unit, "User") == "chatd"
    assert machine.show("holderd", "User") == "holderd"
    unit, _ = serving(machine)
    assert "standby" in machine.show(other(unit), "StatusText")
    assert "clients" in machine.show(unit, "StatusText")
    clients = pair(machine, "ann", "bob")
    try:
        chat(clients, ("ann", "bob"), 1)
        chat(clients, ("ann", "bob"), 2)
    finally:
        machine.clients = clients  # the next tests go on with these two connections


def test_crash_restarts_and_restores_by_itself(machine):
    clients = machine.clients
    ports = [client.local_port for client in clients]
    crashed, _ = serving(machine)
    gap = crash_chatd(machine)
    print(f"crash to restored, by the standby, with 2 clients: {gap} ms")
    journal = chatd_journal(machine)
    assert re.search(r"code=(dumped|killed), status=11/SEGV", journal), journal
    assert "Scheduled restart job" in journal
    assert "granted the lease: taking over" in journal
    assert "restored 2 clients and 1 pair" in journal
    assert serving(machine)[0] == other(crashed), "the roles swapped"
    assert "standby" in machine.show(crashed, "StatusText")
    chat(clients, ("ann", "bob"), 3)
    assert [client.sock.getsockname()[1] for client in clients] == ports


def test_the_serving_units_metrics_count_the_crash_in_its_sandbox(machine):
    """The unit's hardening leaves the metrics working (a thread, /proc/self), on loopback; the
    crash the test before caused is counted, by whichever instance serves now."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{machine.metrics_port}/metrics", timeout=5) as answer:
                return answer.read().decode()
        except OSError:
            return None  # the chatd serving listens a moment after it serves (chatd.lifecycle.METRICS_AFTER)

    scraped = wait_until(scrape, 15, "the serving chatd's metrics")
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
               for family in text_string_to_metric_families(scraped) for sample in family.samples}
    crashes = samples[("chatd_crashes_survived_total", (("how", "killed"),))]
    # chatctl crash leaves no last words: "killed". The selftest's crash at provisioning, and the test's.
    assert crashes >= 1 and crashes == samples[("chatd_restore_duration_seconds_count", ())], scraped
    assert samples[("chatd_clients", ())] == 2 and samples[("chatd_pairs", ())] == 1
    assert samples[("process_open_fds", ())] > 0


def test_holderds_metrics_drop_in_opens_loopback_only_and_goes_again(machine):
    """README's drop-in for holderd (docs/prometheus/holderd-metrics.conf, on a port of the test's
    own): holderd restarts with it, keeps everything, answers a scrape with what it holds for
    chatd's uid; then the drop-in goes, and holderd is off every network again."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = free_port()
    drop_in = (REPO / "docs" / "prometheus" / "holderd-metrics.conf").read_text().replace("9472", str(port))
    machine.run("mkdir", "-p", "/etc/systemd/system/holderd.service.d")
    machine.run("sh", "-c", f"cat > /etc/systemd/system/holderd.service.d/metrics.conf <<'END'\n{drop_in}END\n")
    try:
        old = main_pid(machine, "holderd")
        machine.run("systemctl", "daemon-reload")
        machine.systemctl("restart", "holderd")
        wait_active(machine, "holderd", old)

        def scraped():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                    return answer.read().decode()
            except OSError:
                return None

        chatd_uid = machine.run("id", "-u", "chatd").stdout.strip()
        # Once both chatd have asked for the lease again (the restart forgot who held it).
        text = wait_until(lambda: (found := scraped()) and 'lease="chatd"' in found and "holderd_lease_waiting" in found
                          and found, 15, "holderd's metrics with the lease asked for again")
        samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
                   for family in text_string_to_metric_families(text) for sample in family.samples}
        # The listeners, the journal, the last words and a bundle: back from holderd's fd store.
        assert samples[("holderd_held_names", (("uid", chatd_uid),))] >= 4, text
        assert samples[("holderd_lease_waiting", (("lease", "chatd"), ("uid", chatd_uid)))] == 1  # the standby
        assert samples[("process_open_fds", ())] > 0
        assert chatctl(machine, "status")["chatd"]["clients"] == 2  # holderd's restart cost the pair nothing
    finally:
        machine.run("rm", "-f", "/etc/systemd/system/holderd.service.d/metrics.conf")
        machine.run("systemctl", "daemon-reload")
        old = main_pid(machine, "holderd")
        machine.systemctl("restart", "holderd")
        wait_active(machine, "holderd", old)
    assert wait_until(lambda: scraped() is None, 10, "holderd off the network again")


def test_holderd_crash_loses_nothing(machine):
    old = main_pid(machine, "holderd")
    before = restarts(machine, "holderd")
    # The main process only: the default (all of the unit's processes) fails now and then with
    # "Failed to send signal SIGSEGV to auxiliary processes: Input/output error" (seen here).
    machine.systemctl("kill", "--kill-whom=main", "--signal=SIGSEGV", "holderd")
    wait_active(machine, "holderd", old)
    assert restarts(machine, "holderd") == before + 1
    assert "took back" in machine.journal("holderd")
    rows = chatctl(machine, "clients")
    assert len(rows) == 2 and all(row["held"] for row in rows), rows
    crash_chatd(machine)
    chat(machine.clients, ("ann", "bob"), 4)


def test_fd_store_alone_restores_when_holderd_is_stopped(machine):
    since = now(machine)
    machine.systemctl("stop", "holderd")  # its store is emptied
    try:
        crash_chatd(machine)
        # The restart of chatd starts holderd again (Wants=), empty: what chatd
        # restored came from systemd's fd store alone.
        assert "holding 0 fds" in machine.journal("holderd", since)
        assert "restored 2 clients and 1 pair" in chatd_journal(machine, since)
        chat(machine.clients, ("ann", "bob"), 5)
    finally:
        machine.systemctl("start", "holderd")
    # chatd notices the empty holderd and stores everything in it again.
    wait_until(lambda: all(row["held"] for row in chatctl(machine, "clients")), 20, "holderd to hold everything again")


def test_a_hung_chatd_is_killed_by_the_watchdog_and_restored(machine):
    """SIGSTOP: chatd stops pinging; systemd's watchdog kills it, and the standby takes over."""
    unit, old = serving(machine)
    before = restarts(machine, unit)
    since = now(machine)
    machine.run("kill", "-STOP", str(old))
    stopped_at = time.monotonic()
    wait_until(lambda: serving_other_than(machine, old), 30, "another chatd to serve")
    took = time.monotonic() - stopped_at
    print(f"SIGSTOP to another chatd serving: {took:.1f} s (WatchdogSec=5s, TimeoutAbortSec=2s)")
    wait_active(machine, unit, old)
    assert restarts(machine, unit) == before + 1
    assert "Watchdog timeout" in machine.journal(unit, since), machine.journal(unit, since)
    # Not SIGKILL TimeoutAbortSec later: systemd sends SIGCONT with the SIGQUIT (the unit's comment).
    assert "status=3/QUIT" in machine.journal(unit, since), machine.journal(unit, since)
    assert "restored 2 clients and 1 pair" in chatd_journal(machine, since)
    chat(machine.clients, ("ann", "bob"), 6)


def test_the_watchdog_killing_a_chatd_stalled_in_a_message_drops_nothing(machine):
    """The serving chatd stops itself (SIGSTOP) in the middle of handling a message, as a
    process stalled from outside would (``CHATD_FAULT=stall=TEXT``, in that unit only). systemd's
    watchdog kills it (SIGQUIT, with a SIGCONT); its last words say it hung there, so the standby
    tries the message in a child process first, which handles it and lives: the message arrives
    once, and nothing is skipped."""
    armed, _ = serving(machine)
    drop_in = f"/etc/systemd/system/{armed}.service.d/stall.conf"
    machine.run("mkdir", "-p", os.path.dirname(drop_in))
    machine.run("sh", "-c", 'cat > "$1"', "sh", drop_in,
                input="[Service]\nEnvironment=CHATD_FAULT=stall=stalled-here\n")
    machine.systemctl("daemon-reload")
    clients = ()
    try:
        old = main_pid(machine, armed)
        machine.systemctl("restart", armed)  # serving: a handover; it comes back armed, as the standby
        wait_active(machine, armed, old)
        wait_until(lambda: serving_other_than(machine, old), 10, "the other chatd to serve")
        chatctl(machine, "handover")  # the armed one serves
        wait_until(lambda: serving(machine)[0] == armed, 20, f"{armed} to serve")
        machine.systemctl("start", other(armed))  # it exited 0 (a handover): the standby again
        wait_until(lambda: machine.show(other(armed), "ActiveState") == "active", 20, "the standby")
        _, stalled_pid = serving(machine)
        clients = pair(machine, "sia", "sib")
        since = now(machine)
        clients[1].sock.settimeout(30)  # the watchdog waits WatchdogSec=5s for a ping first
        sent = time.monotonic()
        clients[0].send("MSG stalled-here")
        assert clients[1].line() == "FROM sia 1 stalled-here"
        print(f"a message chatd stalled in, delivered after the watchdog's kill: {time.monotonic() - sent:.1f} s "
              "after it was sent (WatchdogSec=5s)")
        clients[1].sock.settimeout(clients[1].timeout)
        clients[0].send("MSG after")
        assert clients[1].line() == "FROM sia 2 after"
        assert clients[0].silent_for(0.3) and clients[1].silent_for(0.3), "an answer or a message came twice"
        wait_active(machine, armed, stalled_pid)
        assert "status=3/QUIT" in machine.journal(armed, since), machine.journal(armed, since)
        journal = chatd_journal(machine, since)
        assert "died of the watchdog's SIGQUIT while handling a command" in journal, journal
        assert "hung chatd, but a child process handled it and lived" in journal, journal
        assert "crashed-server" not in journal, journal
    finally:
        for client in clients:
            client.close()
        machine.run("rm", "-f", drop_in)
        machine.systemctl("daemon-reload")
        machine.systemctl("restart", armed)  # unarmed now (serving, it hands over first)
        machine.systemctl("start", other(armed))  # if a handover left it stopped
        for unit in CHATD_UNITS:
            wait_until(lambda: machine.show(unit, "ActiveState") == "active", 20, f"{unit} to be active again")


def test_systemctl_restart_keeps_the_clients(machine):
    unit, old = serving(machine)
    machine.systemctl("restart", unit)  # the one serving alone: the lease passes on
    wait_active(machine, unit, old)
    wait_until(lambda: serving_other_than(machine, old), 10, "a chatd to serve")
    chat(machine.clients, ("ann", "bob"), 7)
    old = [main_pid(machine, unit) for unit in CHATD_UNITS]
    machine.systemctl("restart", "chatd")  # both, as for an upgrade (PartOf=)
    for unit, pid in zip(CHATD_UNITS, old):
        wait_active(machine, unit, pid)
    chat(machine.clients, ("ann", "bob"), 8)


def test_stop_then_start_keeps_the_clients_through_holderd(machine):
    old = [main_pid(machine, unit) for unit in CHATD_UNITS]
    machine.systemctl("stop", "chatd")
    wait_until(lambda: [machine.show(unit, "ActiveState") for unit in CHATD_UNITS] == ["inactive", "inactive"],
               10, "both chatd processes to stop (PartOf=)")
    assert machine.clients[0].silent_for(0.3)  # no EOF while chatd is down
    machine.systemctl("start", "chatd")
    for unit, pid in zip(CHATD_UNITS, old):
        wait_active(machine, unit, pid)
    chat(machine.clients, ("ann", "bob"), 9)
    # And the store has them again, so a crash now is covered twice over.
    machine.systemctl("stop", "holderd")
    try:
        crash_chatd(machine)
        chat(machine.clients, ("ann", "bob"), 10)
    finally:
        machine.systemctl("start", "holderd")


def test_status_names_the_serving_instance_and_shows_both(machine):
    unit, pid = serving(machine)
    report = chatctl(machine, "status")
    roles = {f"chatd@{row['instance']}": (row["role"], row["pid"]) for row in report["instances"]}
    assert roles == {unit: ("serving", pid), other(unit): ("standby", main_pid(machine, other(unit)))}, report
    text = machine.run(CHATCTL, "status").stdout
    assert f"{unit}: pid {pid}, serving port {machine.port}" in text, text
    assert f"{other(unit)}: pid {main_pid(machine, other(unit))}, standby" in text, text
    # holderd's line agrees with chatd's count, and says for whom it holds them.
    held = report["chatd"]["held"]["holderd"]
    assert f"holds {held} fds for chatd (uid {report['chatd']['uid']})" in text, text
    assert "for uid 0" not in text, text


def test_restarting_holderd_leaves_the_server_serving_without_an_error(machine):
    unit, pid = serving(machine)
    since = now(machine)
    old = main_pid(machine, "holderd")
    machine.systemctl("restart", "holderd")
    wait_active(machine, "holderd", old)
    # Both chatd ask holderd for the lease again; whoever asked first, the server keeps serving...
    wait_until(lambda: "works again" in chatd_journal(machine, since), 10, "the server to find holderd back")
    assert serving(machine) == (unit, pid)
    chat(machine.clients, ("ann", "bob"), 11)
    # ...and holds the lease: the standby, queued behind it, takes over when it dies.
    crash_chatd(machine)
    chat(machine.clients, ("ann", "bob"), 12)
    journal = chatd_journal(machine, since)
    assert " ERROR " not in journal and "nothing to restore" not in journal, journal


def test_twenty_stops_and_starts_fail_no_unit(machine):
    since = now(machine)
    # At most 20 starts of an instance in 10 s (StartLimitBurst=, the guard against a crash
    # loop, which counts every start): a cycle takes some 0.3 s here, so cycles are spaced to
    # stay under it with the starts of the tests before (the limit itself is not under test).
    burst, interval = int(machine.show("chatd@1", "StartLimitBurst")), 10.0
    assert machine.show("chatd@1", "StartLimitIntervalUSec") == "10s"
    spacing = interval / (burst - 6)
    began = time.monotonic()
    for cycle in range(20):
        cycle_began = time.monotonic()
        machine.systemctl("stop", "chatd")
        # `systemctl stop chatd` returns once both instances are stopped.
        states = machine.systemctl("is-active", *CHATD_UNITS, check=False).stdout.split()
        assert states == ["inactive", "inactive"], f"cycle {cycle}: {states}"
        machine.systemctl("start", "chatd")
        for unit in CHATD_UNITS:
            wait_until(lambda: machine.show(unit, "ActiveState") in ("active", "failed"), 20, f"{unit} to start")
        failed = machine.systemctl("is-failed", *CHATD_UNITS, check=False).stdout.split()
        assert failed == ["active", "active"], f"cycle {cycle}: {failed}\n{chatd_journal(machine, since)}"
        # NRestarts counts restarts since the last start by hand: one means a failure after it.
        assert [restarts(machine, unit) for unit in CHATD_UNITS] == [0, 0], f"cycle {cycle}"
        time.sleep(max(0.0, cycle_began + spacing - time.monotonic()))
    took = time.monotonic() - began
    print(f"20 x (systemctl stop chatd; systemctl start chatd; both active): {took:.1f} s")
    journal = chatd_journal(machine, since)
    for sign in ("Address already in use", " ERROR ", "Failed with result", "Main process exited"):
        assert sign not in journal, journal
    wait_until(lambda: serving_other_than(machine, 0), 10, "a chatd to serve")
    chat(machine.clients, ("ann", "bob"), 13)


def test_new_options_from_install_units_take_effect_and_the_clients_stay(machine):
    old_port, port, http_port = machine.port, free_port(), free_port()
    old_pids = [main_pid(machine, unit) for unit in CHATD_UNITS]
    since = now(machine)
    machine.run(CHATCTL, "install-units", "--chatd-options",
                f"--host 0.0.0.0 --port {port} --http-port {http_port} --metrics-port {machine.metrics_port}")
    machine.systemctl("restart", "chatd")
    for unit, pid in zip(CHATD_UNITS, old_pids):
        wait_active(machine, unit, pid)
    wait_until(lambda: serving_other_than(machine, 0), 10, "a chatd to serve")
    status = chatctl(machine, "status")["chatd"]
    assert (status["port"], status["http_port"], status["clients"]) == (port, http_port, 2), status
    journal = chatd_journal(machine, since)
    assert (f"listening on 0.0.0.0:{port} instead of 127.0.0.1:{old_port} (--host/--port changed); "
            "the 2 clients connected keep their connections") in journal, journal
    machine.port, machine.http_port = port, http_port
    chat(machine.clients, ("ann", "bob"), 14)  # connected through the old port, chatting on
    newcomer = LineClient(port)
    newcomer.send("NICK eve")
    assert newcomer.line() == "OK NICK eve"
    newcomer.close()

    def old_port_closed():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", old_port)) == errno.ECONNREFUSED

    wait_until(old_port_closed, 10, f"the old port {old_port} to be closed")


def test_selftest_probes_the_port_chatd_serves(machine):
    before = sum(restarts(machine, unit) for unit in CHATD_UNITS)
    result = machine.run(CHATCTL, "selftest", check=False, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"serves port {machine.port}" in result.stdout and "PASS" in result.stdout, result.stdout
    assert machine.port != 5001
    wait_until(lambda: sum(restarts(machine, unit) for unit in CHATD_UNITS) == before + 1
               and all(machine.show(unit, "ActiveState") == "active" for unit in CHATD_UNITS),
               30, "the crashed instance to stand by again")
    chat(machine.clients, ("ann", "bob"), 15)


def test_with_the_standby_stopped_a_crash_is_a_cold_restart_by_systemd(machine):
    """No standby: systemd restarts the crashed chatd itself (RestartSec=), and it restores."""
    clients = pair(machine, "cal", "dee")
    try:
        chat(clients, ("cal", "dee"), 1)
        unit, old = serving(machine)
        standby = other(unit)
        before = restarts(machine, unit)
        machine.systemctl("stop", standby)
        try:
            since = now(machine)
            chatctl(machine, "crash")
            new = wait_active(machine, unit, old)
            assert serving(machine) == (unit, new)
            assert restarts(machine, unit) == before + 1
            journal = chatd_journal(machine, since)
            assert "Scheduled restart job" in journal and "granted the lease" not in journal, journal
            print(f"crash to restored, cold (systemd's restart, no standby): {takeover_gap_ms(machine, since)} ms")
            chat(clients, ("cal", "dee"), 2)  # the same connections: a LineClient never reconnects
        finally:
            try:
                machine.systemctl("start", standby)
            except CommandFailed:
                print(f"--- chatd's journal\n{chatd_journal(machine, since)[-8000:]}")
                raise
        wait_until(lambda: machine.show(standby, "ActiveState") == "active", 20, f"{standby} to stand by again")
    finally:
        for client in clients:
            client.close()


def test_a_crash_loop_at_start_ends_at_the_start_limit(machine):
    """The guard against a crash loop: systemd restarts at once (RestartSec=0), yet an instance that
    fails at every start ends failed (StartLimitBurst= starts in StartLimitIntervalSec=), and
    the other serves on."""
    unit, pid = serving(machine)
    looping = other(unit)
    drop_in = f"/etc/systemd/system/{looping}.service.d/fail-at-start.conf"
    machine.run("mkdir", "-p", os.path.dirname(drop_in))
    # A crash point chatd does not know: it exits 2 at start, after Python and its imports.
    machine.run("sh", "-c", 'cat > "$1"', "sh", drop_in, input="[Service]\nEnvironment=CHATD_FAULT=no-such-point\n")
    machine.systemctl("daemon-reload")
    try:
        since = now(machine)
        began = time.monotonic()
        machine.systemctl("restart", looping, check=False)  # the standby stops; every start fails
        # Failed after each start, and restarted, until the limit (Result stays "exit-code" in 252).
        wait_until(lambda: "Start request repeated too quickly" in machine.journal(looping, since), 60,
                   f"systemd to give {looping} up")
        took = time.monotonic() - began
        assert machine.show(looping, "ActiveState") == "failed"
        starts = machine.journal(looping, since).count("CHATD_FAULT='no-such-point'")
        print(f"an instance failing at start: {starts} starts in {took:.1f} s, then given up")
        # At least the burst (more only if the starts took longer than the interval).
        assert starts >= int(machine.show(looping, "StartLimitBurst"))
        assert serving(machine) == (unit, pid)
    finally:
        machine.run("rm", "-f", drop_in)
        machine.systemctl("daemon-reload")
        machine.systemctl("reset-failed", looping)
        machine.systemctl("start", looping)
    wait_until(lambda: machine.show(looping, "ActiveState") == "active", 20, f"{looping} to stand by again")


def test_drain_ends_every_connection(machine):
    extra = pair(machine, "cid", "dan")
    reply = chatctl(machine, "drain")
    assert reply["drained"] == 4
    for client in (*machine.clients, *extra):
        assert client.line() == "BYE"
        with pytest.raises(EOFError):
            client.line()
        client.close()
    status = chatctl(machine, "status")["chatd"]
    assert status["clients"] == 0
    # Only the listening sockets (line, web), the state file and the last words are left in either holder.
    assert status["held"] == {"holderd": 4, "systemd": 4}
    # And really forgotten: a crash now restores no client.
    crash_chatd(machine)
    assert chatctl(machine, "status")["chatd"]["clients"] == 0


def test_with_holderd_chatd_and_their_fd_stores_gone_chatd_starts_again_from_its_journal_file(machine):
    """`systemctl stop chatd holderd`: both instances, holderd, and every fd store (a stop empties
    a unit's store) gone, so the connections end; chatd.service seals the journal once both
    instances are down, and the chatd that serves next starts from /var/lib/chatd/journal."""
    clients = pair(machine, "flo", "gus")
    try:
        chat(clients, ("flo", "gus"), 1)
        chat(clients, ("flo", "gus"), 2)
        assert chatctl(machine, "status")["chatd"]["journal"] == "/var/lib/chatd/journal"
        modes = machine.run("stat", "-c", "%a %U", "/var/lib/chatd", "/var/lib/chatd/journal").stdout.split("\n")
        assert modes[:2] == ["700 chatd", "600 chatd"], modes
        since = now(machine)
        machine.systemctl("stop", "chatd", "holderd")
        states = [machine.show(unit, "ActiveState") for unit in (*CHATD_UNITS, "chatd", "holderd")]
        assert set(states) == {"inactive"}, states
        for client in clients:
            with pytest.raises((EOFError, ConnectionResetError)):
                client.line()  # the last copy of each socket is gone
        assert "sealed /var/lib/chatd/journal at commit" in machine.journal("chatd", since)
        machine.systemctl("start", "chatd")
        unit, _ = wait_until(lambda: serving_other_than(machine, 0), 30, "a chatd to serve")
    finally:
        for client in clients:
            client.close()
    journal = chatd_journal(machine, since)
    assert "the holders keep nothing for chatd" in journal and "starting from /var/lib/chatd/journal" in journal, \
        journal
    status = chatctl(machine, "status")["chatd"]
    assert (status["restore"]["journal"], status["clients"]) == ("state-dir", 0), status
    assert "started from /var/lib/chatd/journal" in machine.run(CHATCTL, "status").stdout
    # Their records had no session: freed, so their nicks are free and their count starts over.
    clients = pair(machine, "flo", "gus")
    try:
        chat(clients, ("flo", "gus"), 1)
        # And the holders keep the file itself again: a crash is restored from it as before.
        crash_chatd(machine)
        chat(clients, ("flo", "gus"), 2)
        assert chatctl(machine, "status")["chatd"]["restore"]["journal"] == "held"
    finally:
        for client in clients:
            client.close()


def test_ten_thousand_idle_connections_survive_a_crash(machine):
    count = 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    clients = []
    try:
        for _ in range(count):
            clients.append(LineClient(machine.port, timeout=30))
        wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] == count, 60, f"{count} clients")
        wait_until(lambda: sum(row["held"] for row in chatctl(machine, "clients")) == count, 60, "all held")
        gap = crash_chatd(machine)
        print(f"crash to restored, by the standby, with {count} idle clients: {gap} ms")
        assert chatctl(machine, "status")["chatd"]["clients"] == count
        for index, client in enumerate(clients):
            client.send(f"NICK idle{index}")
        for index, client in enumerate(clients):
            assert client.line() == f"OK NICK idle{index}"
    finally:
        for client in clients:
            client.close()


def test_security_exposure_is_low(machine):
    for unit in ("holderd", "chatd@1", "chatd"):
        out = machine.run("systemd-analyze", "security", "--no-pager", f"{unit}.service").stdout
        score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
        print(f"systemd-analyze security {unit}.service: {score}")
        assert score <= 2.0, out  # issue 16: at most 2.0


def test_pairs_streaming_through_chatctl_crashes_lose_nothing(machine):
    """The zero-loss fault test once more, under the real systemd: chatctl crash, systemd
    restarts chatd, the restored chatd finishes what was in flight."""
    before = sum(restarts(machine, unit) for unit in CHATD_UNITS)

    def crash(rng):
        crash_chatd(machine)  # the standby serves, and the crashed unit stands by again

    # systemd allows 20 starts a unit in 10 s (StartLimitBurst); the two units take turns.
    tally = soak.run(machine.port, pairs=20, crashes=25, crash=crash, interval=(0.2, 0.6))
    print("fault test under systemd:", tally.row())
    assert tally.crashes == 25 and sum(restarts(machine, unit) for unit in CHATD_UNITS) == before + 25
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent > 1000


def test_two_crashes_in_a_row_lose_nothing(machine):
    """The serving chatd crashes, and the one taking over crashes too before systemd has
    restarted the first: both in one ``systemctl kill`` (before the lease reaches the second),
    the second the moment ``chatctl crash`` returns (in or just after its takeover), or the
    moment it relays a message (it serves). systemd restarts both; the one granted the lease
    restores from holderd and its unit's fd store. Every message once, n counting on, every
    connection kept, both units active again with new processes, one restart each a round."""
    since = now(machine)
    clients_before = chatctl(machine, "status")["chatd"]["clients"]
    probe = pair(machine, "pia", "pip")  # tells the moment a chatd serves: it relays
    ways = ("both at once", "once chatctl crash returns", "once it relays")
    relayed, landed, gaps = [], [], []

    def crash_twice(rng):
        way = ways[len(relayed) % len(ways)]
        first, first_pid = serving(machine)
        second = other(first)
        second_pid = main_pid(machine, second)
        before = {unit: restarts(machine, unit) for unit in CHATD_UNITS}
        round_since = now(machine)
        if way == "both at once":
            machine.systemctl("kill", "--kill-whom=main", "--signal=SIGSEGV", f"{first}.service", f"{second}.service")
        else:
            chatctl(machine, "crash")
            if way == "once it relays":
                probe[0].send(f"MSG {len(relayed) + 1}")
                assert probe[1].line() == f"FROM pia {len(relayed) + 1} {len(relayed) + 1}"
            machine.systemctl("kill", "--kill-whom=main", "--signal=SIGSEGV", f"{second}.service")
        wait_active(machine, first, first_pid)
        wait_active(machine, second, second_pid)
        wait_until(lambda: serving_other_than(machine, first_pid), 30, "a chatd to serve")
        # The first death to the restore by the chatd serving now: its unit's first "restored" after
        # the second death (journald may get the line a moment after the unit is active).
        serving_unit, _ = serving(machine)

        def its_restore_logged():
            entries = machine.journal_entries("chatd@*", round_since)
            deaths = [stamp for stamp, _, message in entries if "Main process exited" in message]
            restored = next((stamp for stamp, unit, message in entries if len(deaths) == 2 and stamp > deaths[1]
                             and unit == serving_unit and "restored " in message), None)
            return (deaths, restored, entries) if restored is not None else None

        deaths, restored, entries = wait_until(its_restore_logged, 30, "the restore of the chatd serving now, logged")
        gaps.append(round((restored - deaths[0]) * 1000))
        assert {unit: restarts(machine, unit) for unit in CHATD_UNITS} == {unit: n + 1 for unit, n in before.items()}
        said = "\n".join(message for stamp, unit, message in entries
                         if unit == second and stamp < deaths[1] and "Main process exited" not in message)
        landed.append(f"{way}: " + ("after its restore" if "restored " in said else
                                    "in its restore" if "granted the lease" in said else "before the lease"))
        if way != "once it relays":
            probe[0].send(f"MSG {len(relayed) + 1}")
            assert probe[1].line() == f"FROM pia {len(relayed) + 1} {len(relayed) + 1}"
        relayed.append(way)

    try:
        tally = soak.run(machine.port, pairs=10, crashes=6, crash=crash_twice, interval=(0.2, 0.5))
        print("two crashes in a row under systemd:", tally.row(), "; the second crash landed:", "; ".join(landed),
              "; first death -> restored by a restarted unit:", ", ".join(f"{ms} ms" for ms in gaps))
        assert tally.crashes == 6 and tally.problems() == 0, (tally.row(), tally.notes)
        assert tally.received == tally.sent > 300
        journal = chatd_journal(machine, since)
        assert journal.count("status=11/SEGV") == 12, journal
        assert "crashed-server" not in journal and "ERROR" not in journal, journal
        # The soak's clients have closed: the probe's two are the ones left besides those before.
        wait_until(lambda: chatctl(machine, "status")["chatd"]["clients"] == clients_before + 2, 30,
                   "the soak's connections to close")
        probe[1].send("MSG back")
        assert probe[0].line() == "FROM pip 1 back"
    finally:
        for client in probe:
            client.close()


def test_the_readme_upgrade_hands_over_with_pairs_streaming_and_loses_nothing(machine, wheels):
    """README, Upgrading: the new release installed over the running one (scripts/provision
    with --no-selftest), then chatctl upgrade, twice, while pairs stream and ann and bob chat:
    every message once, n counting on, no restart counted as a failure, every process new."""
    before = {unit: main_pid(machine, unit) for unit in CHATD_UNITS}
    since = now(machine)
    upgrades = []
    clients = pair(machine, "eve", "fay")

    def upgrade(rng):
        machine.run("bash", str(REPO / "scripts" / "provision"), "--source", str(REPO), "--wheels", str(wheels),
                    "--no-selftest", timeout=600)
        pids = {unit: main_pid(machine, unit) for unit in CHATD_UNITS}
        report = chatctl(machine, "upgrade")
        assert report["ok"] and len(report["steps"]) == 3, report
        upgrades.append(report["handover_milliseconds"])
        assert all(main_pid(machine, unit) not in (0, pids[unit]) for unit in CHATD_UNITS)

    tally = soak.run(machine.port, pairs=5, crashes=2, crash=upgrade, interval=(0.5, 1.0))
    print("upgrades under systemd:", tally.row(), "; handover -> serving:", upgrades, "ms")
    assert tally.crashes == 2 and tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent > 100
    assert all(main_pid(machine, unit) not in (0, pid) for unit, pid in before.items())
    journal = chatd_journal(machine, since)
    assert journal.count("handed over to the standby") == 2, journal
    assert "died while handling its command" not in journal, journal
    # The one that handed over exited 0: not a failure, so systemd restarted nothing by itself.
    assert "Scheduled restart job" not in journal and "status=" not in journal, journal
    try:
        chat(clients, ("eve", "fay"), 1)
    finally:
        for client in clients:
            client.close()


def test_a_browser_chats_on_through_chatctl_crashes_without_noticing(machine):
    """The browser test once more under the real systemd: two Chromium pages, two crashes."""
    import shutil

    if not shutil.which("chromium"):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); scripts/test installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"])
        pages = []
        for nick, peer in (("wanda", "wilma"), ("wilma", "wanda")):
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{machine.http_port}/")
            page.wait_for_function("window.chat.opens === 1")
            page.fill("#nick", nick)
            page.click("#nick-form button")
            page.fill("#peer", peer)
            page.click("#pair-form button")
            pages.append(page)
        for page, peer in zip(pages, ("wilma", "wanda")):
            page.wait_for_function(f"window.chat.paired === {peer!r}")
        for round_number in range(3):
            if round_number:
                crash_chatd(machine)
            pages[0].fill("#text", f"round {round_number}")
            pages[0].click("#send")
            pages[1].wait_for_function(f"window.chat.messages.length === {round_number + 1}")
        assert [(m["n"], m["text"]) for m in pages[1].evaluate("window.chat.messages")] == [
            (1, "round 0"), (2, "round 1"), (3, "round 2")]
        assert [page.evaluate("window.chat.closes") for page in pages] == [0, 0]
        browser.close()


def nats_secrets_of(machine, tmp_path, host: str) -> tuple[str, str]:
    """Host ``host``'s key and the CA that provision made in the container, copied out (as an
    operator copies them to that host): (creds, ca) paths."""
    paths = []
    for name, inside in ((f"{host}.nk", f"/etc/chatd-nats/hosts/{host}.nk"), ("ca.pem", "/etc/chatd-nats/ca.pem")):
        path = tmp_path / name
        path.write_text(machine.run("cat", inside).stdout)
        path.chmod(0o600)
        paths.append(str(path))
    return paths[0], paths[1]


#: The port `provision --nats` gives nats-server (the container shares the host's network: not
#: Debian's 4222, which something else on the machine may hold); the next test's chatd joins it.
NATS_PORT = free_port()
NATS_URL = f"nats://127.0.0.1:{NATS_PORT}"


def test_provision_nats_runs_jetstream_that_systemd_restarts_with_its_store(machine, wheels, tmp_path):
    """`scripts/provision --nats`: Debian's nats-server with the drop-in, JetStream on, its store
    in /var/lib/nats-server, secured (TLS, a key per host: a stranger is refused); killed, systemd
    starts it again and the stream still holds what it did."""
    import asyncio

    nats = pytest.importorskip("nats")
    from chatd.bus.access import connect_options

    result = machine.run(
        "bash", str(REPO / "scripts" / "provision"), "--source", str(REPO), "--wheels", str(wheels), "--nats",
        "--nats-hosts", "box,out", "--nats-port", str(NATS_PORT), "--no-selftest", "--chatd-options",
        f"--port {machine.port} --http-port {machine.http_port} --metrics-port {machine.metrics_port}",
        check=False, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert machine.show("nats-server", "ActiveState") == "active", machine.journal("nats-server")[-3000:]
    assert "/var/lib/nats-server" in machine.show("nats-server", "ExecStart")
    machine.run(f"{PREFIX}/bin/python", "-c", "import nats")  # chatd --cluster's client is installed
    box = connect_options("box", *nats_secrets_of(machine, tmp_path, "box"))

    async def stranger_refused() -> str:
        try:
            await (await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)).close()
        except Exception as exc:
            return str(exc)
        return "connected"

    assert "CERTIFICATE_VERIFY_FAILED" in asyncio.run(stranger_refused()), "provisioned NATS is TLS only"

    async def publish_then_count(publish: bool) -> int:
        client = await nats.connect(NATS_URL, connect_timeout=5, max_reconnect_attempts=0, **box)
        try:
            stream = client.jetstream(timeout=5)
            if publish:  # the stream chatd makes, as a host may: its permissions allow no other
                await stream.add_stream(name="CHATD", subjects=["chat.>"], storage="file", duplicate_window=600)
                await stream.publish("chat.nobody.provisioned", b"kept")
            return (await stream.stream_info("CHATD")).state.messages
        finally:
            await client.close()

    assert asyncio.run(publish_then_count(True)) == 1
    before, pid = restarts(machine, "nats-server"), main_pid(machine, "nats-server")
    machine.run("systemctl", "kill", "--signal=SIGKILL", "nats-server")
    wait_active(machine, "nats-server", pid)
    assert restarts(machine, "nats-server") == before + 1

    def counted():
        try:
            return asyncio.run(publish_then_count(False))
        except Exception:
            return None

    assert wait_until(counted, 20, "nats-server to answer again") == 1, "the store outlived the crash"
    assert chatctl(machine, "status")["chatd"]["ok"], "chatd serves on"


def test_a_cluster_host_under_systemd_pairs_with_another_host_through_its_crashes(machine, tmp_path):
    """chatd@ with --cluster under the real systemd (host "box", the JetStream the last test
    provisioned), paired with a host outside the container ("out", its own holderd and
    journal): `chatctl crash` of the serving chatd, the standby takes over, n counts on."""
    pytest.importorskip("nats")
    from ctl.launch import Launcher

    machine.run("systemctl", "stop", "chatd", "holderd")  # the fd stores go: a fresh start, with outboxes
    options = (f"--port {machine.port} --http-port {machine.http_port} --cluster {NATS_URL} "
               "--host-id box --host-lease 30 --nats-creds /etc/chatd-nats/hosts/box.nk --nats-ca /etc/chatd-nats/ca.pem "
               f"--metrics-port {machine.metrics_port}")
    machine.run("sh", "-c", f"echo 'CHATD_OPTIONS={options}' > /etc/default/chatd")
    machine.run("systemctl", "start", "chatd")
    # `systemctl start chatd` returns before an instance serves (chatd@ is ordered after it).
    wait_until(lambda: serving_other_than(machine, 0) and
               (chatctl(machine, "status")["chatd"].get("cluster") or {}).get("connected"), 30,
               "the box host to join the cluster")
    with Launcher() as out:
        out.start_holderd()
        creds, ca = nats_secrets_of(machine, tmp_path, "out")
        out.start_chatd("--cluster", NATS_URL, "--host-id", "out", "--host-lease", "30",
                        "--nats-creds", creds, "--nats-ca", ca)
        ann = LineClient(machine.port, timeout=15)
        bob = LineClient(out.port, timeout=15)
        ann.send("NICK ann2", "PAIR bob2")
        bob.send("NICK bob2", "PAIR ann2")
        assert ann.lines(3) == ["OK NICK ann2", "OK PAIR bob2", "PAIRED bob2"]
        assert bob.lines(3) == ["OK NICK bob2", "OK PAIR ann2", "PAIRED ann2"]
        for n in (1, 2, 3):
            if n > 1:
                crash_chatd(machine)
            ann.send(f"MSG across {n}")
            assert bob.line() == f"FROM ann2 {n} across {n}"
            bob.send(f"MSG back {n}")
            assert ann.line() == f"FROM bob2 {n} back {n}"
        status = chatctl(machine, "status")["chatd"]["cluster"]
        assert status["host"] == "box" and "out" in status["hosts_alive"], status
        ann.close()
        bob.close()


@pytest.fixture
def previous_machine(wheels, tmp_path):
    """A container of its own, installed and started with the previous release (CHANGELOG's, out
    of git history, its whole tree: its own scripts/provision, units and pyproject), as the
    machine an operator upgrades. Fails, never skips, where the history lacks it."""
    version, tree = previous_release(tmp_path / "previous", parts=())
    tree.chmod(0o755)
    port, http_port = free_port(), free_port()
    with BootedSystemd(binds=[str(REPO), str(tree), str(wheels)], boot_timeout=90) as container:
        container.port, container.http_port, container.version = port, http_port, version
        result = container.run(
            "bash", str(tree / "scripts" / "provision"), "--source", str(tree), "--wheels", str(wheels),
            "--no-selftest", "--chatd-options", f"--port {port} --http-port {http_port}", check=False, timeout=600,
        )
        if result.returncode != 0:
            journal = container.run("journalctl", "--no-pager", "-n", "200", check=False).stdout
            pytest.fail(f"provisioning {version} failed:\n{result.stdout}\n{result.stderr}\n--- journal ---\n{journal}")
        for unit in CHATD_UNITS:
            wait_until(lambda: container.show(unit, "ActiveState") == "active", 30, f"{version}'s {unit} to start")
        yield container


def test_the_readme_upgrade_from_the_previous_release_loses_nothing(previous_machine, wheels):
    """README, Upgrading, from a release without `chatctl upgrade`, under the real systemd: on a
    machine provisioned with the previous release, while pairs stream and ann and bob chat, this
    release is installed (scripts/provision --no-selftest), the standby instance restarted, then
    the serving one, then holderd, then `chatctl upgrade` on the new release: every message once,
    n counting on, every unit running the new code, none failed, holderd holding everything."""
    machine = previous_machine
    before = {unit: main_pid(machine, unit) for unit in (*CHATD_UNITS, "holderd")}
    since = now(machine)
    clients = pair(machine, "ann", "bob")
    chat(clients, ("ann", "bob"), 1)
    n = 1

    def install_then_restart_the_standby():
        machine.run("bash", str(REPO / "scripts" / "provision"), "--source", str(REPO), "--wheels", str(wheels),
                    "--no-selftest", timeout=600)
        # Installing changes nothing that runs: the previous release still serves.
        unit, pid = serving(machine)
        assert main_pid(machine, other(unit)) == before[other(unit)], "installing restarted a chatd"
        machine.systemctl("restart", other(unit))
        wait_active(machine, other(unit), before[other(unit)])

    def restart_the_serving_one():
        unit, pid = serving(machine)
        assert pid == before[unit], "the previous release's chatd should still serve"
        step_since = now(machine)
        machine.systemctl("restart", unit)
        wait_until(lambda: serving_other_than(machine, pid), 30, "the new release's standby to serve")
        wait_active(machine, unit, pid)
        # The previous release has no handover: its SIGTERM stops it, and the standby takes over.
        gaps.append(takeover_gap_ms(machine, step_since, end="SIGTERM: stopping"))

    def restart_holderd():
        machine.systemctl("restart", "holderd")
        wait_active(machine, "holderd", before["holderd"])
        wait_until(lambda: all(row["held"] for row in chatctl(machine, "clients")), 20,
                   "holderd to hold every client again")

    def upgrade():
        report = chatctl(machine, "upgrade")
        assert report["ok"] and len(report["steps"]) == 3, report
        gaps.append(report["handover_milliseconds"])

    gaps = []  # ms: the previous release's SIGTERM to the restore; the new release's handover
    steps = [install_then_restart_the_standby, restart_the_serving_one, restart_holderd, upgrade]
    done = []

    def step(rng):
        nonlocal n
        steps[len(done)]()
        done.append(steps[len(done)].__name__)
        n += 1
        chat(clients, ("ann", "bob"), n)

    try:
        tally = soak.run(machine.port, pairs=5, crashes=len(steps), crash=step, interval=(0.5, 1.0))
        print(f"upgrade from {machine.version} under systemd:", tally.row(),
              f"; {machine.version}'s SIGTERM -> restored, then chatctl upgrade's handover: {gaps} ms")
        assert done == [s.__name__ for s in steps]
        assert tally.problems() == 0, (tally.row(), tally.notes)
        assert tally.received == tally.sent > 100
        chat(clients, ("ann", "bob"), n + 1)
        # holderd, restarted on the new release, holds what chatd holds: ann and bob included.
        status = chatctl(machine, "status")["chatd"]
        rows = chatctl(machine, "clients")
        assert status["clients"] == len(rows) >= 2 and all(row["held"] for row in rows), rows
        assert status["held"]["holderd"] == status["held"]["systemd"], status
    finally:
        for client in clients:
            client.close()
    for unit in (*CHATD_UNITS, "holderd"):
        assert main_pid(machine, unit) not in (0, before[unit]), f"{unit} still runs {machine.version}"
    states = {unit: machine.show(unit, "ActiveState") for unit in ("chatd", *CHATD_UNITS, "holderd")}
    assert set(states.values()) == {"active"}, states
    failed = machine.systemctl("list-units", "--failed", "--plain", "--no-legend", "chatd*", "holderd*").stdout
    assert failed.strip() == "", failed
    report = chatctl(machine, "status")
    roles = sorted(row["role"] for row in report["instances"])
    assert roles == ["serving", "standby"], report  # instance sockets: the new release's chatd, both
    journal = chatd_journal(machine, since)
    assert "handed over to the standby" in journal and "died while handling its command" not in journal, journal
    assert " ERROR " not in journal and "nothing to restore" not in journal, journal
    assert "took back" in machine.journal("holderd", since), machine.journal("holderd", since)
