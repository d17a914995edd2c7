"""holderd: keeps duplicates of its clients' file descriptors, by name.

Theory of operation
-------------------
The I/O edge around :class:`holderd.protocol.HolderCore`: a UNIX stream socket,
peer credentials, the event loop (:mod:`fdkeep.loop`), hang-up watching of
held sockets, and the conversation with systemd (:mod:`fdkeep.systemd`).
Run ``holderd --help`` for the options; ``holderd/PROTOCOL.md`` for the wire.

Whatever a client makes holderd keep is bounded per connection and per uid
(:class:`~holderd.protocol.Limits`), so that no client can take from another
what holderd has (its fds above all):

- connections: a uid's connection past ``max_connections_per_uid`` gets
  ``too-many-connections`` and is closed;
- frames under way (:class:`~fdkeep.peer.FramePeer` parks what arrives until a
  frame is whole): when a read puts a uid's parked bytes or fds over its bound,
  that peer gets ``parked-limit`` and is dropped; a frame begun must be whole
  within ``frame_timeout``, else the peer gets ``timeout`` and is dropped (the
  peer's own deadline timer: :class:`~fdkeep.peer.FramePeer`);
- replies: a peer is answered one request at a time. Its :class:`Replies` are
  taken only while it has room: its unread fds (queued or in flight in its
  socket) under the per-peer and the per-uid bound, less than
  ``FramePeer.HIGH_WATER`` bytes waiting. Until its request is answered the
  peer is held: no other request of it is read, so a client that pipelines
  RETRIEVEs and reads nothing makes holderd keep at most its bounds, and waits.
  Room comes back when a peer reads or its queue moves (``on_drain``), or a
  peer closes; the replies waiting are then taken again after the loop's
  events (:meth:`Holderd._answer_waiting`), in the order they came, and once a
  second whatever happens. When holderd itself has no fd to spare and none is
  queued to be freed, the request ends with ``no-resources``.

Every offender is logged with its pid and uid and what it did, at most once a
minute per uid and offence (:class:`~fdkeep.logs.Offences`).

A lease (``LEASE``) passes when its holder is gone, and the holder is gone at
the first of two events, heard in the same loop turn that grants the lease on:
its connection ends (the hang-up: the kernel closed the last copy of its
socket), or its process exits. The second is needed because a process that
forked keeps its sockets alive in its children: a dead holder whose child
lives would otherwise keep the lease for as long as the child does. So a peer
that asks for a lease has its process watched (:class:`ProcessWatch`, a pidfd
on the loop), and when that process exits its connection is closed: whatever
it held or waited for passes on, at once, and once (the connection's end is
the only path to the core's ``peer_gone``; the pidfd goes with the peer).
Without pidfds (Linux < 5.3) that is said once and the hang-up alone counts.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import socket
import sys

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.frames import DEFAULT_MAX_FRAME, MAX_FDS_PER_FRAME
from fdkeep.logs import Offences
from fdkeep.loop import IN, AcceptPause, Loop, raise_fd_limit, stop_on_signals
from fdkeep.peer import FramePeer, listen_unix, peer_credentials, peer_pidfd, send_frame
from fdkeep.systemd import ServiceManager

from .client import default_socket
from .mirror import FdStoreMirror
from .protocol import Held, HolderCore, Limits, Replies, Watcher, out_of_fds

log = logging.getLogger("holderd")

#: A peer whose replies wait this long for it to read them is logged (once).
UNREAD_REPORT_AFTER = 5.0


class HangupWatcher(Watcher):
    """Drops a held socket when it reports POLLHUP/POLLERR, as systemd's store does."""

    def __init__(self, loop: Loop):
        self.loop = loop
        self.core: HolderCore | None = None

    def held(self, uid: int, held: Held) -> None:
        if held.kind != "socket" or self.loop.watching(held.fd):
            return
        self.loop.add(held.fd, 0, lambda mask, fd=held.fd: self._hung_up(fd))

    def released(self, uid: int, held: Held) -> None:
        self.loop.remove(held.fd)

    def _hung_up(self, fd: int) -> None:
        held = self.core.drop_fd(fd)
        if held is not None:
            log.info("dropped %s: its socket hung up", held.name)


