"""Child processes of chatctl and the tests (nats-server, haproxy, the demo's daemons): one way each
to start one that dies with its parent, to stop some, to read a log's end, and to be closed by ``with``.

Theory of operation
-------------------
A child started with :func:`die_with_parent` as its ``preexec_fn`` gets SIGKILL when the thread
that started it ends, so a test killed half-way leaves no server behind. :func:`stop` asks
politely (SIGTERM) and then surely (SIGKILL) within one grace for them all, and reaps each.
:class:`ClosedOnExit` gives an owner of children ``with`` and a last line of defence at garbage
collection; the owner says what closing means (:meth:`ClosedOnExit.close`).
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import time

#: prctl(2): the signal a child gets when its parent (thread) dies.
PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child, before exec: be killed when the thread that started us ends."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def stop(procs, grace: float = 5.0) -> None:
    """SIGTERM to each of ``procs`` still running, SIGKILL to those not gone within ``grace``
    seconds (for them all), and every one reaped."""
    procs = [proc for proc in procs if proc is not None]
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def log_tail(path: str, size: int = 4000) -> str:
    """The last ``size`` characters of the log at ``path`` ("" if there is none)."""
    try:
        with open(path, errors="replace") as f:
            return f.read()[-size:]
    except OSError:
        return ""


class ClosedOnExit:
    """``with`` closes it, and so does the garbage collector, for a caller that forgot: no child
    outlives its owner."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
