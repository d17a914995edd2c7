"""chatd: the chat server whose connections outlive its process.

Theory of operation
-------------------
The protocol lives in :mod:`chatd.room` and :mod:`chatd.lines`; this module is
the I/O edge around them. :class:`Connection` is the one place where a
client's bytes enter and leave the server. :class:`ChatServer` accepts
clients, feeds their lines to the room, carries out the room's actions, and
keeps the *holders* (:mod:`chatd.backup`) and the shared state file
(:mod:`chatd.state`) up to date:

- a client socket is stored in every holder when it is accepted and again
  whenever its pairing changes (with fresh metadata), and removed from them
  when chatd closes it on purpose;
- the listening socket and the state file are stored once, at start;
- every change to a member's persistent fields is committed to the state file
  right after the command that made it.

On start chatd asks its holders what they kept. If they hold a listening
socket it *restores*: it takes that socket instead of binding a new one, maps
the old state file, matches each returned client socket to its record by inode
(every duplicate of one socket has the same inode) and resumes as if nothing
happened. Clients that connected while no chatd ran are waiting in the
listening socket's backlog and are accepted as usual.
"""

from __future__ import annotations

import argparse
import errno
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import time

from holderd import paths
from holderd.eventloop import HANGUP, IN, OUT, FramePeer, Loop, raise_fd_limit, stop_on_signals
from holderd.servicemanager import ServiceManager
from holderd.wire import close_fds

from . import backup
from .fdstore import SystemdHolder
from .lines import LineFramer, encode_line
from .room import Close, Member, Room, Send
from .state import Record, StateError, StateFile

log = logging.getLogger("chatd")

#: A client that stops reading may not make chatd buffer more than this for it.
MAX_OUTPUT_BACKLOG = 4 << 20
#: How often systemd hears the status line (when it changed).
STATUS_INTERVAL = 1.0
#: How often chatd checks that holderd still holds everything (it may have been
#: stopped and started meanwhile, which empties it).
AUDIT_INTERVAL = 5.0


