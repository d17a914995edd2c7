"""Starting from what the holders kept: the listening socket, the journal, the clients.

Theory of operation
-------------------
After a crash each holder gives back duplicates of what it kept for chatd
(:meth:`~chatd.holders.Holders.retrieve`); systemd's store and holderd usually
both have everything, so most sockets come back twice. They describe the same
sockets, and every duplicate of one socket has the same inode, so they are
merged by inode: each socket is served once, and the other duplicates closed.

- No listening socket held: nothing to restore. Whatever else came back is
  closed and forgotten (it cannot be served without its listener and state).
- The journal (``chatd/state``) is attached if one comes back whole, else a
  new one is made and clients are rebuilt from their metadata alone.
- A client socket whose inode has a journal record becomes that member again,
  with its nick, target and count. One without a record (the journal was lost,
  or the socket was stored before its record was committed) takes a free slot
  and what its holderd metadata says; if that slot differs from the one in its
  name, it is stored again under the new name and the old name removed.
- A journal record whose socket did not come back is freed: the client left
  while no chatd ran.
- Finally each holder gets what only another kept, so either alone suffices
  again.

Clients that connected while no chatd ran wait in the listening socket's
backlog and are accepted as usual once the loop runs.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from typing import TYPE_CHECKING

from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.text import plural

from .holders import LISTEN_NAME, STATE_NAME, client_name, member_id_of
from .journal import Journal
from .room import NAME_RE, Member

if TYPE_CHECKING:
    from .server import ChatServer

log = logging.getLogger("chatd")


def restore(server: "ChatServer") -> dict | None:
    """Serve what the holders kept; a summary, or None if they keep no listening socket."""
    began = time.monotonic()
    kept = server.holders.retrieve()
    retrieved = [item for _, items in kept for item in items]
    by_name: dict[str, list] = {}
    for item in retrieved:
        by_name.setdefault(item.name, []).append(item)
    listeners = by_name.get(LISTEN_NAME)
    if not listeners:
        close_fds(item.fd for item in retrieved)
        if retrieved:
            log.warning("the holders keep %d fds for chatd but no listening socket: dropping them", len(retrieved))
            server.holders.forget_all()
        return None
    used_fds = {listeners[0].fd}
    server.listen_on(socket.socket(fileno=listeners[0].fd))
    server.journal, journal_fd = _attach_journal(by_name.get(STATE_NAME, []), server.max_clients)
    if journal_fd is not None:
        used_fds.add(journal_fd)
    records = {record.inode: (slot, record) for slot, record in server.journal.records()}
    members, seen_inodes = [], set()
    for item in retrieved:
        if member_id_of(item.name) is None or item.ino in seen_inodes:
            continue
        seen_inodes.add(item.ino)
        member = _member_for(server, item, records)
        if member is None:
            continue
        used_fds.add(item.fd)
        server.adopt(socket.socket(fileno=item.fd), member.id)
        members.append(member)
    close_fds(item.fd for item in retrieved if item.fd not in used_fds)
    gone = {slot: None for slot, _ in records.values() if slot not in server.connections}
    server.journal.commit(gone)  # their sockets are gone: those clients left meanwhile
    server.room.restore(members)
    server.holders.store_what_each_lacks(server.all_items(), kept)
    server.restored_at = time.time()
    summary = {
        "clients": len(members),
        "pairs": len(server.room.pairs()),
        "port": server.port,
        "milliseconds": round((time.monotonic() - began) * 1000, 2),
    }
    log.info("restored %s and %s on port %d in %s ms", plural(summary["clients"], "client"),
             plural(summary["pairs"], "pair"), summary["port"], summary["milliseconds"])
    return summary


def _attach_journal(candidates, slots: int) -> tuple[Journal, int | None]:
    for item in candidates:
        try:
            return Journal.attach(item.fd), item.fd
        except (Error, OSError, ValueError) as exc:
            log.warning("held journal unusable (%s); rebuilding from metadata", exc)
    return Journal.create(slots), None


def _member_for(server: "ChatServer", item, records) -> Member | None:
    """The member a held client socket belongs to: its journal record, else its metadata."""
    found = records.get(item.ino)
    if found is not None:
        slot, record = found
        return Member(slot, record.protocol, record.nick, record.target, record.received)
    try:
        meta = json.loads(item.meta)
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    slot = server.journal.allocate()
    if slot is None:
        log.warning("no journal slot for %s: closing it", item.name)
        return None
    member = Member(slot, "line", _name(meta.get("nick")), _name(meta.get("target")))
    server.journal.commit({slot: server.record(member, item.ino)})
    if slot != member_id_of(item.name):
        server.holders.store([(client_name(slot), item.meta, item.fd)])
        server.holders.remove([item.name])
    log.info("member %d restored from metadata only (no journal record)", slot)
    return member


def _name(value) -> str | None:
    return value if isinstance(value, str) and NAME_RE.match(value) else None
