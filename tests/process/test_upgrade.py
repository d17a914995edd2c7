"""An upgrade in place from the previous release, and a downgrade back to it, with pairs streaming:
nothing lost, nothing doubled.

The previous release is the one CHANGELOG.md names before this one, taken out of git history at
its commit and run as it was (its own chatd and holderd, on this Python). Its chatd serves with
the lease (``--lease``) while ten pairs stream sender-numbered messages (testkit.soak); then this
release takes over the way an operator upgrades: this release's chatd stands by, the old one is
stopped (SIGTERM: 0.1.0 has no planned handover), and the new one serves from what the old one
kept, the journal as the old one wrote it. A second new chatd stands by behind it, and the first
new one is killed a moment after it is granted the lease, in the middle of its takeover: the
second takes over. Then the new release hands over between its own instances (the planned
handover). Every message exactly once, in order, ``n`` contiguous, every pair kept, no
connection dropped.

The downgrade is the same the other way: this release serves, the previous release's chatd
stands by, this release's chatd is stopped (SIGTERM: ``chatctl handover`` finds no standby, since
0.1.0 answers at ``<control>.standby``, not at an instance socket, and refuses with this release
serving on), and the previous release serves on from the journal this release wrote.
(Across hosts, the rolling upgrade of a cluster is in test_cluster.py.)
"""

from __future__ import annotations

import signal
import time

import pytest

from chatd.control import instance_socket
from ctl import control
from ctl.launch import wait_for_answer, wait_until
from fdkeep.errors import Error
from helpers import previous_release, serving_pid
from testkit import soak


def test_an_upgrade_from_the_previous_release_with_pairs_streaming_loses_nothing(procs, tmp_path):
    version, old_tree = previous_release(tmp_path / "previous")
    old = {"PYTHONPATH": str(old_tree)}
    # The previous release's holderd and chatd, as they were.
    procs.holderd = procs.spawn("holderd", "holderd.daemon", "--socket", procs.holder_socket, env=old)
    wait_for_answer(procs.holderd, procs.ping_holderd, 15, "the previous release's holderd")
    first = procs.spawn("chatd", "chatd", "--port", "0", "--http-port", "0", "--control", procs.control_socket,
                        "--holder", procs.holder_socket, "--lease", env=old)
    wait_until(lambda: serving_pid(procs) == first.pid, 15, f"chatd {version} to serve")
    status = control.call("status", procs.control_socket)
    procs.port, procs.http_port = status["port"], status["http_port"]

    def new_chatd(instance: str):
        proc = procs.spawn("chatd", "chatd", "--port", str(procs.port), "--http-port", str(procs.http_port),
                           "--control", procs.control_socket, "--holder", procs.holder_socket,
                           "--lease", "--instance", instance)
        status = wait_for_answer(proc, lambda: control.call("status", instance_socket(procs.control_socket,
                                                                                      instance)), 15, "chatd")
        assert status["role"] == "standby", status
        return proc

    steps = iter(["upgrade", "handover", "handover", "handover"])
    running = {"serving": (first, "old"), "spare": None}

    def step(rng):
        serving, name = running["serving"]
        if next(steps) == "upgrade":
            # This release stands by twice; the old chatd is stopped; the first new one is killed a
            # moment after the lease comes to it, in the middle of taking over.
            taking, behind = new_chatd("2"), new_chatd("3")
            serving.send_signal(signal.SIGTERM)
            assert serving.wait(15) == 0, f"chatd {version} stops cleanly on SIGTERM"
            time.sleep(rng.uniform(0.0, 0.03))
            taking.send_signal(signal.SIGKILL)
            taking.wait(15)
            wait_until(lambda: serving_pid(procs) == behind.pid, 20, "the second new chatd to serve")
            running["serving"], running["spare"] = (behind, "3"), "2"
            return
        # The planned handover between this release's own instances, as `chatctl upgrade` makes it.
        standby = new_chatd(running["spare"])
        reply = control.call("handover", procs.control_socket)
        assert reply["pid"] == serving.pid, reply
        wait_until(lambda: serving_pid(procs) == standby.pid, 20, "the standby to serve")
        assert serving.wait(15) == 0
        running["serving"], running["spare"] = (standby, running["spare"]), name

    tally = soak.run(procs.port, pairs=10, crashes=4, crash=step, interval=(0.3, 0.6))
    print(f"upgrade from {version}:", tally.row())
    assert tally.crashes == 4 and tally.sent > 200
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent
    logs = procs.logs()
    assert logs.count("granted the lease: taking over") >= 4, logs  # the upgrade, then the handovers
    assert "held journal unusable" not in logs and "starting a new one" not in logs, logs
    assert "handed over to the standby" in logs
    status = control.call("status", procs.control_socket)
    assert status["pid"] == running["serving"][0].pid and status["role"] == "serving"


def test_a_downgrade_to_the_previous_release_with_pairs_streaming_loses_nothing(procs, tmp_path):
    """This release serves (its own holderd, which stays: the lease and what it keeps are
    holderd's); the previous release's chatd stands by; this release's chatd is stopped and the
    previous one takes over from the journal this release wrote."""
    version, old_tree = previous_release(tmp_path / "previous")
    procs.start_holderd()
    current = procs.spawn("chatd", "chatd", "--port", "0", "--http-port", "0", "--control", procs.control_socket,
                          "--holder", procs.holder_socket, "--lease", "--instance", "1")
    wait_until(lambda: serving_pid(procs) == current.pid, 15, "this release's chatd to serve")
    status = control.call("status", procs.control_socket)
    procs.port, procs.http_port = status["port"], status["http_port"]

    def downgrade(rng):
        # 0.1.0's standby answers at <control>.standby (it has no --instance), and at <control> once it serves.
        previous = procs.spawn("chatd", "chatd", "--port", str(procs.port), "--http-port", str(procs.http_port),
                               "--control", procs.control_socket, "--holder", procs.holder_socket, "--lease",
                               env={"PYTHONPATH": str(old_tree)})
        standby = wait_for_answer(previous, lambda: control.call("status", procs.control_socket + ".standby"), 15,
                                  f"chatd {version}")
        assert standby["role"] == "standby", standby
        # The planned handover looks for a standby at an instance socket (control@N.sock), which
        # 0.1.0 does not answer at: refused before anything is touched, this release serving on.
        with pytest.raises(Error) as refused:
            control.call("handover", procs.control_socket)
        assert refused.value.code == "no-standby", refused.value
        assert serving_pid(procs) == current.pid
        current.send_signal(signal.SIGTERM)
        assert current.wait(15) == 0, "this release's chatd stops cleanly on SIGTERM"
        wait_until(lambda: serving_pid(procs) == previous.pid, 20, f"chatd {version} to serve")
        running["serving"] = previous

    running = {"serving": current}
    tally = soak.run(procs.port, pairs=10, crashes=1, crash=downgrade, interval=(2.0, 4.0))
    print(f"downgrade to {version}:", tally.row())
    assert tally.crashes == 1 and tally.sent > 200
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent
    with open(procs.log_path(running["serving"]), errors="replace") as log:
        previous_log = log.read()
    assert "granted the lease: taking over" in previous_log and "restored 20 clients and 10 pairs" in previous_log
    assert "held journal unusable" not in procs.logs()
    status = control.call("status", procs.control_socket)
    assert status["pid"] == running["serving"].pid and status["role"] == "serving"
