"""The warm standby: two chatd take turns on holderd's lease; killing the one serving hands
its clients to the other at once, and a restarted one becomes the next standby."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time

from chatd.control import instance_socket
from ctl import control
from ctl.launch import wait_for_answer, wait_until
from helpers import serving_pid
from ctl.probe import LineClient
from testkit import soak


#: Clients that only stay connected, for the standby to restore besides a chatting pair.
IDLE_CLIENTS = 300


def streamed_exactly_once(tally, crashes: int, more_than: int) -> None:
    """Every crash (or handover) happened, enough was sent, and every message arrived once."""
    assert tally.crashes == crashes and tally.sent > more_than
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


def start_lease_chatd(procs, standby: bool, instance: str):
    """A chatd with --lease; wait until it answers on its own socket in the role it should take
    (and, serving, on the well-known one too)."""
    proc = procs.spawn("chatd", "chatd", "--port", str(procs.port or 0), "--http-port", str(procs.http_port or 0),
                       "--control", procs.control_socket,
                       "--holder", procs.holder_socket, "--lease", "--instance", instance)
    path = instance_socket(procs.control_socket, instance)
    status = wait_for_answer(proc, lambda: control.call("status", path), 15, "chatd")
    assert status["role"] == ("standby" if standby else "serving"), status
    assert status["instance"] == instance
    if not standby:
        assert control.call("status", procs.control_socket)["pid"] == proc.pid
        procs.port, procs.http_port = status["port"], status["http_port"]
    return proc


class TakingTurns:
    """Two chatd --lease taking turns as systemd runs chatd@1 and chatd@2: once the serving one
    has stopped (killed, handed over), :meth:`swap` starts the same instance again, which stands
    by, and the one that was standing by is the one serving."""

    def __init__(self, procs, serving=None):
        self.procs = procs
        self.serving = serving or start_lease_chatd(procs, standby=False, instance="1")
        self.standby = start_lease_chatd(procs, standby=True, instance="2")
        self._names = {self.serving.pid: "1", self.standby.pid: "2"}

    def swap(self) -> None:
        # The same instance again, whose socket file the one stopped left.
        done = self._names.pop(self.serving.pid)
        self.serving, self.standby = self.standby, start_lease_chatd(self.procs, standby=True, instance=done)
        self._names[self.standby.pid] = done

    def start_both_again(self) -> None:
        """Once both have died (the one serving, then the one taking over): what systemd's two
        restarts do. The instance that died first starts again and serves, restoring what holderd
        keeps; the other stands by behind it."""
        first, second = self._names.pop(self.serving.pid), self._names.pop(self.standby.pid)
        self.serving = start_lease_chatd(self.procs, standby=False, instance=first)
        self.standby = start_lease_chatd(self.procs, standby=True, instance=second)
        self._names = {self.serving.pid: first, self.standby.pid: second}


def test_the_standby_serves_the_moment_the_server_dies_and_the_roles_swap(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    turns = TakingTurns(procs, serving)
    gaps = []
    for round_number in range(3):
        killed_at = time.monotonic()
        turns.serving.send_signal(signal.SIGKILL)
        a.send(f"MSG round {round_number}")
        assert b.line() == f"FROM A {round_number + 2} round {round_number}"
        gaps.append((time.monotonic() - killed_at) * 1000)
        assert turns.serving.wait(10) == -signal.SIGKILL
        status = control.call("status", procs.control_socket)
        assert status["pid"] == turns.standby.pid and status["role"] == "serving" and status["clients"] == 2
        turns.swap()  # what systemd's restart does
    print("kill -> relayed with the standby:", ", ".join(f"{gap:.0f} ms" for gap in gaps))
    assert "granted the lease: taking over" in procs.logs()


def test_a_standby_never_serves_beside_a_live_server_when_holderd_restarts(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    standby = start_lease_chatd(procs, standby=True, instance="2")
    procs.holderd.send_signal(signal.SIGKILL)  # no systemd here: holderd comes back empty,
    procs.holderd.wait(10)                      # and remembers no lease
    procs.start_holderd()
    time.sleep(1.5)
    assert control.call("status", procs.control_socket)["pid"] == serving.pid
    assert control.call("status", instance_socket(procs.control_socket, "2"))["role"] == "standby"
    a.send("MSG still one server")
    assert b.line() == "FROM A 1 still one server"
    assert standby.poll() is None and serving.poll() is None
    assert "ERROR" not in procs.logs(), procs.logs()


def hand_over(procs, serving, standby) -> float:
    """``chatctl handover`` on the serving chatd: it must exit 0 and the standby serve; the
    milliseconds from the request until the standby answers at the well-known socket."""
    asked_at = time.monotonic()
    reply = control.call("handover", procs.control_socket)
    assert reply["pid"] == serving.pid and reply["standby"]["pid"] == standby.pid, reply
    wait_until(lambda: serving_pid(procs) == standby.pid, 15, "the standby to serve")
    took = (time.monotonic() - asked_at) * 1000
    assert serving.wait(10) == 0
    return took


def chatctl(procs, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl", "--control", procs.control_socket, *argv],
                          capture_output=True, text=True, timeout=60, env=procs.env)


def test_a_handover_passes_every_client_to_the_standby_and_exits_0(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    refused = chatctl(procs, "handover")
    assert refused.returncode == 1 and "no chatd stands by" in refused.stderr, refused
    a.send("MSG still served")
    assert b.line() == "FROM A 2 still served"
    turns = TakingTurns(procs, serving)
    for round_number in range(3):
        if round_number == 0:  # as an operator does it
            done = chatctl(procs, "handover")
            assert done.returncode == 0 and f"(pid {turns.standby.pid}), which serves after" in done.stdout, done
            assert turns.serving.wait(10) == 0
        else:
            hand_over(procs, turns.serving, turns.standby)
        a.send(f"MSG round {round_number}")
        assert b.line() == f"FROM A {round_number + 3} round {round_number}"
        b.send(f"MSG back {round_number}")
        assert a.line() == f"FROM B {round_number + 1} back {round_number}"
        status = control.call("status", procs.control_socket)
        assert status["clients"] == 2 and status["pairs"] == 1
        turns.swap()  # what `chatctl upgrade` does under systemd: the instance that handed over starts again
    logs = procs.logs()
    assert "handed over to the standby" in logs and "died while handling its command" not in logs, logs
    assert "ERROR" not in logs, logs


def test_pairs_streaming_through_handovers_lose_nothing(procs):
    """Every message exactly once, n counting on, every pair kept, no connection dropped,
    while the serving chatd hands over again and again, as ``chatctl upgrade`` makes it."""
    procs.start_holderd()
    turns = TakingTurns(procs)
    took = []

    def hand_over_and_restart(rng):
        took.append(hand_over(procs, turns.serving, turns.standby))
        turns.swap()

    tally = soak.run(procs.port, pairs=10, crashes=8, crash=hand_over_and_restart, interval=(0.1, 0.4))
    print("handovers:", tally.row(), "; request -> serving:", ", ".join(f"{ms:.0f} ms" for ms in took))
    streamed_exactly_once(tally, 8, more_than=500)
    logs = procs.logs()
    assert logs.count("handed over to the standby") == 8 and "died while handling its command" not in logs
    assert "ERROR" not in logs, logs


def test_the_gap_of_a_handover_against_a_crash_in_one_run(procs):
    """The gap a pair sees, from the kill or the handover request to A's next message relayed
    to B, with a few hundred idle clients to restore besides; printed for the README."""
    procs.start_holderd()
    turns = TakingTurns(procs)
    a, b = procs.pair()
    idle = [socket.create_connection(("127.0.0.1", procs.port)) for _ in range(IDLE_CLIENTS)]
    try:
        wait_until(lambda: control.call("status", procs.control_socket)["clients"] == IDLE_CLIENTS + 2, 15,
                   "the idle clients to be served")
        gaps = {"kill": [], "handover": []}
        sent = 0
        for round_number in range(6):
            way = "kill" if round_number % 2 == 0 else "handover"
            serving, standby = turns.serving, turns.standby
            began = time.monotonic()
            if way == "kill":
                serving.send_signal(signal.SIGKILL)
            else:
                control.call("handover", procs.control_socket)
            a.send(f"MSG after {way}")
            sent += 1
            assert b.line() == f"FROM A {sent} after {way}"
            gaps[way].append((time.monotonic() - began) * 1000)
            assert serving.wait(10) == (-signal.SIGKILL if way == "kill" else 0)
            wait_until(lambda: serving_pid(procs) == standby.pid, 15, "the standby to serve")
            assert control.call("status", procs.control_socket)["clients"] == IDLE_CLIENTS + 2
            turns.swap()
        # And without a standby, as an upgrade by restarting would be: stop, start, restore.
        turns.standby.send_signal(signal.SIGTERM)
        assert turns.standby.wait(10) == 0
        began = time.monotonic()
        turns.serving.send_signal(signal.SIGTERM)
        assert turns.serving.wait(10) == 0
        procs.spawn("chatd", "chatd", "--port", str(procs.port), "--http-port", str(procs.http_port),
                    "--control", procs.control_socket, "--holder", procs.holder_socket, "--lease", "--instance", "1")
        a.send("MSG after a restart")
        assert b.line() == f"FROM A {sent + 1} after a restart"
        gaps["restart"] = [(time.monotonic() - began) * 1000]
    finally:
        for sock in idle:
            sock.close()
    print(f"with {IDLE_CLIENTS + 2} clients, ms until the next message is relayed:",
          "; ".join(f"{way} {', '.join(f'{ms:.0f}' for ms in taken)}" for way, taken in gaps.items()))
    assert "died while handling its command" not in procs.logs()


def test_sigterm_of_the_serving_chatd_is_a_planned_handover_with_pairs_streaming(procs):
    """What `systemctl restart chatd@N` sends the serving instance: SIGTERM, while the other stands
    by, hands over at the end of the loop turn, exit 0, every message exactly once."""
    procs.start_holderd()
    turns = TakingTurns(procs)
    took = []

    def terminate_and_restart(rng):
        serving, standby = turns.serving, turns.standby
        began = time.monotonic()
        serving.send_signal(signal.SIGTERM)
        wait_until(lambda: serving_pid(procs) == standby.pid, 15, "the standby to serve")
        took.append((time.monotonic() - began) * 1000)
        assert serving.wait(10) == 0
        turns.swap()  # what systemd's restart does: the same instance again

    tally = soak.run(procs.port, pairs=10, crashes=6, crash=terminate_and_restart, interval=(0.1, 0.4))
    print("SIGTERM handovers:", tally.row(), "; SIGTERM -> serving:", ", ".join(f"{ms:.0f} ms" for ms in took))
    streamed_exactly_once(tally, 6, more_than=300)
    logs = procs.logs()
    assert logs.count("SIGTERM: a planned handover") == 6, logs
    assert logs.count("handed over to the standby") == 6 and "died while handling its command" not in logs, logs
    assert "SIGTERM: stopping" not in logs and "ERROR" not in logs, logs


def test_sigterm_with_no_standby_stops_and_holderd_keeps_the_clients_for_the_next_chatd(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    # The standby's SIGTERM stops it at once, as before; the one serving goes on.
    standby = start_lease_chatd(procs, standby=True, instance="2")
    standby.send_signal(signal.SIGTERM)
    assert standby.wait(10) == 0
    assert "SIGTERM: stopping" in procs.logs()
    a.send("MSG two")
    assert b.line() == "FROM A 2 two"
    # Nobody stands by: the serving chatd stops (after its turn), exit 0, the clients held.
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(10) == 0
    logs = procs.logs()
    assert "no chatd stands by to take over" in logs and "stopping at the end of this turn" in logs, logs
    assert "handed over" not in logs, logs
    a.send("MSG while nobody serves")
    restarted = start_lease_chatd(procs, standby=False, instance="1")
    assert b.line() == "FROM A 3 while nobody serves"
    b.send("MSG back")
    assert a.line() == "FROM B 1 back"
    assert control.call("status", procs.control_socket)["clients"] == 2
    assert restarted.poll() is None
    assert "died while handling its command" not in procs.logs() and "ERROR" not in procs.logs(), procs.logs()


def named_clients(procs, prefix: str, count: int) -> list[LineClient]:
    clients = [LineClient(procs.port, timeout=10) for _ in range(count)]
    for index, client in enumerate(clients):
        client.send(f"NICK {prefix}{index}")
    for index, client in enumerate(clients):
        assert client.line() == f"OK NICK {prefix}{index}"
    return clients


def standby_ready(procs, instance: str, clients: int) -> dict:
    """Wait until the standby has read every client's record ahead (chatd.prepared)."""
    path = instance_socket(procs.control_socket, instance)

    def ready():
        prepared = control.call("status", path)["prepared"]
        return prepared if prepared and prepared["records"] == clients else None

    return wait_until(ready, 20, f"the standby to have read {clients} records ahead")


