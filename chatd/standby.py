"""Taking turns: one chatd serves, a warm standby takes over the moment it dies.

Theory of operation
-------------------
A cold restart costs ``RestartSec`` plus up to 250 ms of systemd's timer
slack plus Python starting (~100 ms) before the restore even begins. A second
chatd that has already started, imported everything and connected to holderd
removes all of that: it waits, and takes over when the server dies.

**Who serves** is decided by a lease in holderd (``LEASE chatd``, see
holderd/PROTOCOL.md). With ``--lease``, a chatd asks for it at start: the first
to ask serves; the other waits in line on its holderd connection. A lease
belongs to that connection, so when the serving process dies, however it dies,
the kernel closes its socket, holderd sees the connection end (microseconds,
no timer) and tells the next in line at once. That one takes what holderd keeps
for chatd (the listening socket, the journal, the bundles) and serves
(:mod:`chatd.restore`). systemd meanwhile restarts the dead unit; its new
process asks for the lease, finds it taken, and becomes the next standby: the
roles swap, and every crash is covered by whichever process is alive.

**Two units, not one.** A standby inside the server's cgroup would be killed
with its failed main process, and only a unit's own processes may use its fd
store. So the same program runs as ``chatd@1.service`` and ``chatd@2.service``
(``PartOf=chatd.service``: stopped and restarted with it), each answering
chatctl at a control socket of its own (``--instance``), the one serving at the
well-known one too. Each process keeps *its own unit's* fd store current while it serves;
a process that becomes the standby clears its unit's store (what systemd
passed it is stale: the server is elsewhere now). So whichever unit serves, its
store and holderd both keep everything, and a crash of holderd together with
the server still restores, from that unit's store.

**Never two servers.** A restarted holderd remembers no lease, and both
processes ask again; the standby might ask first. So before it takes anything,
a standby given the lease reads the journal's *owner* (the pid and start time of
the process serving from it, written when it begins to serve) from the journal
holderd keeps: if that process is alive, the standby gives the lease back at
once (one info line) and asks again later, and the server, which never stops
serving over a lease, gets it. The restore checks the owner once more, of the
journal it really uses. A server that finds holderd
unreachable at start serves only if systemd passed it a listening socket (it
was serving); a standby without a lease never serves.

**A planned handover** (``chatctl handover``; ``chatctl upgrade`` restarts the
standby on the new release first): the serving chatd makes sure a standby
waits (one answers at a sibling control socket as ``standby``), then, at the
end of its loop turn (:meth:`~chatd.lifecycle.Lifecycle.hand_over`), stops
answering chatctl (so the successor can take the well-known socket), clears
the journal's owner, and closes its lease connection: holderd grants the
lease to the standby at once, which takes over as after a crash, and the old
process exits 0 (under systemd, ``Restart=on-failure`` then leaves its unit
stopped, for the upgrade to start again on the new release).

**SIGTERM** of the serving chatd (``systemctl restart`` or ``stop`` of its
unit) is the same planned handover when a standby answers, and a stop at the
end of the turn when none does (the clients stay in holderd for the next
chatd). The handler only asks the loop (:func:`fdkeep.loop.stop_on_signals`):
the check for a standby (a status request, as ``chatctl handover`` makes it)
runs in the loop's turn, never inside whatever code the signal interrupted.
The standby's SIGTERM, and SIGINT, stop at once, as without ``--lease``.

**Ready before the crash.** While it waits, the standby reads what holderd
keeps (the bundles, from where it stopped; the journal's records, parsed only
when they change: :mod:`chatd.prepared`), so the takeover only checks that
what it read is current, serves the clients with work, and adopts the idle
ones in the next turns (:mod:`chatd.adoption`). A serving process killed by a
signal is *exiting* (``PF_EXITING``) by the time holderd sees its connection
end: the owner check takes that as gone, and does not wait for the zombie.

Limits: the takeover still reads every record's bytes and matches every socket
(a few ms at 10,000 clients); there is one standby; and without holderd there is
no lease, so the pair falls back to one unit serving from its fd store.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.loop import IN
from holderd.client import HolderClient, Lease

from .control import call, instance_sockets
from .holders import STATE_NAME
from .journal import process_identity, read_owner
from .prepared import REFRESH, Prepared
from .server import Role

if TYPE_CHECKING:
    from .control import ControlServer
    from .lifecycle import Lifecycle

log = logging.getLogger("chatd")

LEASE_NAME = "chatd"
#: How often a chatd that cannot reach holderd, or had to give the lease back, asks again.
RETRY = 0.2
#: How long a standby given the lease waits for the previous owner to finish dying.
OWNER_GRACE = 0.1


class Turns:
    """The lease and the role it gives: ``serving`` or ``standby``."""

    def __init__(self, lifecycle: "Lifecycle", control: "ControlServer", control_path: str, holder_path: str):
        self.lifecycle = lifecycle  # the role's owner, and the one way to begin serving
        self.server = lifecycle.server
        self.control = control
        self.control_path = control_path  # the well-known one, answered at too while this chatd serves
        self.holder_path = holder_path
        self.lease = Lease(LEASE_NAME, holder_path)
        control.hand_over = self.hand_over
        control.prepared_report = lambda: self.prepared.report() if self.lifecycle.role is Role.STANDBY else None
        self._watching = False
        self._yielding = False  # gave the lease back to a live server, and said so
        self._terminating = False  # SIGTERM came while serving: handing over, or stopping
        #: What this chatd reads while it stands by, for a takeover that need not (chatd.prepared).
        self.prepared = Prepared(holder_path, lambda owner: owner is not None and process_identity(owner[0]) == owner)
        self._refreshing = None  # the timer that refreshes it, while standing by

    # -- at start -------------------------------------------------------------------
    def start(self, systemd_passed_a_listener: bool) -> bool:
        """Serve, or wait as the standby; False if chatd cannot start at all."""
        try:
            granted = self.lease.request()
        except Error as exc:
            if systemd_passed_a_listener:
                log.warning("holderd unreachable (%s): serving from systemd's fd store without the lease",
                            exc.message)
                return self._serve()
            log.warning("holderd unreachable (%s): waiting as the standby until it answers", exc.message)
            return self._wait()
        if granted:
            return self._serve()
        return self._wait()

    def _serve(self, fresh_allowed: bool = True, may_take_over=None, prepared: Prepared | None = None) -> bool:
        # At the well-known socket before READY=1: once systemd says the unit is active,
        # chatctl reaches it (requests made meanwhile wait in the backlog until it serves).
        try:
            self.control.answer_also_at(self.control_path, grace=OWNER_GRACE)
        except OSError as exc:  # serve anyway: chatctl still reaches this chatd at its own socket
            log.error("cannot answer chatctl at %s as well (%s): `chatctl --control %s` reaches this chatd",
                      self.control_path, exc.strerror or exc, self.control.path)
        try:
            self.lifecycle.serve(fresh_allowed, may_take_over, prepared)
        except Error:
            self.control.stop_answering_at(self.control_path)
            return False
        finally:
            self.prepared.release()  # used, or half used: read again from the start if it stands by again
        if self._refreshing is not None:
            self._refreshing.cancel()
            self._refreshing = None
        self.server.journal.set_owner(*process_identity(os.getpid()))
        self._watch_lease()
        return True

    def _wait(self) -> bool:
        for holder in self.server.holders:
            if holder.label == "systemd":  # stale: whoever serves keeps its own unit's store
                holder.forget_all("this chatd stands by; the one serving keeps its own unit's store")
        self.lifecycle.stand_by()
        log.info("standby: waiting for the lease %r in holderd to serve", LEASE_NAME)
        self._refreshing = self.server.loop.call_every(REFRESH, self.prepared.refresh, first=0)
        self._watch_lease()
        return True

    # -- the lease's events -----------------------------------------------------------
    def _watch_lease(self) -> None:
        if self._watching:
            return
        if self.lease._conn is not None:
            self.server.loop.add(self.lease.fileno(), IN, self._lease_readable)
            self._watching = True
        else:
            self.server.loop.call_later(RETRY, self._ask_again)

    def _unwatch(self) -> None:
        if self._watching and self.lease._conn is not None:
            self.server.loop.remove(self.lease.fileno())
        self._watching = False

    def _lease_readable(self, mask: int) -> None:
        event = self.lease.poll()
        if event == "granted" and self.lifecycle.role is Role.STANDBY:
            self._take_over()
        elif event == "lost":
            self._unwatch()
            log.warning("lost holderd's lease connection (%s); asking again", self.lifecycle.role.value)
            self.server.loop.call_later(RETRY, self._ask_again)

    def _ask_again(self) -> None:
        try:
            granted = self.lease.request()
        except Error:
            self.server.loop.call_later(RETRY, self._ask_again)
            return
        self._watch_lease()
        if self.lifecycle.role is Role.SERVING:
            self.server.backup.audit()  # holderd is back, perhaps empty: refill it now
        elif granted:
            self._take_over()

    # -- handing over (chatctl handover) -------------------------------------------------
    def hand_over(self) -> dict:
        """Hand over to the standby at the end of this turn; what chatctl is told. Refused
        (Error) unless a standby answers, which holderd will then give the lease to."""
        if self.lease._conn is None:
            raise Error("no-holderd", "holderd does not answer (this chatd asks it again): no standby can "
                                      "get the lease now; try again once `chatctl status` shows holderd")
        standby = self._a_standby()
        if standby is None:
            raise Error("no-standby", "no chatd stands by to take over (`chatctl status` lists the instances; "
                                      "under systemd: systemctl start chatd@N for the other instance)")
        self.lifecycle.hand_over(self._release)
        log.info("handing over to chatd %s (pid %d) at the end of this turn", standby["instance"], standby["pid"])
        return {"pid": os.getpid(), "instance": self.server.instance,
                "standby": {"pid": standby["pid"], "instance": standby["instance"]}}

    def hand_over_instead_of_stopping(self, signum: signal.Signals) -> bool:
        """In the signal handler (:func:`fdkeep.loop.stop_on_signals`): True if this signal ends
        the turn with a handover or a stop (:meth:`_terminate`, asked of the loop), False to stop now."""
        if signum is not signal.SIGTERM or self.lifecycle.role is not Role.SERVING:
            return False
        if not self._terminating:  # a second SIGTERM changes nothing: the first one's turn ends soon
            self._terminating = True
            self.server.loop.call_from_signal_handler(self._terminate)
        return True

    def _terminate(self) -> None:
        """SIGTERM while serving, in the loop: hand over at the end of the turn if a chatd stands
        by, else stop there (holderd keeps every client for the next chatd)."""
        try:
            self.hand_over()
        except Error as exc:
            log.info("SIGTERM: %s: stopping at the end of this turn; holderd keeps every client connection "
                     "for the next chatd", exc.message)
            self.lifecycle.stop()
            return
        log.info("SIGTERM: a planned handover, as `chatctl handover` makes it")

    def _a_standby(self) -> dict | None:
        """The status of a chatd standing by at a sibling control socket, if one answers."""
        for name, path in sorted(instance_sockets(self.control_path).items()):
            if path == self.control.path:
                continue
            try:
                status = call("status", path, timeout=1.0)
            except Error:
                continue  # a socket file left by a dead instance, or one busy starting
            if status.get("role") == Role.STANDBY.value:
                return {**status, "instance": name}
        return None

    def _release(self) -> None:
        """The last of a handover: chatctl and holderd's lease let go of, for the successor."""
        self.control.close()
        self._unwatch()
        self.lease.close()

    # -- taking over ------------------------------------------------------------------
    def _take_over(self) -> None:
        reason = self._why_not_serve()
        if reason is not None:
            if not self._yielding:  # said once, however often the lease comes and goes meanwhile
                log.info("granted the lease, but %s: giving it back, and waiting", reason)
            self._yielding = True
            self._give_back()
            return
        self._yielding = False
        log.info("granted the lease: taking over")
        for holder in self.server.holders:
            holder.retry_now()  # holderd just answered: a failure while it restarted is past
        # Never afresh: a lease that came after waiting with nothing kept means holderd
        # lost what it held (it restarted empty), not that nobody serves.
        if not self._serve(fresh_allowed=False, may_take_over=lambda journal: self._nobody_else_serves(journal.owner()),
                           prepared=self.prepared):
            log.warning("giving the lease back, and waiting")
            self._give_back()

    def _give_back(self) -> None:
        self._unwatch()
        self.lease.close()
        self.server.loop.call_later(RETRY, self._ask_again)

    def _why_not_serve(self) -> str | None:
        """Why a standby given the lease must not take over, in words; None if it may.

        A lease can come while another chatd serves: holderd restarted (it remembers no
        lease) and the standby asked first; or holderd, stopping, passed it on as it
        closed the server's connection, and is gone the next moment. The journal
        holderd keeps names the process serving from it. A standby serves only from
        what holderd keeps (its own store is empty), so a holderd that keeps no journal
        (it restarted empty) or does not answer leaves it nothing to serve from."""
        try:
            with HolderClient(self.holder_path, timeout=1.0) as holderd:
                kept = holderd.retrieve(STATE_NAME)
        except Error as exc:
            return f"holderd does not answer ({exc.message})"
        journals = [item.fd for item in kept if item.name == STATE_NAME]
        try:
            if not journals:
                return "holderd keeps nothing for chatd"
            owner = read_owner(journals[0])  # not a journal this release reads: the restore says why
            return None if self._nobody_else_serves(owner, quiet=True) else f"chatd pid {owner[0]} serves"
        finally:
            close_fds(item.fd for item in kept)

    def _nobody_else_serves(self, owner: tuple[int, int] | None, quiet: bool = False) -> bool:
        """The journal names who serves from it (``owner``); a live process other than us means: not us.

        A process closes its sockets (which passed us the lease) a moment before it
        is a zombie, so an owner that still looks alive gets :data:`OWNER_GRACE` to die."""
        if owner is None or owner == process_identity(os.getpid()):
            return True
        deadline = time.monotonic() + OWNER_GRACE
        while process_identity(owner[0]) == owner:
            if time.monotonic() > deadline:
                if not quiet:
                    log.warning("chatd pid %d still serves from the journal holderd keeps", owner[0])
                return False
            time.sleep(0.002)
        return True