class ProcessWatch:
    """Hears the process of a peer exit, though its connection may live on in a child: a pidfd
    of the process that connected (:func:`~fdkeep.peer.peer_pidfd`) is readable once it has.
    Owns those pidfds, one per peer watched, until :meth:`forget`."""

    def __init__(self, loop: Loop, on_exit):
        self.loop = loop
        self.on_exit = on_exit
        self.pidfds: dict[FramePeer, int] = {}
        self._reported: set[int] = set()

    def watch(self, peer: FramePeer) -> bool:
        """Call ``on_exit(peer)`` when the peer's process exits; False if it is gone already."""
        if peer in self.pidfds:
            return True
        try:
            pidfd = peer_pidfd(peer.sock, peer.pid)
        except ProcessLookupError:
            return False
        except OSError as exc:
            if exc.errno not in self._reported:  # once per cause: a kernel without pidfds is for good
                self._reported.add(exc.errno)
                log.warning(
                    "cannot watch the process of %r (%s; pidfds need Linux >= 5.3): its leases pass only "
                    "when its connection ends, which a child of it that keeps the socket puts off; said "
                    "once for this error", peer, exc.strerror or exc)
            return True
        self.pidfds[peer] = pidfd
        self.loop.add(pidfd, IN, lambda mask, peer=peer: self.on_exit(peer))
        return True

    def forget(self, peer: FramePeer) -> None:
        pidfd = self.pidfds.pop(peer, None)
        if pidfd is not None:
            self.loop.remove(pidfd)
            os.close(pidfd)


class Watchers(Watcher):
    """Tells several watchers, in order."""

    def __init__(self, *watchers: Watcher):
        self.watchers = watchers

    def held(self, uid: int, held: Held) -> None:
        for watcher in self.watchers:
            watcher.held(uid, held)

    def released(self, uid: int, held: Held) -> None:
        for watcher in self.watchers:
            watcher.released(uid, held)

    def updated(self, uid: int, held: Held) -> None:
        for watcher in self.watchers:
            watcher.updated(uid, held)


