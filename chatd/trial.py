"""A trial in a child process: did a command kill chatd, or did it only die while handling it?

Theory of operation
-------------------
The journal's handling marker tells a successor that its predecessor died
*while* handling a command, not that it died *of* it: a kill from outside
(SIGKILL, the OOM killer, ``chatctl crash``, the watchdog) can land there too.
One such death costs nothing (the command is handled again). But two crashes
in a row can both land in the handling of one command: the chatd serving is
killed while handling it, and the standby taking over is killed while handling
it again, in its restore. Counted as two deaths of that command, it would be
skipped (``ERR crashed-server``): a message lost, though it harmed nobody.

So before chatd skips a command that it died handling twice, it tries it:
:func:`survives` forks, and the child runs the handling in its own copy of
the process and leaves with ``os._exit(0)``, while the parent waits. A command
that kills the child, as it killed chatd twice, is a poison, and is skipped;
one the child survives is handled for real, and nothing is lost. A child not
done after :data:`TIMEOUT` is killed and counts as killed: a command that hangs
its handler is a poison too (under systemd the watchdog kills chatd of it).

What is tried must not write anything the parent shares (the journal's rings
are shared memory, the sockets are shared): the room's handling is pure, so
that is what is tried, not the events' encoding into the output rings
(:meth:`chatd.server.ChatServer._handle`). The trial runs only for a command
that chatd died handling twice, so rarely; the loop waits for it (a few ms).
If the child cannot be made (fork fails), the trial cannot tell, and says so:
the command is skipped, as before there was a trial.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
from typing import Callable

log = logging.getLogger("chatd")

#: How long the child may take before it counts as hung (a command is handled in microseconds).
TIMEOUT = 1.0


def survives(handle: Callable[[], object], timeout: float = TIMEOUT) -> bool:
    """Run ``handle()`` in a forked child: True if the child finished it and exited 0, False if it
    died of a signal, exited otherwise, hung past ``timeout``, or could not be made."""
    try:
        pid = os.fork()
    except OSError as exc:
        log.warning("cannot fork to try the command in a child process (%s): taking it for a poison",
                    exc.strerror or exc)
        return False
    if pid == 0:  # the child: handle, and leave without running anything of the parent's
        try:
            faulthandler.disable()  # a poison's trace was printed by the deaths before
            logging.disable(logging.CRITICAL)
            handle()
        finally:
            os._exit(0)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.001)
