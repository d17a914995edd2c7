"""Starting from what the holders kept: the listening socket, the journal, the clients, the bytes in flight.

Theory of operation
-------------------
After a crash each holder gives back duplicates of what it kept for chatd
(:meth:`~chatd.holders.Holders.retrieve`): a few names, the same in each
holder (systemd's store and holderd usually both have everything), so every
name's first copy is used and the rest closed.

- No listening socket held: nothing to restore. Whatever else came back is
  closed and forgotten (it cannot be served without its listener and state).
  With a state directory (``--state-dir``, :mod:`chatd.statedir`) whose journal
  can be trusted, that journal is served from, on new listeners: the restore
  goes on as one in which no socket came back.
- The journal (``chatd/state``) is attached if one comes back whole (with a
  state directory, served from its file: copied there if it is not that file),
  else a new one is made (every client then comes back as new, with its connection but
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
- The last words (:mod:`chatd.lastwords`) say how the dead chatd died; they
  are logged, and the file is emptied and this process's from now on. If it
  died while handling a command (the journal's marker says which), and of a
  crash of its own (a fatal signal faulthandler caught), that command's count
  of crashes goes up, committed before it is handled again (chatd.server then
  tries it in a child process, or skips it); if the watchdog killed it there,
  the command is tried in a child before it is handled; if it left no words
  (SIGKILL from outside), nothing is counted.
- A socket without a record, still connected, was accepted and kept just
  before the crash, before its first commit: a new client in its slot. One
  chatd had shut down (closed on purpose) is dead weight in its bundle: closed
  here, and counted towards that bundle's rebuild.
- A journal record whose socket did not come back is freed: the client left
  while no chatd ran; unless it has a session, which waits for its client to
  resume it (:mod:`chatd.sessions`).
- Each holder gets what only another kept, so either alone suffices again.

Clients that connected while no chatd ran wait in the listening socket's
backlog and are accepted as usual once the loop runs.

**Served first what waits.** Making every socket a connection again is most of
a restore's time, and almost every client is idle: so only the sockets with work
(bytes to read, the command the dead chatd died handling, a last word to send)
and their partners are served before the restore returns; every other one joins
the room from its record at once and is adopted in the next loop turns, or the
moment it is needed (:mod:`chatd.adoption`). A standby's restore starts from
what it read while it waited (:mod:`chatd.prepared`), where that is still current.
The summary says how many were served at once, and when each step was done
(``parts``: holders answered, journal attached, bundles read, records read,
sockets matched, room made, in ms); ``all_adopted_ms`` comes once none waits.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import TYPE_CHECKING

from fdkeep.bundle import Bundle, Shard
from fdkeep.errors import Error
from fdkeep.fdpass import close_fds
from fdkeep.text import plural

from .bundles import parse_name
from .holders import LAST_WORDS_NAME, LISTEN_NAME, LISTEN_WEB_NAME, STATE_NAME
from .journal import UNKNOWN_FORMAT, Journal
from .lastwords import Dying, LastWords, death_of
from .adoption import take_back
from .records import CLOSING, member_of
from .room import Member
from .statedir import journal_kept_on_disk, new_journal, settle_held_journal

if TYPE_CHECKING:
    from .prepared import Prepared
    from .server import ChatServer

log = logging.getLogger("chatd")


def restore(server: "ChatServer", may_take_over=None, prepared: "Prepared | None" = None,
            listen=None) -> dict | None:
    """Serve what the holders kept; a summary, or None if they keep no listening socket, or if
    ``may_take_over(journal)`` says another chatd serves from the journal they keep (chatd.standby).
    ``prepared``: what a standby read while it waited (chatd.prepared), used where still current.
    With a state directory (chatd.statedir) and no listening socket held, its journal is served
    from, its records as those whose sockets did not come back, on listeners ``listen()`` binds.

    With ``server.replay`` false (``chatd --no-replay``), what was in flight
    (input read and not handled, output committed and not sent) is thrown away
    instead of finished: what chatd would do without its journal's rings, for
    tests that must be able to see loss.
    """
    began = time.monotonic()
    kept = server.holders.retrieve()
    retrieved_at = time.monotonic()
    retrieved = [item for _, items in kept for item in items]
    by_name: dict[str, list] = {}
    for item in retrieved:
        by_name.setdefault(item.name, []).append(item)
    listeners = by_name.get(LISTEN_NAME)
    on_disk = None
    if not listeners:
        close_fds(item.fd for item in retrieved)
        if retrieved:
            log.warning("the holders keep %d fds for chatd but no listening socket: dropping them", len(retrieved))
            server.holders.forget_all("useless without the listening socket")
        on_disk = journal_kept_on_disk(server, by_name.get(STATE_NAME, []))
        if on_disk is None:
            return None
        retrieved, by_name = [], {}  # what they kept is closed: the rest is a restore with no sockets
    try:
        journal, journal_fd = on_disk or _attach_journal(by_name.get(STATE_NAME, []), server)
    except Error:
        close_fds(item.fd for item in retrieved)  # our duplicates; the holders keep theirs
        raise
    if may_take_over is not None and not may_take_over(journal):
        journal.close()
        close_fds(item.fd for item in retrieved if item.fd != journal_fd)
        return None
    journal_from = "state-dir" if on_disk else "held" if journal_fd is not None else "new"
    journal, journal_fd = settle_held_journal(server, journal, journal_fd)
    server.journal = journal
    parts = {"holders_ms": retrieved_at, "journal_ms": time.monotonic()}
    if on_disk is not None:
        listen()  # the listening sockets died with the holders
        used_fds = set()
    else:
        used_fds = {listeners[0].fd}
        server.listeners.adopt(socket.socket(fileno=listeners[0].fd), "line")
    if by_name.get(LISTEN_WEB_NAME):
        used_fds.add(by_name[LISTEN_WEB_NAME][0].fd)
        server.listeners.adopt(socket.socket(fileno=by_name[LISTEN_WEB_NAME][0].fd), "websocket")
    if journal_fd is not None:
        used_fds.add(journal_fd)
    # The words first, then the marker: both before any command is handled, which may kill us too.
    words = _take_last_words(server, by_name.get(LAST_WORDS_NAME, []))
    used_fds.add(server.last_words.fd)
    dying = _the_death(server.journal.handling(), words)
    # A predecessor that ended on purpose (a handover, a stop) said so: it left the journal no owner.
    ended = "planned" if journal_from != "new" and server.journal.owner() is None else death_of(words)[0]
    server.journal.clear_handling()
    bundles, stale = _newest_bundles(by_name)
    for _, bundle in bundles.values():
        used_fds.update(bundle.fds())
    # Before the bundles' sockets come in: at the fd limit's edge every spare fd counts.
    close_fds(item.fd for item in retrieved if item.fd not in used_fds)
    entries, dead = {}, {}
    for number, (generation, bundle) in bundles.items():
        held = prepared.entries_of(number, generation, bundle) if prepared is not None else None
        entries[number], dead[number] = (bundle.read(), 0) if held is None else held
    parts["bundles_ms"] = time.monotonic()
    known, ready = prepared.records_for(journal_fd) if prepared is not None else ({}, {})
    records = dict(server.journal.records(known))
    parts["records_ms"] = time.monotonic()
    adoption = server.adoption
    adoption.begin(dying, began, prepared.take_epoll() if prepared is not None else None)
    members, in_flight = [], adoption.in_flight
    for number, (generation, bundle) in sorted(bundles.items()):
        shard = Shard(number, bundle, generation)
        shard.dead = dead[number]  # closed by the standby as it read them (chatd.prepared)
        for slot, fd in entries[number]:
            record = records.get(slot)
            if adoption.can_wait(slot, record, fd):
                shard.live[slot] = fd  # its member joins the room now, its connection soon
                made = ready.get(slot)
                members.append(made[1] if made is not None and made[0] is record else member_of(slot, record))
                continue
            sock = socket.socket(fileno=fd)
            member = take_back(server, slot, sock, record, dying, in_flight)
            if member is None:
                shard.dead += 1
                continue
            shard.live[slot] = sock.fileno()
            if member is not True:
                members.append(member)
        server.bundles.adopt(shard)
    parts["sockets_ms"] = time.monotonic()
    gone = {}
    for slot, record in records.items():
        if slot in server.connections or slot in adoption:
            continue
        if record.token and not record.flags & CLOSING:  # a session: it waits for its client
            members.append(member_of(slot, record))
            server.sessions.detach_restored(slot, record)
        else:
            gone[slot] = None
    server.journal.commit(gone)  # their sockets are gone: those clients left meanwhile
    if len(server.sessions):
        log.info("%s wait for their clients to resume them (their connections did not come back)",
                 plural(len(server.sessions), "session"))
    server.room.restore(members)
    server.holders.store_what_each_lacks(server.backup.items(), kept)
    if stale:
        server.holders.remove(sorted(stale))
    parts["room_ms"] = time.monotonic()
    # First what waits: sockets with bytes to read, and their partners (the answer goes there).
    for slot in adoption.with_input():
        member = server.room.members.get(slot)
        for needed in (slot, member.peer.id if member is not None and isinstance(member.peer, Member) else None):
            if needed in adoption:
                adoption.adopt(needed)
    for connection in list(server.connections.values()):
        server.take_input(connection)  # what the dead chatd had read and not handled
    server.commit()  # and send what it had committed and not sent
    served = time.monotonic()
    server.restored_at = time.time()
    summary = {
        "clients": len(server.connections) + len(adoption),
        "pairs": len(server.room.pairs()),
        "port": server.port,
        "journal": journal_from,  # held by the holders, the state directory's (nothing held), or new
        "input_replayed": in_flight[0],
        "output_resent": in_flight[1],
        "milliseconds": round((served - began) * 1000, 2),
        # How the chatd before ended: crashed, hung or killed (chatd.lastwords), or planned.
        "ended": ended,
        "began_at": time.time() - (time.monotonic() - began),  # wall clock, to line up with other logs
        "adopted_at_once": len(server.connections),
        "all_adopted_ms": None,
        # When each step of the restore was done, in ms from its start (chatd.prepared helps the middle ones).
        "parts": {name: round((moment - began) * 1000, 2) for name, moment in parts.items()},
    }
    server.restore_summary = summary
    server.journal.tally.restored(ended, served - began, in_flight[0], in_flight[1])  # committed next turn
    log.info("restored %s and %s on port %d in %s ms: %s served at once, %s adopted in the next turns (%s)",
             plural(summary["clients"], "client"), plural(summary["pairs"], "pair"), summary["port"],
             summary["milliseconds"], plural(len(server.connections), "client"), len(adoption),
             ", ".join(f"{name[:-3]} {ms}" for name, ms in summary["parts"].items()))
    adoption.start()
    return summary


def _attach_journal(candidates, server: "ChatServer") -> tuple[Journal, int | None]:
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
    return new_journal(server), None


def _take_last_words(server: "ChatServer", candidates) -> bytes:
    """The held last-words file becomes this process's (a new one if none is held: the holders
    get it with the rest); what the dead process wrote in it."""
    server.last_words = LastWords(candidates[0].fd) if candidates else LastWords.create()
    try:
        words = server.last_words.take()
    except OSError as exc:  # not a file we can read (a holder gave something else): start anew
        log.warning("the held last words cannot be read (%s): starting a new file", exc.strerror or exc)
        server.last_words = LastWords.create()
        words = b""
    server.last_words.listen()
    return words


def _the_death(marker: tuple[int, int] | None, words: bytes) -> Dying | None:
    """How the dead chatd died, and the command it was handling then (None if none): its words logged."""
    death, how = death_of(words)
    if words:
        log.warning("the chatd before this one died of %s %s; its last words:\n%s", how,
                    "while handling a command" if marker is not None else "outside the handling of any command",
                    words.decode("utf-8", "replace").rstrip())
    return Dying(marker[0], marker[1], death, how) if marker is not None else None


def _newest_bundles(by_name: dict[str, list]) -> tuple[dict[int, tuple[int, Bundle]], set[str]]:
    """Each shard's newest generation whose two ends came back, as a Bundle; and every
    other bundle name (older generations, half bundles), to be forgotten."""
    ends: dict[tuple[int, int], dict[str, int]] = {}
    names_seen = set()
    for name, items in by_name.items():
        parsed = parse_name(name)
        if parsed is None:
            if name not in (LISTEN_NAME, LISTEN_WEB_NAME, STATE_NAME, LAST_WORDS_NAME):
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