def test_the_standby_reads_ahead_as_clients_come_and_go_and_takes_over_with_what_is_current(procs):
    """The standby reads the bundles and records while it waits; clients leave (bundles are
    rebuilt), come, and change nicks right before the kill: the takeover serves exactly the
    clients there are, with the nicks they have, whatever the standby had read."""
    procs.start_holderd()
    turns = TakingTurns(procs)
    a, b = procs.pair()
    old = named_clients(procs, "old", 240)
    first = standby_ready(procs, "2", 242)
    assert first["sockets"] >= 242, first
    for client in old[:180]:  # enough to rebuild every bundle they were in
        client.send("QUIT")
        assert client.line() == "BYE"
        client.close()
    stay = old[180:]
    new = named_clients(procs, "new", 30)
    wait_until(lambda: control.call("status", procs.control_socket)["clients"] == 2 + 60 + 30, 15, "the 180 to leave")
    # The standby holds a socket only for a client there is: no more fds than the server spends.
    wait_until(lambda: control.call("status", instance_socket(procs.control_socket, "2"))["prepared"]["sockets"]
               == 2 + 60 + 30, 15, "the standby to let go of the sockets of the clients that left")
    for index, client in enumerate(stay[:20]):  # committed after the standby's last read, perhaps
        client.send(f"NICK renamed{index}")
        assert client.line() == f"OK NICK renamed{index}"
    turns.serving.send_signal(signal.SIGKILL)
    a.send("MSG after")
    assert b.line() == "FROM A 1 after"
    status = control.call("status", procs.control_socket)
    assert status["pid"] == turns.standby.pid and status["clients"] == 2 + 60 + 30, status
    probe = LineClient(procs.port, timeout=10)
    for nick, answer in (("renamed3", "ERR nick-taken"), ("old183", "OK NICK old183"),  # renamed: old name free
                         ("old210", "ERR nick-taken"), ("old239", "ERR nick-taken"), ("new7", "ERR nick-taken"),
                         ("old5", "OK NICK old5")):  # left: its nick is free
        probe.send(f"NICK {nick}")
        assert probe.line().startswith(answer), nick
    for client in stay + new:
        client.send("PING")
    for client in stay + new:
        assert client.line() == "PONG", "every client still there answers"
    wait_until(lambda: control.call("status", procs.control_socket)["adopting"] == 0, 15, "every client adopted")
    assert control.call("status", procs.control_socket)["restore"]["all_adopted_ms"] is not None


