"""chatd's server: accepts clients, hands their commands to the room, carries out the outcome.

Theory of operation
-------------------
:class:`ChatServer` owns the listening socket, one :class:`~chatd.connection.Connection`
per client, the :class:`~chatd.room.Room`, the :class:`~chatd.journal.Journal`
and the :class:`~chatd.holders.Holders`. Everything happens on one event loop:

- a client is accepted, joins the room under a free journal slot, and its
  socket is stored in every holder;
- each command a connection decodes goes to the room, and the room's
  :class:`~chatd.room.Outcome` is carried out by :meth:`ChatServer.apply`:
  events are encoded and sent, the members that changed are committed to the
  journal in one step, members whose pairing changed are stored again with
  fresh metadata, and members the room closes are closed;
- a client closed on purpose leaves the room, the journal and every holder.

Starting from what the holders kept after a crash is :mod:`chatd.restore`'s
job; chatctl's requests are :mod:`chatd.control`'s. Timers on the loop send
systemd the status line, ping its watchdog, and audit the holders.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time

from fdkeep.loop import IN, Loop
from fdkeep.systemd import ServiceManager
from fdkeep.text import plural

from .connection import Connection
from .holders import LISTEN_NAME, STATE_NAME, Holders, Item, client_name
from .journal import Journal, Record
from .protocols.line import LineCodec, encode_event
from .room import Bye, Command, Failed, Member, Outcome, Room

log = logging.getLogger("chatd")

#: How often systemd hears the status line (when it changed).
STATUS_INTERVAL = 1.0
#: How often chatd checks that its holders still hold everything (holderd may
#: have been stopped and started meanwhile, which empties it).
AUDIT_INTERVAL = 5.0


class ChatServer:
    def __init__(self, holders: Holders, max_clients: int, manager: ServiceManager | None = None):
        self.loop = Loop()
        self.manager = manager or ServiceManager({})
        self.room = Room()
        self.holders = holders
        self.max_clients = max_clients
        self.connections: dict[int, Connection] = {}
        self.listener: socket.socket | None = None
        self.journal: Journal | None = None
        self.started = time.time()
        self.restored_at: float | None = None
        self._status_sent: str | None = None

    # -- start: fresh or restored ---------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self.listener.getsockname()[1] if self.listener else None

    def bind(self, host: str, port: int) -> None:
        listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            # A fresh start after a crash must not wait for TIME_WAIT sockets to expire.
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((host, port))
            listener.listen(1024)
        except OSError:
            listener.close()
            raise
        self.journal = Journal.create(self.max_clients)
        self.listen_on(listener)
        self.holders.store(self.server_items())
        log.info("listening on %s:%d (fresh start)", host, self.port)

    def listen_on(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.loop.add(listener.fileno(), IN, self._accept)

    def adopt(self, sock: socket.socket, member_id: int) -> Connection:
        """Serve ``sock`` as member ``member_id``'s connection (a new or a restored one)."""
        connection = Connection(self.loop, sock, member_id, LineCodec(), self._on_command, self._on_gone)
        self.connections[member_id] = connection
        return connection

    # -- clients ----------------------------------------------------------------------
    def _accept(self, mask: int) -> None:
        accepted = Outcome()
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.error("accept failed: %s", exc)
                break
            slot = self.journal.allocate()
            if slot is None:
                log.warning("refusing a client: all %d slots are taken (--max-clients)", self.max_clients)
                try:
                    sock.send(encode_event(Failed("server-full")))
                except OSError:
                    pass
                sock.close()
                continue
            connection = self.adopt(sock, slot)
            accepted.merge(self.room.join(slot))
            log.info("member %d connected from %s", slot, connection.remote)
        if accepted.changed:
            self._commit(accepted.changed)
            self.holders.store([self.client_item(member_id) for member_id in accepted.changed])

    def _on_command(self, connection: Connection, command: Command) -> None:
        self.apply(self.room.handle(connection.member_id, command))

    def _on_gone(self, connection: Connection, reason: str) -> None:
        self.close_client(connection.member_id, reason)

    def apply(self, outcome: Outcome, freed=()) -> None:
        """Carry out what the room decided: deliver, commit, store, close."""
        for member_id, event in outcome.deliveries:
            connection = self.connections.get(member_id)
            if connection is not None:
                connection.send(event, last=isinstance(event, Bye))
        self._commit(outcome.changed, freed)
        repaired = [member_id for member_id in outcome.repaired if member_id in self.connections]
        if repaired:
            self.holders.store([self.client_item(member_id) for member_id in repaired])
        for member_id in outcome.closes:
            self.close_client(member_id, "said QUIT")

    def close_client(self, member_id: int, reason: str) -> None:
        """Close a client on purpose: it leaves the room, the journal and every holder."""
        connection = self.connections.pop(member_id, None)
        if connection is None:
            return
        log.info("member %d closed: %s", member_id, reason)
        connection.close()
        self.holders.remove([client_name(member_id)])
        self.apply(self.room.leave(member_id), freed=[member_id])

    def _commit(self, changed, freed=()) -> None:
        """One journal commit: the records of the changed members still connected, and the freed slots."""
        changes: dict[int, Record | None] = {member_id: None for member_id in freed}
        for member_id in changed:
            connection = self.connections.get(member_id)
            if connection is not None:
                changes[member_id] = self.record(self.room.members[member_id], connection.inode)
        self.journal.commit(changes)

    @staticmethod
    def record(member: Member, inode: int) -> Record:
        return Record(inode, member.protocol, member.nick, member.target, member.received)

    # -- what the holders keep --------------------------------------------------------
    def server_items(self) -> list[Item]:
        return [(LISTEN_NAME, b"{}", self.listener.fileno()), (STATE_NAME, b"{}", self.journal.fd)]

    def client_item(self, member_id: int) -> Item:
        member = self.room.members[member_id]
        meta = {
            "nick": member.nick,
            "target": member.target,
            "paired": member.peer is not None,
            "protocol": member.protocol,
        }
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        return client_name(member_id), meta_bytes, self.connections[member_id].sock.fileno()

    def all_items(self) -> list[Item]:
        return self.server_items() + [self.client_item(member_id) for member_id in self.connections]

    def backup_all(self) -> int:
        """Store every socket and the state again, in bulk; the count of items."""
        items = self.all_items()
        self.holders.store(items)
        return len(items)

    def audit_holders(self) -> None:
        if self.listener is not None:
            self.holders.audit(self.all_items())

    # -- reports ----------------------------------------------------------------------
    def status(self) -> dict:
        working, held = self.holders.report()
        return {
            "pid": os.getpid(),
            "port": self.port,
            "serving": self.listener is not None,
            "clients": len(self.connections),
            "pairs": len(self.room.pairs()),
            "started": self.started,
            "restored_at": self.restored_at,
            "holders": working,
            "held": held,
        }

    def clients(self) -> list[dict]:
        held = next((holder.held_names() for holder in self.holders if holder.label == "holderd"), None)
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
                    "held": None if held is None else client_name(member_id) in held,
                }
            )
        return rows

    def drain(self) -> int:
        """End every client connection on purpose (each gets BYE); the count ended."""
        member_ids = list(self.connections)
        # BYE to all first, so that nobody hears of a peer leaving after it.
        for connection in self.connections.values():
            connection.send(Bye(), last=True)
        for member_id in member_ids:
            self.close_client(member_id, "drained by the operator")
        log.info("drained %d connections", len(member_ids))
        return len(member_ids)

    def status_line(self) -> str:
        if self.listener is None:
            return "waiting for `chatctl restore`"
        pairs = len(self.room.pairs())
        return f"{plural(len(self.connections), 'client')}, {plural(pairs, 'pair')} on port {self.port}"

    def _report_status(self) -> None:
        line = self.status_line()
        if line != self._status_sent:
            self._status_sent = line
            self.manager.status(line)

    def announce_ready(self) -> None:
        self._status_sent = self.status_line()
        self.manager.ready(self._status_sent)

    # -- running ----------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.loop.call_every(STATUS_INTERVAL, self._report_status)
        self.loop.call_every(AUDIT_INTERVAL, self.audit_holders)
        if self.manager.watchdog_interval:
            self.loop.call_every(self.manager.watchdog_interval, self.manager.watchdog, first=0)
        self.loop.run_forever()