class Holderd:
    def __init__(
        self,
        socket_path: str,
        allowed_uids: set[int],
        limits: Limits,
        max_frame: int,
        manager: ServiceManager | None = None,
    ):
        self.socket_path = socket_path
        self.allowed_uids = allowed_uids
        self.limits = limits
        self.max_frame = max_frame
        self.manager = manager or ServiceManager({})
        self.loop = Loop()
        hangups = HangupWatcher(self.loop)
        self.mirror = FdStoreMirror(self.manager)
        self.core = HolderCore(limits, Watchers(hangups, self.mirror))
        hangups.core = self.core
        self.restored = self.mirror.restore(self.core)
        self.peers: set[FramePeer] = set()
        self.by_uid: dict[int, set[FramePeer]] = {}
        #: The peers whose request is not all answered yet, in the order they asked.
        self.answering: dict[FramePeer, Replies] = {}
        #: Since when each of those waits for room, and whether that was logged.
        self.waiting: dict[FramePeer, list] = {}
        #: The processes of the peers that asked for a lease, and those found exited.
        self.processes = ProcessWatch(self.loop, self._process_exited)
        self._exited: set[FramePeer] = set()
        #: Set by close(): holderd goes, and its leases with it.
        self.stopping = False
        self._room_grew = False
        self.offences = Offences(log)
        #: ``--metrics-port``: the metrics endpoint (holderd.metrics), or None.
        self.metrics = None
        # Anyone may connect; SO_PEERCRED, not file modes, decides who is served.
        self.listener = listen_unix(socket_path)
        self.accepting = AcceptPause(self.loop, log, "holderd")
        self.accepting.add(self.listener.fileno(), self._accept)
        self.loop.after_events(self._answer_waiting)
        self.loop.call_every(1.0, self._sweep)

    # -- connections ------------------------------------------------------------------
    def _accept(self, mask: int) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.accepting.failed(exc, f" holding {self.core.count()} fds")
                return
            self.accepting.accepted()
            pid, uid, _ = peer_credentials(sock)
            if uid not in self.allowed_uids:
                self.offences.warning((uid, "not-allowed"), "refused pid %d uid %d (not-allowed): not in --allow-uid", pid, uid)
                self._refuse(sock, Error("not-allowed", f"uid {uid} may not use this holderd"))
                continue
            mine = self.by_uid.setdefault(uid, set())
            if len(mine) >= self.limits.max_connections_per_uid:
                self.offences.warning(
                    (uid, "too-many-connections"),
                    "refused pid %d uid %d (too-many-connections): the uid has %d, the most --max-connections-per-uid allows",
                    pid, uid, len(mine))
                self._refuse(sock, Error(
                    "too-many-connections",
                    f"uid {uid} has {len(mine)} connections to holderd, the most --max-connections-per-uid "
                    "allows; close some (one connection carries any number of requests) or raise it"))
                continue
            peer = FramePeer(self.loop, sock, self._on_frame, self._peer_closed, self.max_frame,
                             on_drain=self._drained, on_parked=self._parked,
                             frame_timeout=(self.limits.frame_timeout, "--frame-timeout"), on_overdue=self._overdue)
            self.peers.add(peer)
            mine.add(peer)

    @staticmethod
    def _refuse(sock: socket.socket, error: Error) -> None:
        try:
            sock.setblocking(False)
            send_frame(sock, error.as_reply())
        except OSError:
            pass
        sock.close()

    def _process_exited(self, peer: FramePeer) -> None:
        """The peer's process is gone: so is the peer, whoever else keeps its socket."""
        self._exited.add(peer)
        peer.close()  # -> _peer_closed, now

    def _peer_closed(self, peer: FramePeer) -> None:
        self.processes.forget(peer)
        if peer in self._exited:
            self._exited.discard(peer)
            seen = "its process exited (pidfd)"
        else:
            seen = "its connection ended (hang-up)"
        self.peers.discard(peer)
        mine = self.by_uid.get(peer.uid)
        if mine is not None:
            mine.discard(peer)
            if not mine:
                del self.by_uid[peer.uid]
        # Nothing to close: replies not taken yet hold no duplicates.
        self.answering.pop(peer, None)
        self.waiting.pop(peer, None)
        self._room_grew = True
        if self.stopping:
            return  # no lease passes: every connection reads its end, and asks the next holderd
        by_number = {id(other): other for other in self.peers}
        for number, event in self.core.peer_gone(id(peer)):
            waiter = by_number.get(number)
            if waiter is not None:
                waiter.send(event)
                log.info("lease %s passes to %r (its holder, pid %d, is gone: %s first; granted %d us after "
                         "holderd noticed)", event["lease"], waiter, peer.pid, seen,
                         (self.loop.clock() - self.loop.woke_at) * 1e6)

    def _parked(self, peer: FramePeer) -> Error | None:
        """After a read: the peer is dropped if its uid's connections now park too much."""
        mine = self.by_uid.get(peer.uid, ())
        for what, parked, most, option in (
            ("bytes", sum(p.parked_bytes for p in mine), self.limits.max_parked_bytes_per_uid,
             "--max-parked-bytes-per-uid"),
            ("fds", sum(p.parked_fds for p in mine), self.limits.max_parked_fds_per_uid,
             "--max-parked-fds-per-uid"),
        ):
            if parked > most:
                self.offences.warning(
                    (peer.uid, "parked-limit"),
                    "%r dropped (parked-limit): its uid's unfinished frames hold %d %s in holderd, over %s %d",
                    peer, parked, what, option, most)
                return Error(
                    "parked-limit",
                    f"uid {peer.uid}'s connections keep {parked} {what} of frames not yet whole in holderd, "
                    f"over {option} {most}: send each frame whole, fewer at once",
                    fatal=True)
        return None

    def _overdue(self, peer: FramePeer, error: Error) -> None:
        self.offences.warning((peer.uid, "timeout"), "%r dropped (timeout): %s", peer, error.message)

    def _sweep(self) -> None:
        """Once a second: tell the peers whose replies wait unread; and look for room that came
        without an event."""
        now = self.loop.clock()
        for peer, state in self.waiting.items():
            since, told = state
            if not told and now - since >= UNREAD_REPORT_AFTER:
                state[1] = True
                self.offences.info(
                    (peer.uid, "unread"),
                    "%r has left %d fds and %d bytes of its replies unread for %.0f s: "
                    "its next requests wait until it reads them", peer, peer.unread_fds,
                    peer.output.pending, now - since)
        if self.answering:
            self._room_grew = True

    # -- requests and replies ---------------------------------------------------------
    def _on_frame(self, peer: FramePeer, body: dict, fds: list[int]) -> None:
        # Watched from its first LEASE on, so that no lease is granted to or kept by a dead process.
        # (Without SO_PEERPIDFD the pid is looked up: now, just after it asked, is the best time.)
        if body.get("op") == "LEASE" and not self.processes.watch(peer):
            close_fds(fds)
            log.info("%r asked for a lease, but its process is gone (a child keeps its socket): closing it", peer)
            self._process_exited(peer)
            return
        self.answering[peer] = self.core.handle(peer.uid, body, fds, id(peer))
        if not self._answer(peer):
            peer.hold(True)  # its next requests wait in its socket meanwhile

    def _answer(self, peer: FramePeer) -> bool:
        """Send the peer what it has room for of its replies; True once all are sent."""
        replies = self.answering[peer]
        while not replies.done and not peer.dropped:
            if peer.lagging:
                return self._wait(peer)
            room = self._fd_room(peer)
            reply = replies.take(room)
            if reply is None:
                if room == 0 or any(other.output.fds for other in self.peers):
                    return self._wait(peer)  # room comes when a peer reads, or fds queued are sent
                reply = replies.fail(out_of_fds())
            if not reply.body.get("ok"):
                self.offences.info((peer.uid, reply.body["error"]), "%r: %s: %s", peer,
                                   reply.body["error"], reply.body["message"])
            peer.send(reply.body, reply.fds)
            if peer.closed:
                return True
        self.answering.pop(peer, None)
        self.waiting.pop(peer, None)
        return True

    def _wait(self, peer: FramePeer) -> bool:
        self.waiting.setdefault(peer, [self.loop.clock(), False])
        return False

    def _fd_room(self, peer: FramePeer) -> int:
        """How many fds the peer's next reply may carry."""
        room = min(MAX_FDS_PER_FRAME, self.limits.max_unread_fds_per_peer - peer.unread_fds)
        if room > 0:
            uid_unread = sum(other.unread_fds for other in self.by_uid.get(peer.uid, ()))
            room = min(room, self.limits.max_unread_fds_per_uid - uid_unread)
        return max(room, 0)

    def _drained(self, peer: FramePeer) -> None:
        self._room_grew = True

    def _answer_waiting(self) -> None:
        """After the loop's events: if room may have grown, answer on, in the order asked."""
        if not self._room_grew:
            return
        self._room_grew = False
        for peer in list(self.answering):
            if peer in self.answering and self._answer(peer) and not peer.closed:
                peer.hold(False)  # its next requests, received or not, are taken now

    def status_line(self) -> str:
        return f"holding {self.core.count()} fds for {len(self.allowed_uids)} allowed uids"

    def serve(self) -> None:
        log.info("holding %d fds for uids %s on %s", self.core.count(), sorted(self.allowed_uids), self.socket_path)
        self._status = self.status_line()
        self.manager.ready(self._status)
        self.loop.call_every(1.0, self._report_status)
        if self.manager.watchdog_interval:
            self.loop.call_every(self.manager.watchdog_interval, self.manager.watchdog, first=0)
        self.loop.run_forever()

    def _report_status(self) -> None:
        status = self.status_line()
        if status != self._status:
            self._status = status
            self.manager.status(status)

    def close(self) -> None:
        self.manager.stopping(f"stopping; {self.status_line()}")
        if self.metrics is not None:
            self.metrics.close()
        self.stopping = True
        # What systemd's store keeps must stay there: a restart passes it back.
        self.mirror.detach()
        for peer in list(self.peers):
            peer.close()
        self.core.close()
        self.listener.close()
        try:
            os.unlink(self.socket_path)
        except OSError:
            pass
        self.loop.close()