def test_a_socket_with_input_is_served_at_once_and_the_idle_ones_in_the_next_turns(procs):
    procs.start_holderd()
    procs.start_chatd()
    idle = named_clients(procs, "idle", 200)
    procs.kill_chatd(signal.SIGKILL)
    idle[7].send("NICK early")  # waits in the kernel while no chatd serves
    procs.start_chatd("--restore")
    assert idle[7].line() == "OK NICK early"
    restore = procs.control("status")["restore"]
    assert restore["clients"] == 200 and restore["adopted_at_once"] == 1, restore
    wait_until(lambda: procs.control("status")["adopting"] == 0, 15, "every client adopted")
    assert procs.control("status")["restore"]["all_adopted_ms"] is not None
    for index, client in enumerate(idle):
        client.send(f"NICK again{index}")
    for index, client in enumerate(idle):
        assert client.line() == f"OK NICK again{index}"


GRANTED = re.compile(r"granted the lease: taking over")
RESTORED = re.compile(r"restored \d+ clients? and \d+ pairs?")  # serving; the idle still to adopt
ADOPTED = re.compile(r"all \d+ clients? adopted")  # every restored socket served
#: When the chatd taking over dies too: once its log has the line (None: at once after the
#: first kill), and this many milliseconds later. The lease reaches it some 10-20 ms after the
#: kill, and its restore of 320 clients takes some 10-60 ms here: so before the lease, in the
#: restore (at its start, in its middle), while it adopts the idle, and after; none of it asserted.
SECOND_DEATHS = ((None, 0), (None, 2), (None, 5), (None, 20), (None, 100),
                 (GRANTED, 0), (GRANTED, 10), (RESTORED, 0), (ADOPTED, 0))


