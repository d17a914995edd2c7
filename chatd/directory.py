"""The directory across hosts: who holds which nick, whom it names, and which hosts live.

Theory of operation
-------------------
The directory is a key-value bucket: one entry per nick, ``{"host", "target"}``,
and a bucket of host leases. An entry's version is :data:`ENTRY_VERSION`
(docs/formats.md): a ``"v"`` field, absent for 1 (what every release so far
writes); :func:`~chatd.bus.payloads.read_entry` refuses another, and anything
else that is not an entry (:class:`~chatd.bus.payloads.BusPayloadError`): such a
value is ignored (each host keeps the last entry it read), said once per kind,
and an entry of ours overwritten with it is written again. The bus thread talks to them (:mod:`chatd.bus.directory`);
on chatd's side, :class:`DirectoryView` keeps two views of them, from the bus's results:

- **everyone's**: every other host's entries, and which hosts are alive. Each
  change is shown to the room (:meth:`~chatd.room.Room.remote_changed`,
  :meth:`~chatd.room.Room.remote_gone`), which derives pairs across hosts by
  its one rule; a host whose lease is gone has its members leave the room.
  Until the bucket has been read whole (:class:`~chatd.bus.DirectoryComplete`)
  what is not shown may still exist: :meth:`DirectoryView.read` is when it does not.
- **our own**: the entries this host holds, with the revision the bucket
  gave each, so that an update or release is a compare-and-set: it can never
  overwrite or delete another host's claim.

A NICK is *claimed* before the room takes it: the client is parked while the
entry is created, compare-and-set, and the room takes the nick
(:meth:`~chatd.room.Room.take_nick`) only if the bucket said yes. One call per
nick is in flight at a time (``busy``); what a member changes meanwhile (its
target, its leaving) goes once the call is answered. An entry of ours with no
connected member holding it (its member left, or an earlier life's) is
released. A crash while a claim is in flight handles the NICK again: the entry
is ours (same host), and no live member holds it, so it is taken back.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Callable

from fdkeep.text import plural

from .across import ServedMembers
from .bus import Bus, Claimed, HostChanged, NickChanged, Released, Updated
from .bus.payloads import ENTRY_VERSION, BusPayloadError, Complaints, read_entry  # noqa: F401 (ours to name)
from .room import Failed, Member, Outcome, Room

log = logging.getLogger("chatd")


def new_incarnation() -> int:
    return random.getrandbits(63) or 1


class DirectoryView:
    """This host's view of the directory, and its own entries' calls to the bucket."""

    def __init__(self, bus: Bus, host_id: str, room: Room, members: ServedMembers, *,
                 incarnation: Callable[[], int] = new_incarnation):
        self.bus = bus
        self.host_id = host_id
        self.room = room
        self.members = members
        self.incarnation = incarnation
        #: Nick -> (host, target) of every other host's entry, whether its host lives or not.
        self.entries: dict[str, tuple[str, str | None]] = {}
        self.alive_hosts: set[str] = set()
        #: Our own entries: nick -> (target, revision) as the bucket has them.
        self.own: dict[str, tuple[str | None, int]] = {}
        #: Nicks with a call in flight, and the target it sends (one call a nick at a time).
        self._busy: dict[str, str | None] = {}
        self._to_release: set[str] = set()  # left while busy
        #: Nicks of sessions being taken over by this host (chatd.keeper): ours, their member coming.
        self._taking: set[str] = set()
        #: ``session_nick(member, end, outcome)``: a session's NICK claimed, answered once its entry
        #: has it (chatd.keeper).
        self.session_nick: Callable[[Member, int, Outcome], None] = \
            lambda member, end, outcome: self.members.resume_parked(member.id, end, outcome)
        #: ``later(call)``: call it once a detached session's grace has run out (chatd.cluster).
        self.later: Callable[[Callable[[], None]], None] = lambda call: call()
        #: Told of a member here whose nick the directory shows on another host: it lost it.
        self.lost: Callable[[Member, str], None] = lambda member, host: None
        #: Parked NICKs: member id -> (input offset after the command, the name).
        self._claims: dict[int, tuple[int, str]] = {}
        self.complete = False
        #: Entries that are not chatd's: ignored, and said once per kind.
        self.complaints = Complaints(lambda line: log.warning("cluster: %s", line))

    # -- our members ---------------------------------------------------------------------
    def claim(self, member: Member, end: int, name: str) -> bool:
        """``member`` says NICK ``name`` (its input ends at ``end``): claim it in the bucket,
        True; False if the room answers it as it is (OK again, bad-name, nick-taken)."""
        if name == member.nick or not self.room.nick_free(member.id, name) or self.claiming(name):
            return False
        self._claims[member.id] = (end, name)
        self._busy[name] = member.target
        self.bus.claim(member.id, name, self._entry(member.target))
        return True

    def claiming(self, name: str) -> bool:
        return name in self._taking or any(claimed == name for _, claimed in self._claims.values())

    def take_over(self, token, nick: str, target: str | None) -> None:
        """A session this host takes over holds ``nick``: make it this host's, whoever holds it
        (the session's fence is written: chatd.keeper). :class:`Claimed` goes to the keeper."""
        self._taking.add(nick)
        self._busy[nick] = target
        self.bus.take(token, nick, self._entry(target))

    def took(self, result: Claimed) -> None:
        """The nick of a session taken over is this host's (its member comes: :meth:`adopted`)."""
        self._answered(result.nick, result.ok, result.revision)
        self.entries.pop(result.nick, None)

    def adopted(self, nick: str) -> None:
        """The taking over of ``nick`` is done (its member is here, or is not coming)."""
        self._taking.discard(nick)
        self._after_call(nick)

    def forget_claim(self, member_id: int) -> None:
        """The member is closed: its NICK in flight is answered to no one."""
        self._claims.pop(member_id, None)

    def sync(self, member: Member) -> None:
        """Make our entry for the member's nick say its target (put it back if it is gone)."""
        nick = member.nick
        if nick in self._busy or not self.complete:
            return
        known = self.own.get(nick)
        if known is None:
            self._busy[nick] = member.target
            self.bus.claim(("sync", member.id), nick, self._entry(member.target))
        elif known[0] != member.target:
            self._busy[nick] = member.target
            self.bus.update(member.id, nick, self._entry(member.target), known[1])

    def release(self, nick: str) -> None:
        """The nick's member left: its entry goes (once the call in flight for it is answered)."""
        if nick in self._busy:
            self._to_release.add(nick)
            return
        known = self.own.pop(nick, None)
        if known is not None:
            self._busy[nick] = None
            self.bus.release(nick, known[1])

    # -- the bucket's answers ------------------------------------------------------------
    def claimed(self, result: Claimed) -> None:
        self._answered(result.nick, result.ok, result.revision)
        if isinstance(result.token, tuple):  # ("sync", member id): an entry put back, not a NICK
            if not result.ok:
                # Another host's entry (or another release's) holds it: not claimed again at once,
                # which would be a loop at the bus's speed; the member's next commit syncs again.
                log.warning("cluster: the entry of %s here could not be put back: %s holds it", result.nick,
                            result.holder or "an entry this release does not read")
                if result.nick in self._to_release:
                    self._after_call(result.nick)
                return
            self._after_call(result.nick)
            return
        member_id = result.token
        parked = self._claims.pop(member_id, None)
        if parked is None or not self.members.is_connected(member_id):
            if result.ok and self._holder(result.nick) is None:
                self.release(result.nick)
            return
        end, name = parked
        if result.ok:
            member = self.room.members[member_id]
            old = member.nick
            outcome = self.room.take_nick(member_id, name, self.incarnation())
            if old is not None and member.nick != old:
                self.release(old)
        else:
            outcome = Outcome().tell(member_id, Failed("nick-taken"))
        member = self.room.members[member_id]
        if result.ok and member.token:
            self.session_nick(member, end, outcome)  # its session's entry says it first (chatd.keeper)
        else:
            self.members.resume_parked(member_id, end, outcome)
        self._after_call(result.nick)

    def updated(self, result: Updated) -> None:
        self._answered(result.nick, result.ok, result.revision)
        if not result.ok:
            self.own.pop(result.nick, None)  # someone else's now, or gone: claim it again
        self._after_call(result.nick)

    def released(self, result: Released) -> None:
        self._busy.pop(result.nick, None)
        self._after_call(result.nick)

    def _answered(self, nick: str, ok: bool, revision: int | None) -> None:
        """A claim or update of our own entry came back: remember what the bucket now has."""
        target = self._busy.pop(nick, None)
        if ok and revision > self.own.get(nick, (None, 0))[1]:
            self.own[nick] = (target, revision)

    def _after_call(self, nick: str) -> None:
        """One call per nick at a time: what waited for this one goes now."""
        if nick in self._to_release:
            self._to_release.discard(nick)
            if self._holder(nick) is None:
                self.release(nick)
                return
        member = self._holder(nick)
        if member is not None:
            self.sync(member)

    def _holder(self, nick: str) -> Member | None:
        """The member served here holding ``nick`` (connected, or a detached session)."""
        member = self.room.member_by_nick(nick)
        return member if member is not None and self.members.holds(member.id) else None

    def _entry(self, target: str | None) -> bytes:
        return json.dumps({"host": self.host_id, "target": target}, separators=(",", ":")).encode()

    # -- everyone's entries --------------------------------------------------------------
    def nick_changed(self, change: NickChanged) -> str | None:
        """An entry changed; the nick of ours it names, whose messages waiting for the
        pairing may go now (None: none)."""
        if change.value is None:
            self.entries.pop(change.nick, None)
            if self.own.get(change.nick, (None, -1))[1] <= change.revision:
                self.own.pop(change.nick, None)
            self.members.apply(self.room.remote_gone(change.nick))
            return None
        try:
            host, target = read_entry(change.value)
        except BusPayloadError as exc:
            self.complaints("directory entry", exc, f"of {change.nick!r} (revision {change.revision})")
            self._overwritten(change.nick)
            return None
        if host == self.host_id:
            if change.revision > self.own.get(change.nick, (None, 0))[1]:
                self.own[change.nick] = (target, change.revision)
            if self.complete and self._holder(change.nick) is None and not self.claiming(change.nick):
                self._show_unheld(change.nick)
                self.later(lambda: self._release_unheld([change.nick]))  # as read() does
            return None
        holder = self._holder(change.nick)
        if change.nick not in self._taking:
            self.own.pop(change.nick, None)  # another host's now
            if holder is not None:
                # Ours, and now another host's: it took the member's session over (chatd.keeper),
                # or its lease lapsed and the nick was taken. This host stops serving it.
                self.lost(holder, host)
        previous = self.entries.get(change.nick)
        self.entries[change.nick] = (host, target)
        if previous is not None and previous[0] != host and (previous[0] not in self.alive_hosts
                                                             or previous[0] in change.lapsing):
            # Another host holds the nick of a host whose lease lapsed (its members moved away:
            # chatd.fencing): a new member, not the one our members were paired with. They are told
            # UNPAIRED, then PAIRED again below; what they sent the old one went to its old host (and
            # is lost with that member's connection), which they could not tell otherwise. From a
            # host alive, it is a session taken over (chatd.keeper): the same member, its pairing
            # goes on silently. A lease this host has not yet seen expire, but which had not been
            # renewed for a lease when the nick moved (``lapsing``), counts as lapsed: a new member
            # taken for the same would have our members' messages to it lost unsaid.
            self.members.apply(self.room.remote_gone(change.nick))
        if host not in self.alive_hosts:
            return None
        self.members.apply(self.room.remote_changed(change.nick, host, target))
        return target

    def _show_unheld(self, nick: str) -> None:
        """An entry of ours with no member here (an earlier life's) is shown to the room as a member
        of this host away for now: a session that any host may take back within the grace. Its peers
        here stay paired with it, and what they send it waits in the stream for whoever takes it."""
        self.members.apply(self.room.remote_changed(nick, self.host_id, self.own[nick][0]))

    def _release_unheld(self, nicks: list[str]) -> None:
        for nick in nicks:
            if nick in self.own and self._holder(nick) is None and not self.claiming(nick):
                self.release(nick)

    def _overwritten(self, nick: str) -> None:
        """Our entry for ``nick`` was overwritten with what names no host (the hosts keep the
        last entry they read): write it again, a claim over the unreadable value
        (:mod:`chatd.bus.directory` takes a nick whose entry names no one)."""
        if nick not in self.own:
            return
        del self.own[nick]
        member = self._holder(nick)
        if member is not None:
            self.sync(member)

    def host_changed(self, change: HostChanged) -> None:
        if change.alive == (change.host_id in self.alive_hosts) or change.host_id == self.host_id:
            return
        if change.alive:
            self.alive_hosts.add(change.host_id)
            log.info("cluster: host %s is up", change.host_id)
        else:
            self.alive_hosts.discard(change.host_id)
            log.warning("cluster: host %s is gone: its members leave the room here", change.host_id)
        for nick, (host, target) in list(self.entries.items()):
            if host == change.host_id:
                outcome = self.room.remote_changed(nick, host, target) if change.alive else self.room.remote_gone(nick)
                self.members.apply(outcome)

    def read(self) -> bool:
        """The bucket was read whole: what is not shown does not exist. True the first time."""
        if self.complete:
            return False
        self.complete = True
        self.members.apply(self.room.directory_complete())
        # Ours from an earlier life, no member here holding it: a client of this host before it was
        # lost, whose session another host may take over (chatd.keeper) within the grace; released
        # then if still ours and held by no one (a nick of a client without a session waits too).
        earlier = [nick for nick in self.own if self._holder(nick) is None and not self.claiming(nick)]
        for nick in earlier:
            self._show_unheld(nick)
        if earlier:
            self.later(lambda: self._release_unheld(earlier))
        for member in list(self.room.members.values()):
            if member.nick is not None and self.members.holds(member.id):
                self.sync(member)
        log.info("cluster: directory read (%s on other hosts, %s alive)", plural(len(self.entries), "member"),
                 plural(len(self.alive_hosts), "other host"))
        return True
