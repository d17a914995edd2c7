"""chatd's control socket: what ``chatctl`` asks a running chatd, in frames.

Theory of operation
-------------------
chatctl speaks :mod:`fdkeep.frames` to a UNIX socket (:func:`default_socket`):
one request ``{"op": NAME}``, one reply, ``{"ok": true, ...}`` or an error with
a code. Only root and chatd's own uid are served. The chatd that take turns
(``--lease``, :mod:`chatd.standby`) each answer at a socket of their own
(:func:`instance_socket`, e.g. ``control@1.sock``), and the one serving at the
default socket too, so that chatctl reaches the server by default and each
instance by its name. The operations:

============  ===========================================================
``status``    pid, port, clients, pairs, holders and what each holds
``clients``   one row per client: nick, target, peer, count, remote, held
``backup``    repack every bundle of sockets, store it and the journal again;
              what each holder then says it keeps, and what it lacks
``restore``   a chatd started with ``--restore --wait`` takes its sockets now
``drain``     end every client connection on purpose (each gets BYE)
``crash``     die of a real SIGSEGV, after the reply
``handover``  with ``--lease``, once a standby waits: finish this loop turn
              (its commit included), give the lease to the standby and exit 0,
              every client connection left open for it (:mod:`chatd.standby`)
============  ===========================================================

A request that fails inside chatd is answered with ``failed`` and logged; it
never takes chatd down.
"""

from __future__ import annotations

import errno
import faulthandler
import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Callable

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.loop import AcceptPause
from fdkeep.paths import runtime_dir
from fdkeep.peer import FramePeer, FrameSocket, listen_unix

from . import reports
from .server import Role

if TYPE_CHECKING:
    from .server import ChatServer

log = logging.getLogger("chatd")
#: Seconds a control request begun may take to arrive whole.
FRAME_TIMEOUT = 5.0
#: A report of every client (``clients``) runs to some 150 bytes a client.
MAX_REPLY = 64 << 20


def default_socket(*, own_service: bool = False) -> str:
    """``$CHATD_CONTROL``, else ``control.sock`` in chatd's runtime directory."""
    return os.environ.get("CHATD_CONTROL") or os.path.join(runtime_dir("chatd", own_service=own_service), "control.sock")


def instance_socket(path: str, instance: str) -> str:
    """The control socket of one of the chatd taking turns (``chatd --lease --instance``):
    ``/run/chatd/control.sock`` and instance ``1`` give ``/run/chatd/control@1.sock``."""
    root, extension = os.path.splitext(path)
    return f"{root}@{instance}{extension}"


def instance_sockets(path: str) -> dict[str, str]:
    """{instance: socket path} of every instance socket beside ``path`` (live or stale)."""
    root, extension = os.path.splitext(path)
    prefix, found = os.path.basename(root) + "@", {}
    try:
        names = os.listdir(os.path.dirname(path) or ".")
    except OSError:
        return found
    for name in names:
        if name.startswith(prefix) and name.endswith(extension) and len(name) > len(prefix) + len(extension):
            found[name[len(prefix):len(name) - len(extension)]] = os.path.join(os.path.dirname(path), name)
    return found


def call(op: str, path: str | None = None, timeout: float = 10.0) -> dict:
    """One control request; the reply body. Raises :class:`~fdkeep.errors.Error` with chatd's error code."""
    path = path or default_socket()
    try:
        with FrameSocket(path, timeout, max_frame=MAX_REPLY) as conn:
            try:
                conn.send({"op": op})
            except (BrokenPipeError, ConnectionResetError):
                pass  # chatd may have refused us and hung up first: its reason is still there to read
            frame = conn.receive()
    except (OSError, ConnectionError, Error) as exc:
        raise Error(
            "unavailable",
            f"cannot reach chatd's control socket {path} ({exc}); is chatd running? "
            "(`systemctl status chatd`, or pass --control PATH)",
        ) from None
    close_fds(frame.fds)
    if not frame.body.get("ok"):
        raise Error(str(frame.body.get("error", "unknown")), str(frame.body.get("message", "")))
    return frame.body


