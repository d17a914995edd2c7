"""Talking to systemd, the service manager: readiness, status and its fd store.

Theory of operation
-------------------
A service started by systemd with ``Type=notify`` finds ``$NOTIFY_SOCKET`` in
its environment and reports to it with ``sd_notify`` messages (python-systemd's
:func:`systemd.daemon.notify`): ``READY=1`` once it serves, ``STATUS=`` lines
for ``systemctl status``, and, with ``FileDescriptorStoreMax=`` set, fds to keep
(``FDSTORE=1`` + ``FDNAME=``) or to forget (``FDSTOREREMOVE=1``). systemd keeps
stored fds across a crash or restart of the service and hands them to its next
process as ``$LISTEN_FDS``/``$LISTEN_FDNAMES`` (fds 3, 4, ...); a stop empties
the store.

:class:`ServiceManager` is that conversation, and nothing when there is no
systemd: then every call is a no-op and :meth:`passed_fds` is empty, so the
daemons run the same code in a terminal, in tests and under systemd.

Limits worth knowing: one message carries at most 253 fds (SCM_RIGHTS) and all
fds of one message share its FDNAME, so fds that need names of their own take a
message each; a name is at most 255 printable ASCII characters without ``:``;
anyone on the machine may list the names in a unit's store, so names carry no
secrets. systemd drops a stored socket by itself on POLLHUP/POLLERR.
"""

from __future__ import annotations

import logging
import os

FDNAME_MAX = 255

log = logging.getLogger(__name__)


def valid_fdname(name: str) -> bool:
    return 0 < len(name) <= FDNAME_MAX and all(32 < ord(ch) < 127 and ch != ":" for ch in name)


class ServiceManager:
    """systemd if it started us (``$NOTIFY_SOCKET`` is set), else a polite no-op."""

    def __init__(self, environ=os.environ):
        self.present = bool(environ.get("NOTIFY_SOCKET"))
        self._passed = self._take_passed_fds(environ) if self.present else {}
        self._warned = False

    @staticmethod
    def _take_passed_fds(environ) -> dict[int, str]:
        # python-systemd checks $LISTEN_PID and unsets the variables, so that
        # a child we might start does not take our fds for its own.
        from systemd.daemon import listen_fds_with_names

        return listen_fds_with_names(unset_environment=True)

    def take_passed_fds(self) -> dict[int, str]:
        """The fds systemd passed at start, ``{fd: name}``, once: the caller uses or closes each."""
        passed, self._passed = self._passed, {}
        return passed

    def notify(self, *assignments: str, fds=()) -> bool:
        """Send ``KEY=value`` lines (and fds) to systemd; False if it did not take them."""
        if not self.present:
            return False
        from systemd.daemon import notify

        sent = notify("\n".join(assignments), fds=list(fds))
        if not sent and not self._warned:
            self._warned = True
            log.warning("systemd did not take a notification (%s)", assignments[0])
        return sent

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.notify("STOPPING=1", f"STATUS={status}")

    def store(self, name: str, fd: int) -> bool:
        """Keep ``fd`` in the store under ``name`` (an fd already there is not added twice)."""
        if not valid_fdname(name):
            raise ValueError(f"{name!r} is not a valid FDNAME: 1-255 printable ASCII, no ':' or space")
        return self.notify("FDSTORE=1", f"FDNAME={name}", fds=[fd])

    def remove(self, name: str) -> bool:
        """Forget every fd stored under ``name``."""
        return self.notify("FDSTOREREMOVE=1", f"FDNAME={name}")
