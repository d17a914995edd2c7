"""chatd.control: the well-known socket, taken over from a predecessor still closing its files."""

from __future__ import annotations

import errno
import threading
from types import SimpleNamespace

import pytest

from chatd.control import ControlServer
from fdkeep.loop import Loop
from fdkeep.peer import listen_unix, someone_listens


def control_server(tmp_path) -> ControlServer:
    return ControlServer(SimpleNamespace(loop=Loop()), str(tmp_path / "control@2.sock"), restore_now=dict)


def test_a_listener_that_goes_within_the_grace_leaves_the_path_to_us(tmp_path):
    well_known = str(tmp_path / "control.sock")
    predecessor = listen_unix(well_known)  # a killed chatd's, closed a moment after its lease passed
    closing = threading.Timer(0.03, predecessor.close)
    closing.start()
    control = control_server(tmp_path)
    try:
        control.answer_also_at(well_known, grace=2.0)
        assert well_known in control.listeners and someone_listens(well_known)
    finally:
        closing.join()
        control.close()


def test_a_listener_that_stays_is_not_taken_from_it(tmp_path):
    well_known = str(tmp_path / "control.sock")
    live = listen_unix(well_known)
    control = control_server(tmp_path)
    try:
        with pytest.raises(OSError) as raised:
            control.answer_also_at(well_known, grace=0.05)
        assert raised.value.errno == errno.EADDRINUSE
        assert well_known not in control.listeners
    finally:
        control.close()
        live.close()
