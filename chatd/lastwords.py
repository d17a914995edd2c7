"""A dying chatd's last words: how it died, told to its successor.

Theory of operation
-------------------
The journal's handling marker (:meth:`chatd.journal.Journal.mark_handling`)
tells a successor that its predecessor died *while* handling a command, not
that it died *of* it: a kill from outside can land there too. Only a death the
command caused may count towards skipping it (``ERR crashed-server``), or four
``kill -9`` landing on one command would drop a good message.

A death a process brings on itself comes by a fatal signal raised in it: a
SIGSEGV, SIGBUS, SIGILL or SIGFPE of a fault, a SIGABRT of ``abort()``.
Python's :mod:`faulthandler` catches those in C (no Python runs), writes where
the process was, and lets the signal kill it. Here it writes into a small
``memfd`` that the holders keep beside the journal (``chatd/last-words``), so
the words outlive the process and the successor reads them before it handles
anything. A kill from outside that no process can catch leaves no words:
SIGKILL, which is what ``kill -9``, the OOM killer, and systemd's last resort
(``TimeoutAbortSec=``, ``TimeoutStopSec=``) send. So, of a death while a command
was being handled (:func:`death_of`):

- ``crashed``: the words begin ``Fatal Python error: <signal>``: the process
  faulted or aborted in the command's handling. Counted against the command.
- ``hung``: words of the watchdog's signal, SIGQUIT (``WatchdogSignal=`` in
  units/chatd@.service; :meth:`LastWords.listen` registers it with faulthandler, which
  writes where the process was, then lets it die): chatd stopped pinging for
  ``WatchdogSec=`` inside the command. Either the command hangs chatd (and
  would hang every successor) or something stalled the whole process there
  (SIGSTOP, a starved host). Not counted: the successor tries the command in a
  child process first (:mod:`chatd.trial`), which tells the two apart.
- ``killed``: no words: from outside. Not counted; the command is handled again.

``chatctl crash`` dies of a SIGSEGV with faulthandler turned off (no words,
and never inside a command: it runs between commands, in the control socket's
turn). A SIGSEGV or SIGABRT sent with ``kill(1)`` cannot be told from one the
process raised (Python's handlers get no ``siginfo``, and systemd's exit status
does not tell either): it counts as a crash, and the child trial is what keeps
it from dropping a good command, up to the fourth such crash on one command
(:data:`chatd.server.SKIP_AFTER_DEATHS`).

Why not systemd's word (``$SERVICE_RESULT``, ``$EXIT_STATUS`` in ``ExecStopPost=``)
or holderd's: the standby takes over the moment holderd sees the lease's
connection close, before systemd has run anything; without systemd there is no
``ExecStopPost=`` at all; and neither knows more than the exit status (holderd
not even that), which cannot tell a ``kill -SEGV`` from a fault either, while
the words are there before the process is gone, with the stack it died in.

The file is read and emptied by each process that begins to serve from the
journal (:meth:`LastWords.take`), before it handles a command, and written only
by the process serving: a standby's faulthandler writes to stderr until it
serves (:func:`to_stderr`), and a trial's child turns faulthandler off. So words
in the file are always those of the process that set the marker found beside
them. The successor logs them: they are the dead process's stack.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from typing import NamedTuple

from .holders import LAST_WORDS_NAME

#: The signal the watchdog kills with (units/chatd@.service ``WatchdogSignal=``): told apart from
#: a crash's signals because faulthandler writes no "Fatal Python error" line for it.
WATCHDOG_SIGNAL = signal.SIGQUIT
#: How faulthandler begins the words of a fatal signal it caught (Python 3.3 onwards).
FATAL = b"Fatal Python error: "
#: At most this much of the words is read (a stack is a few KiB).
MOST = 1 << 20

CRASHED, HUNG, KILLED = "crashed", "hung", "killed"


class Dying(NamedTuple):
    """The command a predecessor died handling (the journal's marker), and how it died."""

    slot: int
    offset: int
    death: str  # CRASHED, HUNG or KILLED
    how: str  # in words, for the log (death_of)


def death_of(words: bytes) -> tuple[str, str]:
    """How the process that left ``words`` died, and that in words: (``crashed``, "a fatal signal
    of its own (Segmentation fault)"), (``hung``, "the watchdog's SIGQUIT") or (``killed``, "no
    last words: ...")."""
    if words.startswith(FATAL):
        name = words[len(FATAL):].split(b"\n", 1)[0].decode("ascii", "replace")
        return CRASHED, f"a fatal signal of its own ({name})"
    if words:
        return HUNG, f"the watchdog's {WATCHDOG_SIGNAL.name}"
    return KILLED, "no last words: SIGKILL from outside (kill -9, the OOM killer, systemd's last resort)"


def to_stderr() -> None:
    """At start (and while standing by): a fatal signal, or the watchdog's, prints where chatd was."""
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(WATCHDOG_SIGNAL, file=sys.stderr, all_threads=True, chain=True)


def silence() -> None:
    """In a process that must leave no words (a trial's child, ``chatctl crash``)."""
    faulthandler.disable()
    faulthandler.unregister(WATCHDOG_SIGNAL)


class LastWords:
    """The file the serving chatd's faulthandler writes into; owns its fd."""

    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def create(cls) -> "LastWords":
        return cls(os.memfd_create("chatd-last-words", os.MFD_CLOEXEC))

    def item(self) -> tuple[str, bytes, int]:
        return (LAST_WORDS_NAME, b"{}", self.fd)

    def take(self) -> bytes:
        """What the dead process wrote, and the file emptied for this one."""
        words = os.pread(self.fd, MOST, 0)
        os.ftruncate(self.fd, 0)
        # The offset is shared with every copy of this fd (one open file): where the dead one stopped.
        os.lseek(self.fd, 0, os.SEEK_SET)
        return words

    def listen(self) -> None:
        """From now on this process's fatal signals, and the watchdog's, write here."""
        faulthandler.enable(file=self.fd, all_threads=True)
        faulthandler.register(WATCHDOG_SIGNAL, file=self.fd, all_threads=True, chain=True)

    def close(self) -> None:
        os.close(self.fd)