def wait_for_log(procs, proc, line: re.Pattern, timeout: float = 15.0) -> None:
    """Return the moment ``proc``'s log has ``line`` (polled every half millisecond)."""
    deadline = time.monotonic() + timeout
    seen = ""
    with open(procs.log_path(proc), errors="replace") as log:
        while not line.search(seen):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"chatd pid {proc.pid} never logged {line.pattern!r}: {seen}")
            seen += log.read()
            time.sleep(0.0005)


def where_the_second_death_landed(log: str) -> str:
    if ADOPTED.search(log):
        return "after it adopted every client"
    if RESTORED.search(log):
        return "while it adopted the idle"
    if GRANTED.search(log):
        return "in its restore"
    return "before the lease reached it"


def test_a_second_crash_in_the_middle_of_the_takeover_loses_nothing(procs):
    """The serving chatd is killed, then the standby taking over is killed too: before the lease
    reaches it, in its restore, while it adopts the idle clients, or after; before any chatd
    stands by. The next one started (as systemd restarts the first unit) restores from what
    holderd keeps. Every message exactly once, in order, ``n`` counting on, every pair kept and
    no connection dropped, idle clients included, wherever the second death landed (printed;
    the timing is not asserted)."""
    procs.start_holderd()
    turns = TakingTurns(procs)
    idle = [socket.create_connection(("127.0.0.1", procs.port)) for _ in range(IDLE_CLIENTS)]
    pairs = 10
    landed = []
    plans = iter(SECOND_DEATHS)

    def crash_twice(rng):
        first, second = turns.serving, turns.standby
        logged, milliseconds = next(plans)
        first.send_signal(signal.SIGKILL)
        if logged is not None:
            wait_for_log(procs, second, logged)
        time.sleep(milliseconds / 1000)
        second.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL and second.wait(10) == -signal.SIGKILL
        with open(procs.log_path(second), errors="replace") as log:
            when = f"{logged.pattern.split(' ')[0]!r} + {milliseconds} ms" if logged else f"+{milliseconds} ms"
            landed.append(f"{when}: {where_the_second_death_landed(log.read())}")
        turns.start_both_again()

    try:
        wait_until(lambda: control.call("status", procs.control_socket)["clients"] == IDLE_CLIENTS, 15,
                   "the idle clients to be served")
        tally = soak.run(procs.port, pairs=pairs, crashes=len(SECOND_DEATHS), crash=crash_twice,
                         interval=(0.2, 0.5))
        print("two deaths in a row:", tally.row(), "; the second one landed:", "; ".join(landed))
        assert tally.crashes == len(SECOND_DEATHS) and tally.sent > 300
        assert tally.problems() == 0, (tally.row(), tally.notes)
        assert tally.received == tally.sent
        # The pairs' clients have closed; every idle one is still served, by the chatd started last.
        wait_until(lambda: control.call("status", procs.control_socket)["clients"] == IDLE_CLIENTS, 15,
                   "the pairs' connections to close")
        assert serving_pid(procs) == turns.serving.pid
        for sock in idle:  # still open: nothing to read, and no EOF
            sock.setblocking(False)
            try:
                assert sock.recv(1) != b"", "an idle client got EOF"
            except BlockingIOError:
                pass
    finally:
        for sock in idle:
            sock.close()
    logs = procs.logs()
    assert "crashed-server" not in logs and "ERROR" not in logs, logs