class Connection:
    """One client's socket: bytes in through :meth:`_read`, out through :meth:`send`."""

    def __init__(self, server: "ChatServer", sock: socket.socket, member_id: int):
        self.server = server
        self.sock = sock
        self.member_id = member_id
        self.inode = os.fstat(sock.fileno()).st_ino
        self.framer = LineFramer()
        self.output = bytearray()
        self.closed = False
        self.finished = False  # said its last line; it only waits to be closed
        sock.setblocking(False)
        try:
            self.remote = "%s:%d" % sock.getpeername()[:2]
        except OSError:
            self.remote = "?"
        server.loop.add(sock.fileno(), IN, self._on_event)

    def _on_event(self, mask: int) -> None:
        if mask & (IN | HANGUP):
            self._read()
        if not self.closed and mask & OUT:
            self._flush()

    def _read(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.server.close_client(self.member_id, f"read failed: {exc.strerror}")
            return
        if not data:
            self.server.close_client(self.member_id, "client closed the connection")
            return
        for line in self.framer.feed(data):
            if self.closed:
                return
            self.server.on_line(self, line)

    def send(self, text: str, last: bool = False) -> None:
        if self.closed or self.finished:
            return
        self.finished = last
        self.output += encode_line(text)
        if len(self.output) > MAX_OUTPUT_BACKLOG:
            self.server.close_client(self.member_id, f"does not read: over {MAX_OUTPUT_BACKLOG} bytes queued")
            return
        self._flush()

    def _flush(self) -> None:
        try:
            while self.output:
                sent = self.sock.send(self.output)
                del self.output[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                log.info("member %d: write failed: %s", self.member_id, exc)
            self.output.clear()
        self.server.loop.modify(self.sock.fileno(), IN | OUT if self.output else IN)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.server.loop.remove(self.sock.fileno())
        # The holders still have duplicates of this socket: only shutdown() ends
        # the connection for all of them at once, so the client sees its EOF now.
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class ChatServer:
    def __init__(self, holders: list, max_clients: int, manager: ServiceManager | None = None):
        self.loop = Loop()
        self.manager = manager or ServiceManager({})
        self._status_sent: str | None = None
        self._status_due = 0.0
        self._audit_due = time.monotonic() + AUDIT_INTERVAL
        self.room = Room()
        self.holders = holders
        self.max_clients = max_clients
        self.connections: dict[int, Connection] = {}
        self.listener: socket.socket | None = None
        self.state: StateFile | None = None
        self.started = time.time()
        self.restored_at: float | None = None
        self.control: ControlServer | None = None

    # -- start: fresh or restored ---------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self.listener.getsockname()[1] if self.listener else None

    def bind(self, host: str, port: int) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        # A fresh start after a crash must not wait for TIME_WAIT sockets to expire.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
        self.state = StateFile.create(self.max_clients)
        self._listen_on(listener)
        self._store_everywhere(self._server_items())
        log.info("listening on %s:%d (fresh start)", host, self.port)

    def _server_items(self) -> list[tuple[str, bytes, int]]:
        return [
            (backup.LISTEN_NAME, b"{}", self.listener.fileno()),
            (backup.STATE_NAME, b"{}", self.state.fd),
        ]

    def _listen_on(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.loop.add(listener.fileno(), IN, self._accept)

    def restore(self) -> dict | None:
        """Take back what the holders kept; None if they hold no listening socket."""
        began = time.monotonic()
        kept = [(holder, holder.retrieve()) for holder in self.holders]
        retrieved = [item for _, items in kept for item in items]
        by_name: dict[str, list] = {}
        for item in retrieved:
            by_name.setdefault(item.name, []).append(item)
        listeners = by_name.get(backup.LISTEN_NAME)
        if not listeners:
            close_fds(item.fd for item in retrieved)
            if retrieved:
                log.warning("the holders keep %d fds for chatd but no listening socket: dropping them", len(retrieved))
                for holder in self.holders:
                    holder.forget_all()
            return None
        used_fds = {listeners[0].fd}
        self._listen_on(socket.socket(fileno=listeners[0].fd))
        self.state, state_fd = self._restored_state(by_name.get(backup.STATE_NAME, []))
        if state_fd is not None:
            used_fds.add(state_fd)
        records = {record.inode: (slot, record) for slot, record in self.state.records()}
        members, seen_inodes = [], set()
        for item in retrieved:
            member_id = backup.member_id_of(item.name)
            if member_id is None or item.ino in seen_inodes:
                continue
            seen_inodes.add(item.ino)
            used_fds.add(item.fd)
            member = self._restored_member(item, records)
            if member is None:
                continue
            self.connections[member.id] = Connection(self, socket.socket(fileno=item.fd), member.id)
            members.append(member)
        close_fds(item.fd for item in retrieved if item.fd not in used_fds)
        for slot, record in list(records.values()):
            if slot not in self.connections:
                self.state.commit(slot, None)  # its socket is gone: the client left meanwhile
        self.room.restore(members)
        self._store_what_each_lacks(kept)
        self.restored_at = time.time()
        summary = {
            "clients": len(members),
            "pairs": len(self.room.pairs()),
            "port": self.port,
            "milliseconds": round((time.monotonic() - began) * 1000, 2),
        }
        log.info(
            "restored %(clients)d clients and %(pairs)d pairs on port %(port)d in %(milliseconds)s ms",
            summary,
        )
        return summary

    def _store_what_each_lacks(self, kept) -> None:
        """Each holder gets what only another kept (holderd restarted empty, or
        systemd's store emptied by a stop): either copy alone must suffice again."""
        items = [(name, meta, fd, os.fstat(fd).st_ino) for name, meta, fd in self._all_items()]
        for holder, its_items in kept:
            has = {(item.name, item.ino) for item in its_items}
            lacking = [(name, meta, fd) for name, meta, fd, ino in items if (name, ino) not in has]
            if lacking:
                log.info("%s lacked %d of %d fds: storing them", holder.label, len(lacking), len(items))
                holder.store(lacking)

    def _restored_state(self, candidates) -> tuple[StateFile, int | None]:
        for item in candidates:
            try:
                return StateFile.attach(item.fd), item.fd
            except (StateError, OSError, ValueError) as exc:
                log.warning("held state file unusable (%s); rebuilding from metadata", exc)
        return StateFile.create(self.max_clients), None

    def _restored_member(self, item, records) -> Member | None:
        """The member a held client socket belongs to: its state record, else its metadata."""
        found = records.get(item.ino)
        if found is not None:
            slot, record = found
            return Member(slot, record.protocol, record.nick, record.target, record.received)
        try:
            meta = json.loads(item.meta)
        except ValueError:
            meta = {}
        slot = self.state.allocate()
        if slot is None:
            log.warning("no state slot for %s: closing it", item.name)
            return None
        member = Member(slot, meta.get("protocol", "line"), meta.get("nick"), meta.get("target"))
        self.state.commit(slot, self._record(member, item.ino))
        if slot != backup.member_id_of(item.name):
            self._store_everywhere([(backup.client_name(slot), item.meta, item.fd)])
            self._remove_everywhere([item.name])
        log.info("member %d restored from metadata only (no state record)", slot)
        return member

    # -- clients ----------------------------------------------------------------------
    def _accept(self, mask: int) -> None:
        accepted = []
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.error("accept failed: %s", exc)
                break
            slot = self.state.allocate()
            if slot is None:
                log.warning("refusing a client: all %d slots are taken (--max-clients)", self.max_clients)
                try:
                    sock.send(encode_line("ERR server-full"))
                except OSError:
                    pass
                sock.close()
                continue
            connection = Connection(self, sock, slot)
            self.connections[slot] = connection
            self.room.join(slot)
            accepted.append(slot)
            log.info("member %d connected from %s", slot, connection.remote)
        if accepted:
            self._persist()
            self._store_everywhere([self._client_item(member_id) for member_id in accepted])

    def on_line(self, connection: Connection, line) -> None:
        self.apply(self.room.handle(connection.member_id, line))

    def apply(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Send):
                connection = self.connections.get(action.member_id)
                if connection is not None:
                    connection.send(action.text)
            elif isinstance(action, Close):
                self.close_client(action.member_id, "said QUIT")
        self._persist()

    def close_client(self, member_id: int, reason: str) -> None:
        """Close a client on purpose: it leaves the room, the state and every holder."""
        connection = self.connections.pop(member_id, None)
        if connection is None:
            return
        log.info("member %d closed: %s", member_id, reason)
        connection.close()
        self.state.commit(member_id, None)
        self._remove_everywhere([backup.client_name(member_id)])
        self.apply(self.room.leave(member_id))

    def _record(self, member: Member, inode: int) -> Record:
        return Record(inode, member.protocol, member.nick, member.target, member.received)

    def _persist(self) -> None:
        for member_id in self.room.changed:
            connection = self.connections.get(member_id)
            if connection is not None:
                self.state.commit(member_id, self._record(self.room.members[member_id], connection.inode))
        self.room.changed.clear()
        repaired = [m for m in self.room.repaired if m in self.connections]
        self.room.repaired.clear()
        if repaired:
            self._store_everywhere([self._client_item(member_id) for member_id in repaired])

    def _client_item(self, member_id: int) -> tuple[str, bytes, int]:
        member = self.room.members[member_id]
        meta = {
            "nick": member.nick,
            "target": member.target,
            "paired": member.peer is not None,
            "protocol": member.protocol,
        }
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        return backup.client_name(member_id), meta_bytes, self.connections[member_id].sock.fileno()

    def _store_everywhere(self, items) -> None:
        for holder in self.holders:
            holder.store(items)

    def _remove_everywhere(self, names) -> None:
        for holder in self.holders:
            holder.remove(names)

    def _all_items(self) -> list[tuple[str, bytes, int]]:
        return self._server_items() + [self._client_item(member_id) for member_id in self.connections]

    def backup_all(self) -> int:
        """Store every socket and the state again, in bulk; the count of items."""
        items = self._all_items()
        self._store_everywhere(items)
        return len(items)

    # -- reports ----------------------------------------------------------------------
    def status(self) -> dict:
        return {
            "pid": os.getpid(),
            "port": self.port,
            "serving": self.listener is not None,
            "clients": len(self.connections),
            "pairs": len(self.room.pairs()),
            "started": self.started,
            "restored_at": self.restored_at,
            "holders": {holder.label: holder.working for holder in self.holders},
            "held": {holder.label: holder.held_count() for holder in self.holders},
        }

    def clients(self) -> list[dict]:
        held = None
        for holder in self.holders:
            if holder.label == "holderd":
                held = holder.held_names()
        rows = []
        for member_id, connection in sorted(self.connections.items()):
            member = self.room.members[member_id]
            rows.append(
                {
                    "id": member_id,
                    "nick": member.nick,
                    "target": member.target,
                    "peer": member.peer.nick if member.peer else None,
                    "received": member.received,
                    "protocol": member.protocol,
                    "remote": connection.remote,
                    "held": None if held is None else backup.client_name(member_id) in held,
                }
            )
        return rows

    def drain(self) -> int:
        """End every client connection on purpose (each gets BYE); the count ended."""
        member_ids = list(self.connections)
        # BYE to all first, so that nobody hears of a peer leaving after it.
        for connection in self.connections.values():
            connection.send("BYE", last=True)
        for member_id in member_ids:
            self.close_client(member_id, "drained by the operator")
        log.info("drained %d connections", len(member_ids))
        return len(member_ids)

    def status_line(self) -> str:
        if self.listener is None:
            return "waiting for `chatctl restore`"
        return f"{len(self.connections)} clients, {len(self.room.pairs())} pairs on port {self.port}"

    def announce_ready(self) -> None:
        self._status_sent = self.status_line()
        self.manager.ready(self._status_sent)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now >= self._status_due:
            self._status_due = now + STATUS_INTERVAL
            line = self.status_line()
            if line != self._status_sent:
                self._status_sent = line
                self.manager.status(line)
        if now >= self._audit_due and self.listener is not None:
            self._audit_due = now + AUDIT_INTERVAL
            self.audit_holders()

    def audit_holders(self) -> None:
        """Store everything again in a holder that has lost some of it."""
        expected = 2 + len(self.connections)
        for holder in self.holders:
            held = holder.held_count()
            if held is not None and held < expected:
                log.warning("%s holds %d of chatd's %d fds: storing them all again", holder.label, held, expected)
                holder.store(self._all_items())

    def serve_forever(self) -> None:
        while True:
            self.loop.run_once(timeout=STATUS_INTERVAL)
            self._housekeeping()


class ControlServer:
    """chatd's control socket, spoken to by chatctl in frames (:mod:`holderd.wire`)."""

    def __init__(self, server: ChatServer, path: str, restore_on_request: bool):
        self.server = server
        self.path = path
        self.awaiting_restore = restore_on_request
        self.peers: set[FramePeer] = set()
        paths.prepare_socket_path(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        os.chmod(path, 0o666)
        self.sock.listen(16)
        self.sock.setblocking(False)
        server.loop.add(self.sock.fileno(), IN, self._accept)

    def _accept(self, mask: int) -> None:
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        peer = FramePeer(self.server.loop, sock, self._on_frame, self.peers.discard)
        if peer.uid not in (0, os.geteuid()):
            log.warning("control: refused uid %d", peer.uid)
            peer.send({"ok": False, "error": "not-allowed", "message": f"uid {peer.uid} may not control chatd"})
            peer.close_after_flush()
            return
        self.peers.add(peer)

    def _on_frame(self, peer: FramePeer, body: dict, fds: list[int]) -> None:
        close_fds(fds)
        op = body.get("op")
        handler = getattr(self, "_op_" + op, None) if isinstance(op, str) and op.isalpha() else None
        if handler is None:
            peer.send({"ok": False, "error": "unknown-op", "message": f"unknown control operation {op!r}"})
            return
        try:
            reply = handler(peer)
        except Exception as exc:  # a control request must never take chatd down
            log.exception("control %s failed", op)
            reply = {"ok": False, "error": "failed", "message": str(exc)}
        if reply is not None:
            peer.send(reply)

    def _op_status(self, peer):
        return {"ok": True, **self.server.status(), "awaiting_restore": self.awaiting_restore}

    def _op_clients(self, peer):
        return {"ok": True, "clients": self.server.clients()}

    def _op_backup(self, peer):
        if self.awaiting_restore:
            return {"ok": False, "error": "not-serving", "message": "chatd waits for `chatctl restore` first"}
        return {"ok": True, "stored": self.server.backup_all()}

    def _op_restore(self, peer):
        if not self.awaiting_restore:
            return {"ok": False, "error": "not-waiting", "message": "chatd is serving already; restore happens at start"}
        summary = self.server.restore()
        if summary is None:
            return {
                "ok": False,
                "error": "nothing-held",
                "message": "the holders keep no listening socket for chatd: nothing to restore "
                "(start chatd without --restore to begin afresh)",
            }
        self.awaiting_restore = False
        self.server.announce_ready()
        return {"ok": True, **summary}

    def _op_drain(self, peer):
        if self.awaiting_restore:
            return {"ok": False, "error": "not-serving", "message": "chatd waits for `chatctl restore` first"}
        return {"ok": True, "drained": self.server.drain()}

    def _op_crash(self, peer):
        log.warning("crash requested by pid %d: dying of SIGSEGV", peer.pid)
        peer.send({"ok": True, "pid": os.getpid()})
        peer.sock.setblocking(True)
        peer.close_after_flush()
        crash()

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def crash() -> None:
    """Die of a real SIGSEGV, as a bug in a C extension would: no cleanup, no exit handlers."""
    faulthandler.disable()
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="chatd",
        description=(
            "A line-protocol chat server whose client connections survive its crash: every "
            "socket is kept in holderd too, and a new chatd takes them back. See README.md."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=5001, help="TCP port (default %(default)s)")
    parser.add_argument(
        "--control",
        default=paths.chatd_control_socket(own_service=True),
        help="control socket for chatctl (default %(default)s)",
    )
    parser.add_argument(
        "--holder",
        default=paths.holderd_socket(),
        help="holderd's socket (default: $HOLDERD_SOCKET or %(default)s)",
    )
    parser.add_argument("--no-holderd", action="store_true", help="keep no copies in holderd")
    parser.add_argument(
        "--restore",
        action="store_true",
        help="start only by restoring what the holders keep; fail if they keep nothing "
        "(without this flag chatd restores if it can, else starts afresh)",
    )
    parser.add_argument(
        "--wait",
        action="store_true",
        help="with --restore: wait for `chatctl restore` before taking the sockets back",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="drop whatever the holders keep for chatd and start afresh (ends those connections)",
    )
    parser.add_argument("--max-clients", type=int, default=10000, help="connection limit (default %(default)s)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    if args.wait and not args.restore:
        parser.error("--wait goes with --restore")
    if args.fresh and args.restore:
        parser.error("--fresh and --restore contradict each other")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="chatd: %(levelname)s %(message)s", stream=sys.stderr)
    raise_fd_limit()
    manager = ServiceManager()
    holders = [] if args.no_holderd else [backup.HolderdHolder(args.holder)]
    if manager.present:
        holders.append(SystemdHolder(manager))
    server = ChatServer(holders, args.max_clients, manager)
    if args.fresh:
        for holder in holders:
            holder.forget_all()
    try:
        server.control = ControlServer(server, args.control, restore_on_request=args.wait)
    except OSError as exc:
        log.error("cannot open the control socket %s: %s", args.control, exc)
        return 1
    stop_on_signals(log)
    try:
        if args.wait:
            log.info("waiting for `chatctl restore` on %s", args.control)
        elif server.restore() is None:
            if args.restore:
                log.error("--restore: the holders keep no listening socket for chatd; nothing to restore")
                return 1
            try:
                server.bind(args.host, args.port)
            except OSError as exc:
                log.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
                return 1
        if not args.wait:
            server.announce_ready()
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.control.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
