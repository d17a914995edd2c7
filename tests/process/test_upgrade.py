"""An upgrade in place from the previous release, with pairs streaming: nothing lost, nothing doubled.

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
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from chatd.control import instance_socket
from ctl import control
from ctl.launch import wait_for_answer, wait_until
from fdkeep.errors import Error
from testkit import soak

ROOT = Path(__file__).resolve().parents[2]
RELEASE = re.compile(r"^## (\d+\.\d+\.\d+) \((this commit|commit ([0-9a-f]{7,40}))\)$", re.M)


def previous_release(into: Path) -> tuple[str, Path]:
    """(version, tree) of the release CHANGELOG.md names before this one, out of git history."""
    releases = list(RELEASE.finditer((ROOT / "CHANGELOG.md").read_text()))
    assert len(releases) >= 2, "CHANGELOG.md names no release before this one"
    version, commit = releases[1].group(1), releases[1].group(3)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "chatd", "fdkeep", "holderd"],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.fail(f"the previous release ({version}, commit {commit}) is not in this checkout's git history: "
                    f"{archive.stderr.decode(errors='replace').strip()} (a shallow clone? fetch its history)")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    return version, into


def serving_pid(procs) -> int | None:
    try:
        status = control.call("status", procs.control_socket, timeout=2)
    except Error:
        return None
    return status["pid"] if status.get("role") == "serving" else None


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
