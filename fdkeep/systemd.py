"""Talking to systemd, the service manager: readiness, status, watchdog, and its fd store.

Theory of operation
-------------------
A service started by systemd with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in
its environment and reports to it with ``sd_notify`` messages: ``READY=1``
once it serves, ``STATUS=`` lines for ``systemctl status``, ``STOPPING=1`` on
its way out, and ``WATCHDOG=1`` at least every ``WatchdogSec=`` when the unit
sets one, or systemd kills it as hung (and ``Restart=on-failure`` restarts
it, like after a crash). Those four are plain text: :mod:`sdnotify` sends them.

With ``FileDescriptorStoreMax=`` set, a service may also hand fds to systemd
to keep (``FDSTORE=1`` + ``FDNAME=``) or forget (``FDSTOREREMOVE=1``). systemd
keeps stored fds across a crash or restart of the service and hands them to its
next process as ``$LISTEN_FDS``/``$LISTEN_FDNAMES`` (fds 3, 4, ...); a stop
empties the store. Messages that carry fds need SCM_RIGHTS, which sdnotify
cannot send; python-systemd's ``notify(..., fds=)`` can, but it blocks in
``sendmsg`` while holding the GIL when systemd's queue is full (ten datagrams,
``net.unix.max_dgram_qlen``), which freezes every thread of the process. So
those go out through a ``sendmsg`` of this module's own, which lets other
threads run while it waits. python-systemd reads the passed fds back
(:func:`systemd.daemon.listen_fds_with_names`).

:class:`ServiceManager` is that whole conversation, in this one module, and
nothing when there is no systemd: then every call is a no-op and
:meth:`ServiceManager.take_passed_fds` is empty, so the daemons run the same
code in a terminal, in tests and under systemd.

Limits worth knowing: one message carries at most 253 fds (SCM_RIGHTS) and all
fds of one message share its FDNAME; a name is at most 255 printable ASCII
characters without ``:``; anyone on the machine may list the names in a unit's
store, so names carry no secrets; systemd hands every name to the next process
in one environment string (``LISTEN_FDNAMES``), which Linux caps at 128 KiB,
so a service keeps few names. systemd drops a stored socket by itself on
POLLHUP/POLLERR, and compares every fd it is handed with every fd stored.
"""

from __future__ import annotations

import array
import logging
import os
import socket

FDNAME_MAX = 255

log = logging.getLogger(__name__)


def valid_fdname(name: str) -> bool:
    return 0 < len(name) <= FDNAME_MAX and all(32 < ord(ch) < 127 and ch != ":" for ch in name)


def watchdog_interval(environ=os.environ) -> float | None:
    """How often to send ``WATCHDOG=1`` (half the unit's ``WatchdogSec=``), or None without one.

    As ``sd_watchdog_enabled()``: ``$WATCHDOG_USEC`` is for us only if
    ``$WATCHDOG_PID`` is unset or is our pid.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class ServiceManager:
    """systemd if it started us (``$NOTIFY_SOCKET`` is set), else a polite no-op."""

    def __init__(self, environ=os.environ):
        self.present = bool(environ.get("NOTIFY_SOCKET"))
        self._passed = self._take_passed_fds() if self.present else {}
        self.watchdog_interval = watchdog_interval(environ) if self.present else None
        self._notifier = None  # connected at the first notification
        self._fd_socket = None
        self._warned = False

    @staticmethod
    def _take_passed_fds() -> dict[int, str]:
        # python-systemd checks $LISTEN_PID and unsets the variables, so that
        # a child we might start does not take our fds for its own.
        from systemd.daemon import listen_fds_with_names

        return listen_fds_with_names(unset_environment=True)

    def passed_names(self) -> set[str]:
        """The names of the fds systemd passed at start (not yet taken)."""
        return set(self._passed.values())

    def take_passed_fds(self) -> dict[int, str]:
        """The fds systemd passed at start, ``{fd: name}``, once: the caller uses or closes each."""
        passed, self._passed = self._passed, {}
        return passed

    def _failed(self, what: str, reason) -> bool:
        if not self._warned:
            self._warned = True
            log.warning("systemd did not take a notification (%s): %s", what, reason)
        return False

    # -- plain text: sdnotify ---------------------------------------------------------
    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines; False if systemd did not take them (or is absent)."""
        if not self.present:
            return False
        try:
            if self._notifier is None:
                import sdnotify

                self._notifier = sdnotify.SystemdNotifier(debug=True)
            self._notifier.notify("\n".join(assignments))
        except OSError as exc:
            self._notifier = None
            return self._failed(assignments[0], exc)
        return True

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    # -- fds: SCM_RIGHTS on our own sendmsg -------------------------------------------
    def _notify_fds(self, assignments: str, fds: list[int]) -> bool:
        if not self.present:
            return False
        address = os.environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            if self._fd_socket is None:
                self._fd_socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._fd_socket.sendmsg([assignments.encode()], ancillary, 0, address)
        except OSError as exc:
            return self._failed(assignments.split("\n", 1)[0], exc)
        return True

    def store(self, name: str, *fds: int) -> bool:
        """Keep ``fds`` in the store under ``name`` (an fd already there is not added twice)."""
        if not valid_fdname(name):
            raise ValueError(f"{name!r} is not a valid FDNAME: 1-255 printable ASCII, no ':' or space")
        return self._notify_fds(f"FDSTORE=1\nFDNAME={name}", list(fds))

    def remove(self, name: str) -> bool:
        """Forget every fd stored under ``name``."""
        return self._notify_fds(f"FDSTOREREMOVE=1\nFDNAME={name}", [])
