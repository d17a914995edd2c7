"""The warm standby: two chatd take turns on holderd's lease; killing the one serving hands
its clients to the other at once, and a restarted one becomes the next standby."""

from __future__ import annotations

import signal
import time

import pytest

from chatd.control import instance_socket
from ctl import control
from ctl.launch import wait_for_answer, wait_until
from fdkeep.errors import Error


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


def test_the_standby_serves_the_moment_the_server_dies_and_the_roles_swap(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    standby = start_lease_chatd(procs, standby=True, instance="2")
    names = {serving.pid: "1", standby.pid: "2"}
    gaps = []
    for round_number in range(3):
        killed_at = time.monotonic()
        serving.send_signal(signal.SIGKILL)
        a.send(f"MSG round {round_number}")
        assert b.line() == f"FROM A {round_number + 2} round {round_number}"
        gaps.append((time.monotonic() - killed_at) * 1000)
        assert serving.wait(10) == -signal.SIGKILL
        status = control.call("status", procs.control_socket)
        assert status["pid"] == standby.pid and status["role"] == "serving" and status["clients"] == 2
        # What systemd's restart does: the same instance again, whose socket file the killed one left.
        killed = names.pop(serving.pid)
        serving, standby = standby, start_lease_chatd(procs, standby=True, instance=killed)
        names[standby.pid] = killed
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


def serving_pid(procs) -> int | None:
    try:
        status = control.call("status", procs.control_socket, timeout=2)
    except Error:
        return None
    return status["pid"] if status["role"] == "serving" else None


def test_a_handover_passes_every_client_to_the_standby_and_exits_0(procs):
    procs.start_holderd()
    serving = start_lease_chatd(procs, standby=False, instance="1")
    a, b = procs.pair()
    a.send("MSG one")
    assert b.line() == "FROM A 1 one"
    with pytest.raises(Error) as refused:
        control.call("handover", procs.control_socket)
    assert refused.value.code == "no-standby"
    a.send("MSG still served")
    assert b.line() == "FROM A 2 still served"
    names = {serving.pid: "1"}
    standby = start_lease_chatd(procs, standby=True, instance="2")
    names[standby.pid] = "2"
    for round_number in range(3):
        hand_over(procs, serving, standby)
        a.send(f"MSG round {round_number}")
        assert b.line() == f"FROM A {round_number + 3} round {round_number}"
        b.send(f"MSG back {round_number}")
        assert a.line() == f"FROM B {round_number + 1} back {round_number}"
        status = control.call("status", procs.control_socket)
        assert status["clients"] == 2 and status["pairs"] == 1
        # What `chatctl upgrade` does under systemd: the instance that handed over starts again.
        done = names.pop(serving.pid)
        serving, standby = standby, start_lease_chatd(procs, standby=True, instance=done)
        names[standby.pid] = done
    logs = procs.logs()
    assert "handed over to the standby" in logs and "died handling its command" not in logs, logs
    assert "ERROR" not in logs, logs
