"""holderd's leases against the death of a peer's process, in-process: a real Holderd serving
on a thread, real clients (holderd.client.Lease), and the pidfd lookup made to fail as it does
where the peer is gone already or the kernel has no pidfds. (The real deaths, with a child that
keeps the socket: tests/process/test_holderd.py.)"""

from __future__ import annotations

import errno
import logging
import os
import select

import pytest

import holderd.daemon
from ctl.launch import wait_until
from fdkeep.errors import Error
from holderd.client import Lease
from helpers import RunningHolderd, lease_granted
from proptools import open_fds


Running = RunningHolderd  # a real Holderd on a thread (tests/helpers.py)


@pytest.fixture
def running(tmp_path):
    made = Running(str(tmp_path / "h.sock"))
    yield made
    made.stop()


granted = lease_granted  # tests/helpers.py


def test_a_peer_that_asks_for_a_lease_is_watched_and_its_pidfd_goes_with_it(running):
    before = open_fds()
    holder = Lease("l", running.path)
    assert holder.request() is True
    wait_until(lambda: len(running.daemon.processes.pidfds) == 1, 5, "the holder's process to be watched")
    [pidfd] = running.daemon.processes.pidfds.values()
    assert os.readlink(f"/proc/self/fd/{pidfd}") == "anon_inode:[pidfd]"
    holder.close()
    wait_until(lambda: not running.daemon.peers, 5, "holderd to see the holder go")
    assert running.daemon.processes.pidfds == {}
    assert open_fds() == before, "the pidfd is closed with its peer"


def test_a_peer_whose_process_is_gone_when_it_asks_is_closed_and_granted_nothing(running, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "holderd")
    real = holderd.daemon.peer_pidfd
    asked = []

    def first_one_gone(sock, pid):
        asked.append(pid)
        if len(asked) == 1:
            raise ProcessLookupError(errno.ESRCH, "gone")
        return real(sock, pid)

    monkeypatch.setattr(holderd.daemon, "peer_pidfd", first_one_gone)
    with pytest.raises(Error) as raised:
        Lease("l", running.path).request()
    assert raised.value.code == "unavailable", "closed unanswered"
    assert "asked for a lease, but its process is gone" in caplog.text
    second = Lease("l", running.path)
    assert second.request() is True, "the first was granted nothing"
    second.close()


def test_without_pidfds_it_says_so_once_and_the_hang_up_alone_passes_the_lease(running, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "holderd")

    def no_pidfds(sock, pid):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(holderd.daemon, "peer_pidfd", no_pidfds)
    holder, first, second = (Lease("l", running.path) for _ in range(3))
    assert holder.request() is True
    assert first.request() is False and second.request() is False
    assert caplog.text.count("cannot watch the process of") == 1, "said once"
    holder.close()
    assert granted(first)
    # Logged after the grant is sent: it may come a moment after.
    wait_until(lambda: "its connection ended (hang-up) first" in caplog.text, 5, "the lease's passing logged")
    first.close()
    assert granted(second)
    second.close()


def test_no_lease_passes_when_holderd_stops(running):
    """Its connections end because holderd goes, not their processes: the waiter reads the
    end ("lost": ask the next holderd), never a grant while the holder lives on."""
    holder, waiter = Lease("l", running.path), Lease("l", running.path)
    assert holder.request() is True and waiter.request() is False
    running.stop()
    select.select([waiter.fileno()], [], [], 5)
    assert waiter.poll() == "lost"
    holder.close()
