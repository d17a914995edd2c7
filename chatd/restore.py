"""Starting from what the holders kept: the listening socket, the journal, the clients, the bytes in flight.

Theory of operation
-------------------
After a crash each holder gives back duplicates of what it kept for chatd
(:meth:`~chatd.holders.Holders.retrieve`): a few names, the same in each
holder (systemd's store and holderd usually both have everything), so every
name's first copy is used and the rest closed.

- No listening socket held: nothing to restore. Whatever else came back is
  closed and forgotten (it cannot be served without its listener and state).
- The journal (``chatd/state``) is attached if one comes back whole, else a new
  one is made (every client then comes back as new, with its connection but
  without its nick, pairing or count). A journal of a version this release does
  not read (:data:`chatd.journal.VERSION`; a newer release wrote it) is not
  damage: the restore is refused before anything is touched (Error
  ``unknown-format``; chatd exits, the holders keep everything), since a new
  journal over those connections would lose what the held one keeps.
- Client sockets come back from the bundles (:mod:`chatd.bundles`): each
  shard's newest generation whose two ends came back is read without being
  consumed, so a crash in the middle of a restore loses nothing; each socket
  comes back once, whatever the number of holders. Older generations and
  unknown names are forgotten.
- A socket whose journal slot has a record with its inode becomes that member
  again, with its nick, target and count, and with its bytes in flight. The
  kernel says how much of each stream the dead chatd read and wrote
  (:mod:`fdkeep.tcpcount`); the record says how much input it had handled and
  how much output it had committed. So the input ring holds exactly what was
  read and not handled, which is handled now, once; and the output ring what
  was committed and not sent, which is sent now, from the very byte where the
  dead process stopped (half a line is finished, not repeated).
- If the dead chatd died while handling a command (the journal's marker says
  which), that command's count of crashes goes up, committed before it is
  handled again; at two it will be skipped.
- A socket without a record, still connected, was accepted and kept just
  before the crash, before its first commit: a new client in its slot. One
  chatd had shut down (closed on purpose) is dead weight in its bundle: closed
  here, and counted towards that bundle's rebuild.
- A journal record whose socket did not come back is freed: the client left
  while no chatd ran.
- Each holder gets what only another kept, so either alone suffices again.

Clients that connected while no chatd ran wait in the listening socket's
backlog and are accepted as usual once the loop runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from fdkeep.bundle import Bundle, Shard
from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.tcpcount import CLOSE_WAIT, ESTABLISHED, stream_positions
from fdkeep.text import plural

from .bundles import parse_name
from .holders import LISTEN_NAME, LISTEN_WEB_NAME, STATE_NAME
from .journal import UNKNOWN_FORMAT, Journal
from .records import CLOSING, Record, member_of
from .room import Member

if TYPE_CHECKING:
    from .server import ChatServer

log = logging.getLogger("chatd")


def restore(server: "ChatServer", may_take_over=None) -> dict | None:
    """Serve what the holders kept; a summary, or None if they keep no listening socket, or if
    ``may_take_over(journal)`` says another chatd serves from the journal they keep (chatd.standby).

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
            server.holders.forget_all("useless without the listening socket")
        return None
    try:
        journal, journal_fd = _attach_journal(by_name.get(STATE_NAME, []), server.max_clients)
    except Error:
        close_fds(item.fd for item in retrieved)  # our duplicates; the holders keep theirs
        raise
    if may_take_over is not None and not may_take_over(journal):
        journal.close()
        close_fds(item.fd for item in retrieved if item.fd != journal_fd)
        return None
    server.journal = journal
    used_fds = {listeners[0].fd}
    server.listeners.adopt(socket.socket(fileno=listeners[0].fd), "line")
    if by_name.get(LISTEN_WEB_NAME):
        used_fds.add(by_name[LISTEN_WEB_NAME][0].fd)
        server.listeners.adopt(socket.socket(fileno=by_name[LISTEN_WEB_NAME][0].fd), "websocket")
    if journal_fd is not None:
        used_fds.add(journal_fd)
    dying = server.journal.handling()
    server.journal.clear_handling()
    bundles, stale = _newest_bundles(by_name)
    for _, bundle in bundles.values():
        used_fds.update(bundle.fds())
    # Before the bundles' sockets come in: at the fd limit's edge every spare fd counts.
    close_fds(item.fd for item in retrieved if item.fd not in used_fds)
    records = dict(server.journal.records())
    members, in_flight = [], [0, 0]
    for number, (generation, bundle) in sorted(bundles.items()):
        shard = Shard(number, bundle, generation)
        for slot, fd in bundle.read():
            sock = socket.socket(fileno=fd)
            member = _take_back(server, slot, sock, records.get(slot), dying, in_flight)
            if member is None:
                shard.dead += 1
                continue
            shard.live[slot] = sock.fileno()
            if member is not True:
                members.append(member)
        server.bundles.adopt(shard)
    gone = {slot: None for slot in records if slot not in server.connections}
    server.journal.commit(gone)  # their sockets are gone: those clients left meanwhile
    server.room.restore(members)
    server.holders.store_what_each_lacks(server.backup.items(), kept)
    if stale:
        server.holders.remove(sorted(stale))
    for connection in list(server.connections.values()):
        server.take_input(connection)  # what the dead chatd had read and not handled
    server.commit()  # and send what it had committed and not sent
    server.restored_at = time.time()
    summary = {
        "clients": len(server.connections),
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
    """The held journal, attached; a new one if none is held or what is held is damaged.
    Raises Error ``unknown-format`` for one this release cannot read (another version):
    serving from a new journal would lose every nick, pairing and count it keeps."""
    for item in candidates:
        try:
            return Journal.attach(item.fd), item.fd
        except Error as exc:
            if exc.code == UNKNOWN_FORMAT:
                raise
            log.warning("held journal unusable (%s); starting a new one", exc)
        except (OSError, ValueError) as exc:
            log.warning("held journal unusable (%s); starting a new one", exc)
    return Journal.create(slots), None


def _newest_bundles(by_name: dict[str, list]) -> tuple[dict[int, tuple[int, Bundle]], set[str]]:
    """Each shard's newest generation whose two ends came back, as a Bundle; and every
    other bundle name (older generations, half bundles), to be forgotten."""
    ends: dict[tuple[int, int], dict[str, int]] = {}
    names_seen = set()
    for name, items in by_name.items():
        parsed = parse_name(name)
        if parsed is None:
            if name not in (LISTEN_NAME, LISTEN_WEB_NAME, STATE_NAME):
                log.warning("the holders keep %s, which this chatd does not know: forgetting it", name)
                names_seen.add(name)
            continue
        number, generation, end = parsed
        ends.setdefault((number, generation), {})[end] = items[0].fd  # every copy is the same socket
        names_seen.add(name)
    newest: dict[int, tuple[int, Bundle]] = {}
    for (number, generation), pair in sorted(ends.items()):
        if set(pair) == {"w", "r"}:
            if number in newest:
                newest[number][1].detach()
            newest[number] = (generation, Bundle.from_fds(pair["w"], pair["r"]))
    stale = {name for name in names_seen
             if (parsed := parse_name(name)) is None or newest.get(parsed[0], (None,))[0] != parsed[1]}
    return newest, stale


def _count_the_crash(slot: int, record: Record, offset: int) -> None:
    if record.poison_offset == offset:
        record.poison_count += 1
    else:
        record.poison_offset, record.poison_count = offset, 1
    log.warning("member %d: chatd died handling its command at input offset %d (%s there)", slot, offset,
                plural(record.poison_count, "death"))


def _take_back(server: "ChatServer", slot: int, sock: socket.socket, record: Record | None, dying,
               in_flight: list[int]):
    """Serve a socket found in a bundle: its member, True for one with no place in the room
    (it said its last word), or None if it is not to be served (closed here)."""
    try:
        positions = stream_positions(sock)
        inode = os.fstat(sock.fileno()).st_ino
    except OSError as exc:
        log.warning("slot %d: cannot read its socket's counters (%s): dropping it", slot, exc)
        sock.close()
        return None
    if slot in server.connections:  # a second copy of a socket already served, or a dead one
        sock.close()
        return None
    if record is not None and record.inode == inode:
        if dying is not None and dying[0] == slot:
            _count_the_crash(slot, record, dying[1])
            server.journal.commit({slot: record})  # before handling it again, which may kill us too
        read, written = _in_flight(slot, record, positions.read, positions.written, server.replay,
                                   server.journal.in_size)
        in_flight[0] += read - record.in_handled
        in_flight[1] += record.out_end - written
        server.adopt(sock, slot, record, read, written, inode)
        if record.flags & CLOSING:
            return True
        return member_of(slot, record)
    if positions.state not in (ESTABLISHED, CLOSE_WAIT) or record is not None or not server.journal.take(slot):
        # Shut down on purpose (closed by chatd), or its slot went to a newer socket.
        sock.close()
        return None
    # Kept right after its accept, before its first commit: a new client, nothing said yet.
    server.adopt(sock, slot, None, positions.read, positions.written, inode)
    log.info("member %d restored without a journal record (accepted just before the crash)", slot)
    return Member(slot)


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