def uid_of(user: str) -> int:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise argparse.ArgumentTypeError(f"no user named {user!r} (give a name or a numeric uid)") from None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="holderd",
        description=(
            "Hold duplicates of other processes' file descriptors, each with a name and a "
            "small metadata blob, and give them back on request. Clients speak the frame "
            "protocol in holderd/PROTOCOL.md over a UNIX stream socket; each uid sees only "
            "its own names."
        ),
    )
    parser.add_argument(
        "--socket",
        default=default_socket(own_service=True),
        help="socket path (default: $HOLDERD_SOCKET, $RUNTIME_DIRECTORY/holderd.sock under "
        "systemd, /run/holderd/holderd.sock for root, else $XDG_RUNTIME_DIR/holderd/holderd.sock, "
        "else /tmp/holderd-<uid>/holderd.sock; now %(default)s)",
    )
    parser.add_argument(
        "--allow-uid",
        action="append",
        type=uid_of,
        metavar="USER",
        help="a uid or user name allowed to store and retrieve (repeatable; default: holderd's "
        "own uid and root)",
    )
    bounds = parser.add_argument_group(
        "bounds",
        "What a client may make holderd keep, each with the error it gets past it (all of them: "
        "holderd/PROTOCOL.md, Limits). \"The fd limit\" is holderd's RLIMIT_NOFILE (LimitNOFILE=).",
    )
    bounds.add_argument(
        "--max-fds-per-uid",
        type=positive_int, metavar="N",
        help="how many fds one uid may have held; past it a STORE gets limit-reached "
        "(default: the fd limit less 256 for holderd's own use)",
    )
    bounds.add_argument("--max-meta-bytes", type=positive_int, metavar="BYTES", default=Limits.max_meta_bytes,
                        help="the metadata of one item, decoded; past it: meta-too-large (default: %(default)s)")
    bounds.add_argument("--max-frame-bytes", type=positive_int, metavar="BYTES", default=DEFAULT_MAX_FRAME,
                        help="the body of one request; past it: frame-too-large, and the connection is closed "
                        "(default: %(default)s)")
    bounds.add_argument(
        "--max-connections-per-uid", type=positive_int, metavar="N", default=Limits.max_connections_per_uid,
        help="connections one uid may have open to holderd at once; one more gets too-many-connections "
        "and is closed (default: %(default)s)")
    bounds.add_argument(
        "--max-unread-fds-per-peer", type=positive_int, metavar="N",
        help="fds in replies one connection may have unread (queued in holderd or in flight in its "
        "socket); at it, holderd sends that connection no more fds and reads none of its requests "
        "until it reads (default: 1024, or a sixteenth of the fd limit if less)")
    bounds.add_argument(
        "--max-unread-fds-per-uid", type=positive_int, metavar="N",
        help="the same for all connections of one uid together (default: 4096, or a quarter of the fd "
        "limit if less)")
    bounds.add_argument(
        "--max-parked-bytes-per-uid", type=positive_int, metavar="BYTES", default=Limits.max_parked_bytes_per_uid,
        help="bytes of frames not yet whole that one uid's connections may have sent holderd in all; the "
        "connection whose read goes past it gets parked-limit and is closed (default: %(default)s, 8 MiB)")
    bounds.add_argument(
        "--max-parked-fds-per-uid", type=positive_int, metavar="N",
        help="the same for fds that came with frames not yet whole (default: 1024, or an eighth of the "
        "fd limit if less, but at least 253: one full STORE)")
    bounds.add_argument(
        "--frame-timeout", type=positive_float, default=Limits.frame_timeout, metavar="SECONDS",
        help="how long a frame begun may take to arrive whole; past it the connection gets timeout and "
        "is closed (default: %(default)s)")
    parser.add_argument(
        "--metrics-port", type=int, default=None, metavar="PORT",
        help="serve Prometheus metrics (names and fds held per uid, connections, leases; README.md, \"Metrics\") "
        "over HTTP on this port, 0 for any free one (default: none; README.md has the drop-in for "
        "holderd.service, whose sandbox keeps it off any network otherwise)")
    parser.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                        help="the address --metrics-port listens on (default %(default)s: this host only)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="the least important messages logged, to stderr (default %(default)s)")
    args = parser.parse_args(argv)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        parser.error("--metrics-port must be 0-65535")
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def limits_from(args: argparse.Namespace, fd_limit: int) -> Limits:
    """The bounds the options ask for; those left out scale with holderd's fd limit."""

    def share(value, default: int, part: int, least: int = 1) -> int:
        return value if value is not None else max(min(default, fd_limit // part), least)

    return Limits(
        max_fds_per_uid=args.max_fds_per_uid or max(fd_limit - 256, 1),
        max_meta_bytes=args.max_meta_bytes,
        max_connections_per_uid=args.max_connections_per_uid,
        max_unread_fds_per_peer=share(args.max_unread_fds_per_peer, Limits.max_unread_fds_per_peer, 16),
        max_unread_fds_per_uid=share(args.max_unread_fds_per_uid, Limits.max_unread_fds_per_uid, 4),
        max_parked_bytes_per_uid=args.max_parked_bytes_per_uid,
        max_parked_fds_per_uid=share(args.max_parked_fds_per_uid, Limits.max_parked_fds_per_uid, 8,
                                     least=MAX_FDS_PER_FRAME),
        frame_timeout=args.frame_timeout,
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="holderd: %(levelname)s %(message)s", stream=sys.stderr)
    allowed = set(args.allow_uid) if args.allow_uid else {os.geteuid(), 0}
    fd_limit = raise_fd_limit()
    limits = limits_from(args, fd_limit)
    if limits.max_fds_per_uid > fd_limit:
        log.warning("--max-fds-per-uid %d exceeds RLIMIT_NOFILE %d: raise LimitNOFILE=", limits.max_fds_per_uid, fd_limit)
    try:
        daemon = Holderd(args.socket, allowed, limits, args.max_frame_bytes, ServiceManager())
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.socket, exc)
        return 1
    except Error as exc:  # what systemd's fd store keeps is not this release's to read
        log.error("%s", exc.message)
        return 1
    stop_on_signals(log)
    if args.metrics_port is not None:
        from .metrics import endpoint

        daemon.metrics = endpoint(daemon, args.metrics_address, args.metrics_port, log)
        daemon.metrics.start()
    try:
        daemon.serve()
    except SystemExit:
        pass
    finally:
        daemon.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
