"""holderd: keeps duplicates of its clients' file descriptors, by name.

The I/O edge around :class:`holderd.protocol.HolderCore`: a UNIX stream socket,
peer credentials, the event loop (:mod:`fdkeep.loop`), hang-up watching of
held sockets, and the conversation with systemd (:mod:`fdkeep.systemd`).
Run ``holderd --help`` for the options; ``holderd/PROTOCOL.md`` for the wire.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import socket
import sys

from fdkeep.errors import Error
from fdkeep.frames import DEFAULT_MAX_FRAME
from fdkeep.loop import AcceptPause, Loop, raise_fd_limit, stop_on_signals
from fdkeep.peer import FramePeer, listen_unix, peer_credentials, send_frame
from fdkeep.systemd import ServiceManager

from .client import default_socket
from .mirror import FdStoreMirror
from .protocol import Held, HolderCore, Limits, Watcher

log = logging.getLogger("holderd")


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
        self.max_frame = max_frame
        self.manager = manager or ServiceManager({})
        self.loop = Loop()
        hangups = HangupWatcher(self.loop)
        self.mirror = FdStoreMirror(self.manager)
        self.core = HolderCore(limits, Watchers(hangups, self.mirror))
        hangups.core = self.core
        self.restored = self.mirror.restore(self.core)
        self.peers: set[FramePeer] = set()
        # Anyone may connect; SO_PEERCRED, not file modes, decides who is served.
        self.listener = listen_unix(socket_path)
        self.accepting = AcceptPause(self.loop, log, "holderd")
        self.accepting.add(self.listener.fileno(), self._accept)

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
                log.warning("refused pid %d uid %d: not in --allow-uid", pid, uid)
                self._refuse(sock, uid)
                continue
            peer = FramePeer(self.loop, sock, self._on_frame, self._peer_closed, self.max_frame)
            self.peers.add(peer)

    @staticmethod
    def _refuse(sock: socket.socket, uid: int) -> None:
        try:
            sock.setblocking(False)
            send_frame(sock, Error("not-allowed", f"uid {uid} may not use this holderd").as_reply())
        except OSError:
            pass
        sock.close()

    def _peer_closed(self, peer: FramePeer) -> None:
        self.peers.discard(peer)
        by_number = {id(other): other for other in self.peers}
        for number, event in self.core.peer_gone(id(peer)):
            waiter = by_number.get(number)
            if waiter is not None:
                log.info("lease %s passes to %r (its holder, pid %d, is gone)", event["lease"], waiter, peer.pid)
                waiter.send(event)

    def _on_frame(self, peer: FramePeer, body: dict, fds: list[int]) -> None:
        for reply in self.core.handle(peer.uid, body, fds, id(peer)):
            if not reply.body.get("ok"):
                log.info("%r: %s %s: %s", peer, body.get("op"), reply.body["error"], reply.body["message"])
            peer.send(reply.body, reply.fds)

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
        "systemd, /run/holderd/holderd.sock for root, else $XDG_RUNTIME_DIR/holderd/holderd.sock; "
        "now %(default)s)",
    )
    parser.add_argument(
        "--allow-uid",
        action="append",
        type=uid_of,
        metavar="USER",
        help="a uid or user name allowed to store and retrieve (repeatable; default: holderd's "
        "own uid and root)",
    )
    parser.add_argument(
        "--max-fds-per-uid",
        type=int,
        help="how many fds one uid may have held (default: the fd limit less 256 for holderd's own use)",
    )
    parser.add_argument("--max-meta-bytes", type=int, default=Limits.max_meta_bytes)
    parser.add_argument("--max-frame-bytes", type=int, default=DEFAULT_MAX_FRAME)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="holderd: %(levelname)s %(message)s", stream=sys.stderr)
    allowed = set(args.allow_uid) if args.allow_uid else {os.geteuid(), 0}
    fd_limit = raise_fd_limit()
    max_fds_per_uid = args.max_fds_per_uid or max(fd_limit - 256, 1)
    if max_fds_per_uid > fd_limit:
        log.warning("--max-fds-per-uid %d exceeds RLIMIT_NOFILE %d: raise LimitNOFILE=", max_fds_per_uid, fd_limit)
    limits = Limits(max_fds_per_uid, args.max_meta_bytes)
    try:
        daemon = Holderd(args.socket, allowed, limits, args.max_frame_bytes, ServiceManager())
    except OSError as exc:
        log.error("cannot listen on %s: %s", args.socket, exc)
        return 1
    stop_on_signals(log)
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
