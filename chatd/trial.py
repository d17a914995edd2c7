"""A trial in a child process: did a command kill (or hang) chatd, or did it only die while handling it?

Theory of operation
-------------------
Only deaths that leave last words count against the command being handled
(:mod:`chatd.lastwords`): a kill from outside (SIGKILL: ``kill -9``, the OOM
killer) counts nothing. Two kinds that do leave words may still not be the
command's doing: a crash signal sent from outside (``kill -SEGV``, which no
handler can tell from a real fault), and the watchdog's kill of a chatd that
something stalled (a SIGSTOP, a starved host) while it handled the command.
Skipped (``ERR crashed-server``), a good command would be lost.

So before chatd skips a command that crashed it twice, and before it handles
again one it hung in, it tries it: :func:`survives` forks, and the child runs
the command in its own copy of the process and leaves with ``os._exit(0)``,
while the parent waits. A command that kills the child, as it killed chatd,
is a poison, and is skipped; one the child survives is handled for real, and
nothing is lost. A child not done after :data:`TIMEOUT` (a command takes
microseconds) is killed and counts as killed: a command that hangs its
handler is a poison too, and the one way out of a hang that every successor
would hang in again.

What is tried must not write anything the parent shares (the journal's rings
are shared memory, the sockets and the loop's epoll set are shared): the
room's handling and the encoding of the events it sends are pure, so that is
what is tried (:meth:`chatd.server.ChatServer._try`), not the writes into the
output rings. The child leaves no last words (faulthandler off): its death is
its parent's to judge, not the successor's. The trial runs rarely (after a
crash or a hang in a command); the loop waits for it (a few ms). If the child
cannot be made (fork fails), the trial cannot tell, and says so: the command
is skipped, as before there was a trial.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Callable

from . import lastwords

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
            lastwords.silence()  # the child's death is for the parent to judge, not for a successor
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
