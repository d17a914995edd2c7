"""chatd's start-up, and the role it plays: one owner, one way to begin serving.

Theory of operation
-------------------
A chatd process plays one :class:`Role` at a time, and :class:`Lifecycle` is the
only one that changes it (others ask: the status report, the control socket):

============  =============================================================
``STARTING``  parsing options, opening the control socket
``WAITING``   ``--restore --wait``: serves nothing until ``chatctl restore``
``STANDBY``   ``--lease`` (:mod:`chatd.standby`): up and ready, takes over the
              moment the chatd serving dies and holderd grants it the lease
``SERVING``   its listeners, journal and clients are its own
============  =============================================================

``STARTING`` goes to any of the others; ``WAITING`` and ``STANDBY`` go to
``SERVING`` only. Nothing leaves ``SERVING``: a chatd that serves does so until it
exits: by a crash, a signal, or a planned handover.

**A planned handover** (``chatctl handover``, with ``--lease``): :meth:`Lifecycle.hand_over`
only asks for it; it happens at the end of the loop turn, after the turn's commit
(so every command read is handled and committed, and none is being handled: the
journal's marker is clear and the successor counts no crash). Then the journal
says nobody serves from it (the successor need not wait for this process to die),
the lease goes to the standby (:mod:`chatd.standby`), and the process exits 0
without reading another byte and without closing a client's connection: those
stay in holderd, for the successor, exactly as after a crash, only between two
turns instead of anywhere.

**SIGTERM** (``systemctl restart`` or ``stop``) of a chatd serving with
``--lease`` is a planned handover too when a standby answers (:mod:`chatd.standby`),
and otherwise :meth:`Lifecycle.stop`: the same end of the turn, then exit 0 as
any stop, every client kept in the holders for the next chatd.

Every way to begin serving goes through :meth:`Lifecycle.serve`: at start, when
the standby takes over, and on ``chatctl restore``. It restores what the holders
keep (:mod:`chatd.restore`; with ``--state-dir`` and nothing kept, from the
journal on disk, on new listeners: :mod:`chatd.statedir`), else, where a fresh
start is allowed, binds new listeners; listens where the options say; joins the
cluster (``--cluster``); tells systemd it is ready; answers scrapes of its
metrics (``--metrics-port``, :mod:`chatd.metrics`); and lets the test crash
points count. So ``--cluster`` goes with ``--wait`` like any other start.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from fdkeep.errors import Error
from fdkeep.text import plural

from . import faults
from .journal import process_identity
from .reports import status_line
from .restore import restore
from .server import Role

if TYPE_CHECKING:
    from .journal import Journal
    from .prepared import Prepared
    from .server import ChatServer

log = logging.getLogger("chatd")

#: How often systemd hears the status line (when it changed).
STATUS_INTERVAL = 1.0
#: Seconds after it begins to serve that chatd's metrics listen (see Lifecycle.serve).
METRICS_AFTER = 1.0


#: Every legal change of role.
TRANSITIONS = {
    Role.STARTING: {Role.WAITING, Role.STANDBY, Role.SERVING},
    Role.WAITING: {Role.SERVING},
    Role.STANDBY: {Role.SERVING},
    Role.SERVING: set(),
}


class HandedOver(SystemExit):
    """The loop ends: this chatd handed over to the standby (exit status 0)."""

    def __init__(self):
        super().__init__(0)


@dataclass(frozen=True)
class Where:
    """Where chatd serves, as its options say: the line port's address and the web port
    (None: no web port), whether it may only restore (``--restore``), and the metrics'
    address and port (``--metrics-address``, ``--metrics-port``; None: no metrics)."""

    host: str
    port: int
    http_port: int | None
    restore_only: bool = False
    metrics: tuple[str, int] | None = None


class Lifecycle:
    def __init__(self, server: "ChatServer", where: Where):
        self.server = server
        self.where = where
        server.role = Role.STARTING
        self._status_sent: str | None = None
        #: Set by :meth:`hand_over`: gives the lease away, at the end of the turn.
        self._handing_over: Callable[[], None] | None = None
        #: Set by :meth:`stop`: exit 0 at the end of the turn.
        self._stopping = False
        server.loop.call_every(STATUS_INTERVAL, self._report_status)
        server.loop.after_events(self._end_of_turn)  # after the server's commit, made before us

    @property
    def role(self) -> Role:
        return self.server.role

    def _to(self, role: Role) -> None:
        if role is self.role:
            return
        if role not in TRANSITIONS[self.role]:
            raise RuntimeError(f"chatd cannot go from {self.role.value} to {role.value}")
        self.server.role = role

    # -- the roles before serving ----------------------------------------------------------
    def wait_for_restore(self, control_path: str) -> None:
        """``--restore --wait``: serve nothing until ``chatctl restore`` (:meth:`restore_now`)."""
        self._to(Role.WAITING)
        log.info("waiting for `chatctl restore` on %s", control_path)

    def stand_by(self) -> None:
        """Up and ready, serving nothing until the lease comes (chatd.standby)."""
        self._to(Role.STANDBY)
        self.announce_ready()

    # -- serving ----------------------------------------------------------------------
    def serve(self, fresh_allowed: bool = True, may_take_over: Callable[["Journal"], bool] | None = None,
              prepared: "Prepared | None" = None) -> None:
        """Begin serving: restore what the holders keep (with what a standby ``prepared``), else
        (if allowed) start afresh; then READY. Raises (and logs) Error if it cannot; the role then
        stays as it was."""
        try:
            self._serve(fresh_allowed, may_take_over, prepared)
        except Error as exc:
            log.error("%s", exc.message)
            raise

    def _serve(self, fresh_allowed: bool, may_take_over, prepared) -> None:
        where = self.where

        def listen_anew() -> None:
            """For a restore from the state directory's journal: its listeners died with the holders."""
            self.server.listeners.open(where.host, where.port, where.http_port)

        try:
            if restore(self.server, may_take_over, prepared, listen_anew) is None:
                if where.restore_only or not fresh_allowed:
                    raise Error("nothing-held", "the holders keep no listening socket for chatd: nothing to "
                                                "restore (start chatd without --restore to begin afresh)")
                self.server.bind(where.host, where.port, where.http_port)
            else:
                self.server.listeners.move_where_told(where.host, where.port, where.http_port)
        except OSError as exc:
            web = f" or web port {where.http_port}" if where.http_port is not None else ""
            raise Error("cannot-listen", f"cannot listen on {where.host} port {where.port}{web}: "
                                         f"{exc.strerror or exc}; is another chatd running? (`chatctl status`; "
                                         "or pass --port/--http-port)") from None
        if self.server.journal.box_size:  # a cluster's journal: the cluster looks at every client at once
            self.server.adoption.adopt_all("the cluster starts from every client's record")
        self.server.cluster.start(self.server.journal)
        # Who serves from the journal: a standby (chatd.standby) and `chatd --seal` (chatd.statedir) ask.
        self.server.journal.set_owner(*process_identity(os.getpid()))
        self._to(Role.SERVING)
        self.announce_ready()
        if where.metrics is not None and self.server.metrics is None:
            # Only the chatd serving answers scrapes (chatd.metrics); and not before its clients
            # are served: importing prometheus-client takes about 0.1 s, kept off the takeover.
            self.server.loop.call_later(METRICS_AFTER, lambda: self._start_metrics(*where.metrics))
        faults.start_counting()  # test crash points count from here: not in chatd's own restore

    def _start_metrics(self, address: str, port: int) -> None:
        from .metrics import endpoint

        self.server.metrics = endpoint(self.server, address, port, log)
        self.server.metrics.start()

    def restore_now(self) -> dict:
        """``chatctl restore``: a waiting chatd takes its sockets back now; the restore's summary."""
        if self.role is not Role.WAITING:
            raise Error("not-waiting", "chatd is serving already; restore happens at start")
        self.serve(fresh_allowed=False)
        return self.server.restore_summary

    # -- handing over ---------------------------------------------------------------------
    def hand_over(self, release: Callable[[], None]) -> None:
        """Hand over to the standby at the end of this turn: ``release()`` then gives the lease
        away, and the process exits 0 (:class:`HandedOver`)."""
        if self.role is not Role.SERVING:
            raise Error("not-serving", f"chatd is {self.role.value}: only the one serving hands over")
        self._handing_over = release

    def stop(self) -> None:
        """Exit 0 at the end of this turn, after its commit (SystemExit, as any stop)."""
        self._stopping = True

    def _end_of_turn(self) -> None:
        release = self._handing_over
        if release is None:
            if self._stopping:
                raise SystemExit(0)
            return
        self.server.journal.set_owner(0, 0)  # nobody serves from it now: the successor need not wait
        release()
        log.info("handed over to the standby after the turn's commit: exiting, %s left open for it",
                 plural(self.server.client_count(), "client connection"))
        raise HandedOver()

    # -- what systemd hears ---------------------------------------------------------------
    def announce_ready(self) -> None:
        """READY=1, with the status line of the role just taken."""
        self._status_sent = status_line(self.server)
        self.server.manager.ready(self._status_sent)

    def _report_status(self) -> None:
        line = status_line(self.server)
        if line != self._status_sent:
            self._status_sent = line
            self.server.manager.status(line)
