"""Starting from what the holders kept: the listening socket, the journal, the clients, the bytes in flight.

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
  with its nick, target and count, and with its bytes in flight. The kernel
  says how much of each stream the dead chatd read and wrote
  (:mod:`fdkeep.tcpcount`); the record says how much input it had handled and
  how much output it had committed. So the input ring holds exactly what was
  read and not handled, which is handled now, once; and the output ring what
  was committed and not sent, which is sent now, from the very byte where the
  dead process stopped (half a line is finished, not repeated).
- If the dead chatd died while handling a command (the journal's marker says
  which), that command's count of crashes goes up; at two it will be skipped.
- A socket with no record takes a free slot and what its holderd metadata
  says (the journal was lost, or the socket was stored before its first
  commit); if that slot differs from the one in its name, it is stored again
  under the new name and the old name removed. One that chatd had already shut
  down (closed on purpose) is dropped.
- A journal record whose socket did not come back is freed: the client left
  while no chatd ran.
- Each holder gets what only another kept, so either alone suffices again.

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
from fdkeep.tcpcount import CLOSE_WAIT, ESTABLISHED, stream_positions
from fdkeep.text import plural

from .holders import LISTEN_NAME, STATE_NAME, client_name, member_id_of
from .journal import CLOSING, Journal, Record
from .room import NAME_RE, Member

if TYPE_CHECKING:
    from .server import ChatServer

log = logging.getLogger("chatd")


def restore(server: "ChatServer") -> dict | None:
    """Serve what the holders kept; a summary, or None if they keep no listening socket.

    With ``server.replay`` false (``chatd --no-replay``), what was in flight
    (input read and not handled, output committed and not sent) is thrown away
    instead of finished: what chatd would do without its journal's rings, for
    tests that must be able to see loss.
    """
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
    dying = server.journal.handling()
    server.journal.clear_handling()
    records = {record.inode: (slot, record) for slot, record in server.journal.records()}
    members, seen_inodes, in_flight = [], set(), [0, 0]
    for item in retrieved:
        if member_id_of(item.name) is None or item.ino in seen_inodes:
            continue
        seen_inodes.add(item.ino)
        sock = socket.socket(fileno=item.fd)
        used_fds.add(item.fd)
        try:
            positions = stream_positions(sock)
        except OSError as exc:
            log.warning("%s: cannot read its TCP counters (%s): dropping it", item.name, exc)
            sock.close()
            continue
        found = records.get(item.ino)
        if found is not None:
            slot, record = found
            if dying is not None and dying[0] == slot:
                _count_the_crash(slot, record, dying[1])
                server.journal.commit({slot: record})  # before handling it again, which may kill us too
            read, written = _in_flight(slot, record, positions.read, positions.written, server.replay,
                                       server.journal.in_size)
            in_flight[0] += read - record.in_handled
            in_flight[1] += record.out_end - written
            server.adopt(sock, slot, record, read, written)
            if not record.flags & CLOSING:
                members.append(Member(slot, record.protocol, record.nick, record.target, record.received))
        elif positions.state not in (ESTABLISHED, CLOSE_WAIT):
            log.info("%s was being closed (%s): dropping it", item.name, positions.state_name)
            sock.close()
        else:
            member = _member_from_metadata(server, item, sock, positions)
            if member is not None:
                members.append(member)
    close_fds(item.fd for item in retrieved if item.fd not in used_fds)
    gone = {slot: None for slot, _ in records.values() if slot not in server.connections}
    server.journal.commit(gone)  # their sockets are gone: those clients left meanwhile
    server.room.restore(members)
    server.holders.store_what_each_lacks(server.all_items(), kept)
    for connection in list(server.connections.values()):
        server.take_input(connection)  # what the dead chatd had read and not handled
    server.commit()  # and send what it had committed and not sent
    server.restored_at = time.time()
    summary = {
        "clients": len(members),
        "pairs": len(server.room.pairs()),
        "port": server.port,
        "input_replayed": in_flight[0],
        "output_resent": in_flight[1],
        "milliseconds": round((time.monotonic() - began) * 1000, 2),
    }
    server.restore_summary = summary
    log.info("restored %s and %s on port %d in %s ms (in flight: %s read and not handled, %s committed "
             "and not sent)", plural(summary["clients"], "client"), plural(summary["pairs"], "pair"),
             summary["port"], summary["milliseconds"], plural(in_flight[0], "byte"), plural(in_flight[1], "byte"))
    return summary


def _attach_journal(candidates, slots: int) -> tuple[Journal, int | None]:
    for item in candidates:
        try:
            return Journal.attach(item.fd), item.fd
        except (Error, OSError, ValueError) as exc:
            log.warning("held journal unusable (%s); rebuilding from metadata", exc)
    return Journal.create(slots), None


def _count_the_crash(slot: int, record: Record, offset: int) -> None:
    if record.poison_offset == offset:
        record.poison_count += 1
    else:
        record.poison_offset, record.poison_count = offset, 1
    log.warning("member %d: chatd died handling its command at input offset %d (%s there)", slot, offset,
                plural(record.poison_count, "death"))


def _in_flight(slot: int, record: Record, read: int, written: int, replay: bool, in_size: int) -> tuple[int, int]:
    """Check the kernel's counts against the record's windows; (read, written) to resume from."""
    if not replay:
        record.in_handled, record.codec, record.out_end = read, b"", max(written, record.out_start)
    if not record.in_handled <= read <= record.in_handled + in_size:
        log.error("member %d: the kernel says %d bytes were read, the journal has input handled to %d: "
                  "resuming from the kernel's count", slot, read, record.in_handled)
        record.in_handled, record.codec = read, b""
    if not record.out_start <= written <= record.out_end:
        log.error("member %d: the kernel says %d bytes were written, the journal has output [%d, %d): "
                  "resuming from the kernel's count", slot, written, record.out_start, record.out_end)
        record.out_end = max(written, record.out_end) if written >= record.out_start else record.out_end
        written = min(max(written, record.out_start), record.out_end)
    return read, written


def _member_from_metadata(server: "ChatServer", item, sock: socket.socket, positions) -> Member | None:
    """A client socket without a journal record: a free slot, and what its metadata says."""
    try:
        meta = json.loads(item.meta)
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    slot = server.journal.allocate()
    if slot is None:
        log.warning("no journal slot for %s: closing it", item.name)
        sock.close()
        return None
    member = Member(slot, "line", _name(meta.get("nick")), _name(meta.get("target")))
    server.adopt(sock, slot, None, positions.read, positions.written)
    if slot != member_id_of(item.name):
        server.holders.store([(client_name(slot), item.meta, item.fd)])
        server.holders.remove([item.name])
    log.info("member %d restored from metadata only (no journal record)", slot)
    return member


def _name(value) -> str | None:
    return value if isinstance(value, str) and NAME_RE.match(value) else None