class ControlServer:
    """Answers at ``path``, and at more paths given to :meth:`answer_also_at` (the
    well-known one, for the chatd of a pair that serves)."""

    def __init__(self, server: "ChatServer", path: str, restore_now: Callable[[], dict]):
        """``restore_now()``: what ``chatctl restore`` asks for (chatd.lifecycle): the summary."""
        self.server = server
        self.path = path
        self._restore_now = restore_now
        #: What ``chatctl handover`` asks for: set by chatd.standby's Turns (``--lease``), else None.
        self.hand_over: Callable[[], dict] | None = None
        #: Set by chatd.standby: what a standby has read ahead for its takeover (status's "prepared").
        self.prepared_report: Callable[[], dict | None] = lambda: None
        self.peers: set[FramePeer] = set()
        self.accepting = AcceptPause(server.loop, log, "control socket")
        #: path -> (listening socket, inode of the file it made): only our own file is unlinked.
        self.listeners: dict[str, tuple] = {}
        self._listen(path)

    def _listen(self, path: str) -> None:
        sock = listen_unix(path, backlog=16)
        self.listeners[path] = (sock, os.stat(path).st_ino)
        self.accepting.add(sock.fileno(), lambda mask: self._accept(sock))

    @staticmethod
    def _overdue(peer: FramePeer, error: Error) -> None:
        log.warning("control: %r dropped: %s", peer, error.message)

    def _accept(self, listener) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # out of fds: chatd goes on, chatctl waits or times out
            self.accepting.failed(exc)
            return
        self.accepting.accepted()
        peer = FramePeer(self.server.loop, sock, self._on_frame, self.peers.discard,
                         frame_timeout=(FRAME_TIMEOUT, "the control timeout"), on_overdue=self._overdue)
        if peer.uid not in (0, os.geteuid()):
            log.warning("control: refused uid %d", peer.uid)
            peer.send(Error("not-allowed", f"uid {peer.uid} may not control chatd").as_reply())
            peer.close_after_flush()
            return
        self.peers.add(peer)

    def _on_frame(self, peer: FramePeer, body: dict, fds: list[int]) -> None:
        close_fds(fds)
        op = body.get("op")
        handler = getattr(self, "_op_" + op, None) if isinstance(op, str) and op.isalpha() else None
        if handler is None:
            peer.send(Error("unknown-op", f"unknown control operation {op!r}").as_reply())
            return
        try:
            reply = handler(peer)
        except Error as exc:
            reply = exc.as_reply()
        except Exception as exc:  # a control request must never take chatd down
            log.exception("control %s failed", op)
            reply = Error("failed", str(exc)).as_reply()
        if reply is not None:
            peer.send(reply)

    def _op_status(self, peer):
        return {"ok": True, **reports.status(self.server), "prepared": self.prepared_report()}

    def _serving(self) -> None:
        if self.server.role is Role.STANDBY:
            raise Error("standby", "this chatd is the standby: it serves once the one serving dies "
                                   "(talk to that one: chatctl's default --control)")
        if self.server.role is not Role.SERVING:
            raise Error("not-serving", "chatd waits for `chatctl restore` first")

    def _op_clients(self, peer):
        self.server.adoption.adopt_all("chatctl clients lists every client's connection")
        return {"ok": True, "clients": reports.clients(self.server)}

    def _op_backup(self, peer):
        self._serving()
        return {"ok": True, **self.server.backup.now()}

    def _op_restore(self, peer):
        return {"ok": True, **self._restore_now()}

    def _op_drain(self, peer):
        self._serving()
        return {"ok": True, "drained": self.server.drain()}

    def _op_crash(self, peer):
        self._serving()
        log.warning("crash requested by pid %d: dying of SIGSEGV", peer.pid)
        peer.send({"ok": True, "pid": os.getpid()})
        peer.sock.setblocking(True)
        peer.close_after_flush()
        crash()

    def _op_handover(self, peer):
        self._serving()
        if self.hand_over is None:
            raise Error("no-standby", "this chatd does not take turns with a standby (chatd --lease): nothing "
                                      "would take over; restart it instead (it restores its clients itself)")
        reply = {"ok": True, **self.hand_over()}
        log.info("handover requested by pid %d", peer.pid)
        peer.send(reply)  # before the turn ends, and with it this process
        peer.sock.setblocking(True)
        peer.close_after_flush()

    def answer_also_at(self, path: str, grace: float = 0.0) -> None:
        """Listen at ``path`` too (the well-known socket, once this chatd serves). A process
        listening there is given ``grace`` seconds to stop before this fails (OSError
        EADDRINUSE): a killed predecessor passes the lease on as its files close, and its
        listener here may be among the last to (chatd.standby)."""
        if path in self.listeners:
            return
        began = time.monotonic()
        deadline = began + grace
        while True:
            try:
                self._listen(path)
                if time.monotonic() > began + 0.002:
                    log.info("answering at %s too, after %.1f ms in which another process still listened there",
                             path, (time.monotonic() - began) * 1000)
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.002)

    def stop_answering_at(self, path: str) -> None:
        if path not in self.listeners:
            return
        sock, inode = self.listeners.pop(path)
        self.accepting.remove(sock.fileno())
        sock.close()
        try:
            if os.stat(path).st_ino == inode:  # not a successor's socket
                os.unlink(path)
        except OSError:
            pass

    def close(self) -> None:
        for path in list(self.listeners):
            self.stop_answering_at(path)


def crash() -> None:
    """Die of a real SIGSEGV, as a bug in a C extension would: no cleanup, no exit handlers."""
    faulthandler.disable()
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)
