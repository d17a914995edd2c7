"""chatd's server: accepts clients, hands their commands to the room, commits, then sends.

Theory of operation
-------------------
:class:`ChatServer` owns the listening socket, one :class:`~chatd.connection.Connection`
per client, the :class:`~chatd.room.Room`, the :class:`~chatd.journal.Journal`
and the :class:`~chatd.holders.Holders`, all on one event loop. The rule that
makes a crash lose and repeat nothing: **no effect leaves chatd before the
journal has committed it, and every commit covers a command's input, its
change to the room and its output together.** So:

1. a client is accepted, kept at once (appended to a bundle the holders keep,
   :mod:`chatd.bundles`: one local ``sendmsg``, before a byte of it is read),
   and joins the room under a free journal slot;
2. its bytes are received straight into its input ring in the journal;
3. :meth:`ChatServer.take_input` takes commands from its codec one at a time.
   Each is handled by the room; the room's :class:`~chatd.room.Outcome` is
   carried out by :meth:`ChatServer.apply`: events are encoded into the
   output rings of the members they go to. Nothing is sent yet;
4. at the end of every turn of the loop, :meth:`ChatServer.commit` writes the
   records of every member that changed (input handled up to where, nick,
   target, count, output up to where) in one journal commit, and only then
   flushes the output rings. A crash before the commit leaves the journal as
   it was: the input is still in the input ring, unhandled, and the new chatd
   handles it; a crash after it leaves the output in the output rings, and the
   new chatd sends what the kernel says was not sent.

While a command is handled, the journal's marker names it (slot and input
offset), and the process's last words (:mod:`chatd.lastwords`) say how it
died: a *poison* line must not kill every successor, and a kill from outside
must never drop a line. So only a crash of chatd's own (a fatal signal raised
in it) counts against the command it was handling; a SIGKILL (``kill -9``, the
OOM killer) counts nothing. A command chatd crashed handling twice, or hung in
(the watchdog killed it there), is first tried in a child process
(:mod:`chatd.trial`): one that kills or hangs the child too is answered
``ERR crashed-server`` and skipped, and chatd goes on; one the child survives
is handled (what crashed or stalled chatd was something else). After
:data:`SKIP_AFTER_DEATHS` crashes on it a command is skipped whatever the child
did: the child tries the room's handling and the events' encoding, not all of it.

**Backpressure, not loss.** A command is handled only while the output rings
it may write to (its sender's and its sender's peer's) have :data:`RESERVE`
bytes free, twice the largest event. Otherwise the sender's reading stops,
TCP's flow control slows it down, and it goes on when the reader has taken
enough. A client that takes nothing of what is queued for it for
``stall_timeout`` seconds is closed, with that reason.

A client closed on purpose (QUIT, drain) gets its last word (BYE), leaves the
room at once, and is closed once that word is sent; it leaves the journal and
every holder then. A client with a session (:mod:`chatd.sessions`) whose
connection ends any other way stays in the room, detached: its slot, record
and output ring wait for it to resume on a new connection. Starting from what the holders kept after a crash is
:mod:`chatd.restore`'s job; chatctl's requests are :mod:`chatd.control`'s.
Timers send systemd the status line, ping its watchdog, and audit the holders.
"""

from __future__ import annotations

import enum
import logging
import socket
import time

from fdkeep.errors import Error
from fdkeep.loop import Loop
from fdkeep.systemd import ServiceManager
from fdkeep.text import plural

from . import faults, trial
from .across import AcrossHosts, SingleHost
from .adoption import Adoption
from .admission import AddressLimit, counted_address
from .backup import Backup
from .bundles import ClientBundles
from .connection import Connection
from .holders import Holders
from .journal import Journal
from .lastwords import LastWords
from .listeners import Listeners, refuse
from .protocols import HEALTH_ASKED
from .records import Record, record_of
from .rings import RingFull
from .room import SESSION_COMMANDS, Busy, Bye, Command, Failed, From, Member, Moved, Msg, Outcome, Remote, Resumed, Room
from .sessions import GRACE, Detached, Sessions
from .statedir import StateDir, new_journal

log = logging.getLogger("chatd")

#: How often chatd checks that its holders still hold everything (holderd may
#: have been stopped and started meanwhile, which empties it).
AUDIT_INTERVAL = 5.0
#: The largest event one command sends one member, in any protocol: a FROM
#: carrying a whole 64 KiB line (as JSON, where every '"' of it doubles), or a
#: WHO answer (at most MAX_USERS entries).
MAX_EVENT = 132 * 1024
#: Free room an output ring must have before a command that may write to it is
#: handled: the largest event, and room for the notices (UNPAIRED, PAIRED) other
#: members' commands may send it meanwhile (each of those follows a command of
#: its own, so they are few).
RESERVE = MAX_EVENT + 16 * 1024
#: A command chatd crashed handling this often is skipped even if a child process survives it
#: (chatd.trial tries the room's handling and the encoding, not the writes into the rings nor what
#: goes to other hosts: a poison there must end too). Only crashes count (chatd.lastwords): a
#: SIGKILL and the watchdog's SIGQUIT never do, so they can never drop a command.
SKIP_AFTER_DEATHS = 4
#: A client that takes nothing of its queued output this long is closed.
STALL_TIMEOUT = 60.0
#: How often a bundle of sockets appended one by one is packed (one bundle a time).
TIDY_INTERVAL = 0.2
#: Why clients usually go, logged at debug level only.
ROUTINE_ENDS = {"said its last word", "client closed the connection", "said QUIT"}
#: The name each listening socket is kept under in the holders, by the protocol it serves.
#: How long a web client may take to send its whole HTTP request (the opening of the WebSocket).
HANDSHAKE_TIMEOUT = 10.0


class Role(enum.Enum):
    """What a chatd process plays (chatd.lifecycle owns it and says how it changes)."""

    STARTING = "starting"
    WAITING = "waiting"
    STANDBY = "standby"
    SERVING = "serving"


class ChatServer:
    def __init__(self, holders: Holders, max_clients: int, manager: ServiceManager | None = None,
                 stall_timeout: float = STALL_TIMEOUT, replay: bool = True, max_per_address: int = 0,
                 session_grace: float = GRACE):
        self.loop = Loop()
        self.manager = manager or ServiceManager({})
        self.room = Room()
        self.holders = holders
        self.bundles = ClientBundles(holders)
        self.max_clients = max_clients
        #: Connections one client address may have (--max-per-address).
        self.address_limit = AddressLimit(self.loop, max_per_address, lambda: self.connections.values())
        self.stall_timeout = stall_timeout
        #: On restore, finish what was in flight (see chatd.restore); off only to show loss in tests.
        self.replay = replay
        self.connections: dict[int, Connection] = {}
        #: Restored sockets not served yet (chatd.adoption): :meth:`connection` serves one when needed.
        self.adoption = Adoption(self)
        #: Sessions (chatd.sessions): their commands, and the detached ones (a member, no connection).
        self.sessions = Sessions(self, session_grace)
        #: The listening sockets, by the protocol their clients speak: "line", and "websocket" (the web port).
        self.listeners = Listeners(self.loop, holders, self._admit,
                                   lambda: plural(self.client_count(), "client"), self.manager.watchdog)
        #: What the holders keep for chatd, as one (backup on request, the audit).
        self.backup = Backup(holders, self.listeners, self.bundles, lambda: self.journal, lambda: self.last_words)
        self.journal: Journal | None = None
        #: Where this process's faulthandler writes once it serves: how it died, for its successor.
        self.last_words: LastWords | None = None
        #: The other chatd hosts (chatd.across): none by default; with --cluster, chatd.cluster's
        #: (each slot then has an outbox).
        self.cluster: AcrossHosts = SingleHost()
        self.box_size = 0
        #: Where the journal lives on disk (``--state-dir``, chatd.statedir); None: a memfd.
        self.state_dir: StateDir | None = None
        self.started = time.time()
        self.restored_at: float | None = None
        #: The summary of the restore this process started with (chatd.restore).
        self.restore_summary: dict | None = None
        #: What this process plays; changed only by its owner, chatd.lifecycle.Lifecycle.
        self.role = Role.STARTING
        #: This process's name among the chatd taking turns (``--instance``); None alone.
        self.instance: str | None = None
        #: ``--metrics-port``: the metrics endpoint (chatd.metrics), which chatd.lifecycle makes
        #: and starts a second after this chatd begins to serve; None until then, or without the flag.
        self.metrics = None
        #: Members whose record must be committed; slots to free; connections to wake.
        self._dirty: set[int] = set()
        self._freed: set[int] = set()
        self._wake: set[int] = set()
        self.loop.after_events(self.commit)

    # -- start: fresh or restored ---------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self.listeners.port

    @property
    def http_port(self) -> int | None:
        return self.listeners.http_port

    def bind(self, host: str, port: int, http_port: int | None = None) -> None:
        """Start afresh: a new journal and listening sockets, kept in every holder."""
        self.listeners.open(host, port, http_port)
        self.journal = new_journal(self)
        self.last_words = LastWords.create()
        self.last_words.listen()
        self.backup.store_server_items()
        web = f", web on port {self.http_port}" if self.http_port else ""
        log.info("listening on %s:%d%s (fresh start)", host, self.port, web)

    def adopt(self, sock: socket.socket, member_id: int, record: Record | None = None,
              read: int = 0, written: int = 0, inode: int | None = None, protocol: str = "line") -> Connection:
        """Serve ``sock`` as member ``member_id``: a new client of ``protocol``, or one restored
        with its record and the kernel's counts of what was read and written on it."""
        fresh = record is None
        if fresh:
            record = Record(0, protocol, in_handled=read, out_start=written, out_end=written)
        journal = self.journal
        rings = (journal.in_ring(member_id), journal.out_ring(member_id),
                 journal.box_ring(member_id) if journal.box_size else None)
        connection = Connection.from_record(self.loop, sock, member_id, record, rings, read, written, inode,
                                            on_input=self.take_input, on_output_moved=self.output_moved,
                                            on_lost=self._lost, opening_timeout=HANDSHAKE_TIMEOUT)
        self.connections[member_id] = connection
        if not fresh:
            self.address_limit.restored()
        if fresh or connection.outbox:  # a record to write; or output a crash left, which only a commit sends
            self._dirty.add(member_id)
        return connection

    def client_count(self) -> int:
        """Every client served, or restored and still waiting to be (chatd.adoption); not the
        detached sessions."""
        return len(self.connections) + len(self.adoption)

    def connection(self, member_id: int) -> Connection | None:
        """The member's connection; one restored and still waiting is served now, since it is needed."""
        connection = self.connections.get(member_id)
        if connection is None and member_id in self.adoption:
            connection = self.adoption.adopt(member_id)
        return connection

    def let_go(self, member_id: int, reason: str) -> None:
        """A restored member whose socket did not come back alive: out of the room, the journal
        and the holders, as if it had left while no chatd served; a session waits for its client."""
        self.bundles.forget(member_id)
        member = self.room.members.get(member_id)
        if member is not None and member.token:
            self.sessions.detach_restored(member_id, self.journal.read(member_id))
            return
        log.info("member %d let go: %s", member_id, reason)
        self._freed.add(member_id)
        self.leave_room(member_id)

    def free_slot(self, member_id: int) -> None:
        """The member's journal slot is free at the next commit (its record goes with it)."""
        self._freed.add(member_id)
        self._dirty.discard(member_id)
        self._wake.discard(member_id)

    # -- clients ----------------------------------------------------------------------
    def _admit(self, sock: socket.socket, peer, protocol: str) -> None:
        """A client the listeners accepted: served in a free slot, kept before a byte is read;
        or refused with the reason, if its address has too many or every slot is taken."""
        address = counted_address(peer)
        if not self.address_limit.admits(address):
            self.journal.tally.add("refused_max_per_address")
            refuse(sock, protocol, "too-many-connections")
            return
        slot = self.journal.allocate()
        if slot is None:
            self.journal.tally.add("refused_max_clients")
            log.warning("refusing a client: all %d slots are taken (--max-clients)", self.max_clients)
            refuse(sock, protocol, "server-full")
            return
        # Kept before a byte of it is read: from here on a crash cannot lose it.
        try:
            self.bundles.add(slot, sock.fileno())
        except Error as exc:
            log.error("refusing a client: %s", exc.message)
            self.journal.commit({slot: None})
            refuse(sock, protocol, "server-full")
            return
        self._dirty |= self.room.join(slot, protocol).changed
        connection = self.adopt(sock, slot, protocol=protocol)
        self.address_limit.joined(connection, address)
        if log.isEnabledFor(logging.DEBUG):  # .remote is a syscall: not for nothing
            log.debug("member %d connected from %s", slot, connection.remote)

    def take_input(self, connection: Connection) -> None:
        """Handle the connection's commands, as many as the output rings have room for."""
        if connection.blocked:
            connection.open()  # asked again: room may have come
        while connection.takes_commands:
            if not self._has_room(connection):
                connection.block()
                self.sessions.release_ahead(connection)  # an ACK behind may make the room
                break
            if self.cluster.holds_back(connection):
                break  # paired across hosts before a crash: its commands wait for the directory
            start = connection.codec.consumed
            command = connection.codec.next_command()
            if command is HEALTH_ASKED:  # a load balancer's probe: this host's, not the room's
                connection.codec.answer_health(self.cluster.unhealthy())
                command = None
            if command is not None and self.cluster.parks(connection, connection.codec.consumed, command):
                break  # the cluster answers it (chatd.cluster): its input stays unhandled till then
            if connection.codec.consumed != connection.inbox.handled:
                connection.inbox.consume(connection.codec.consumed)
                self._dirty.add(connection.member_id)
            self._send_protocol_output(connection)
            if command is None:
                break
            self.journal.mark_handling(connection.member_id, start)
            try:
                if isinstance(command, SESSION_COMMANDS):
                    self.apply(self.sessions.handle(connection, command))
                else:
                    self.apply(self._handle(connection, start, command))
            finally:
                self.journal.clear_handling()
            self._send_protocol_output(connection)
            faults.reached("after-handle")
        if connection.codec.finished and not connection.closed and not connection.finishing:
            member = self.room.members.get(connection.member_id)
            if member is not None and member.token:
                # A page that goes (a reload, a closed tab) closes its WebSocket: not a QUIT, so
                # its session waits for it (chatd.sessions), as on any other end of the connection.
                self.close_client(connection.member_id, "its WebSocket was closed")
            else:
                self.finish([connection.member_id], "its protocol ended it")
        elif connection.input_done():
            self.close_client(connection.member_id, "client closed the connection")

    def _send_protocol_output(self, connection: Connection) -> None:
        """What the codec must send on its own (an HTTP answer, a pong) goes out like events do."""
        output = connection.codec.take_output()
        if output:
            connection.outbox.append(output)
            self._dirty.add(connection.member_id)

    def _handle(self, connection: Connection, start: int, command: Command) -> Outcome:
        member_id = connection.member_id
        crashes = connection.poison_count if start == connection.poison_offset else 0
        hung = connection.hung_at == start
        if hung:
            connection.hung_at = None
        if crashes >= 2 or hung:
            # Crashed chatd twice, or hung it: perhaps of it, perhaps not (a SIGSEGV sent from
            # outside, a stalled process): a poison kills or hangs a child that tries it too.
            why = " and ".join(filter(None, (f"crashed chatd {crashes} times" if crashes else "",
                                             "hung chatd" if hung else "")))
            if crashes >= SKIP_AFTER_DEATHS:
                log.error("member %d: the command at input offset %d %s: answered ERR crashed-server and "
                          "skipped", member_id, start, why)
                return self._skipped(member_id)
            if not trial.survives(lambda: self._try(member_id, command)):
                log.error("member %d: the command at input offset %d %s, and killed or hung a child process "
                          "that tried it: answered ERR crashed-server and skipped", member_id, start, why)
                return self._skipped(member_id)
            log.warning("member %d: the command at input offset %d %s, but a child process handled it and "
                        "lived: not a poison (what stopped chatd came from elsewhere); handling it",
                        member_id, start, why)
        return self._handle_in_room(member_id, command)

    def _skipped(self, member_id: int) -> Outcome:
        """A command skipped as a poison: answered so, and counted handled (a session's client
        must not send it again)."""
        outcome = Outcome().tell(member_id, Failed("crashed-server"))
        self.room.count_handled(member_id, outcome)
        return outcome

    def _try(self, member_id: int, command: Command) -> None:
        """What a child process tries (chatd.trial): the room's handling of the command and the
        encoding of every event it sends, into bytes that go nowhere: nothing is written that the
        parent shares (the journal's rings, the sockets, the loop's epoll set)."""
        for recipient, event in self._handle_in_room(member_id, command).deliveries:
            connection = self.connections.get(recipient)
            codec = connection.codec if connection is not None else self.adoption.codec_of(recipient)
            if codec is not None:
                codec.encode(event)

    def _handle_in_room(self, member_id: int, command: Command) -> Outcome:
        """The room's handling of one command, which touches nothing outside this process (so
        a child process may try it: chatd.trial)."""
        if isinstance(command, Msg):
            faults.handling_message(command.text)
        try:
            return self.room.handle(member_id, command)
        except Exception:  # a bug must not take every client down with it
            log.exception("member %d: handling %r failed; answered ERR internal-error", member_id, command)
            return Outcome().tell(member_id, Failed("internal-error"))

    def resume_parked(self, connection: Connection, end: int, outcome: Outcome) -> None:
        """The cluster answered a parked command (which ends at input offset ``end``): carry
        out its outcome and take the client's next commands. A connection that is finishing
        meanwhile (its session moved to another host: chatd.keeper) takes nothing more."""
        if connection.finishing:
            return
        connection.open()
        connection.inbox.consume(end)
        self._dirty.add(connection.member_id)
        self.apply(outcome)
        self.take_input(connection)

    def changed(self, *member_ids: int) -> None:
        """These members' records are to be committed (the cluster changed them)."""
        self._dirty.update(member_id for member_id in member_ids if member_id in self.connections)

    def wake(self, member_id: int) -> None:
        """Room came for this member's commands (its outbox to other hosts emptied): take them."""
        self._wake.add(member_id)

    @staticmethod
    def output_has_room(connection: Connection) -> bool:
        return connection.outbox.free >= RESERVE

    def _has_room(self, connection: Connection) -> bool:
        if connection.outbox.free < RESERVE:
            return False
        member = self.room.members.get(connection.member_id)
        if member is None or member.peer is None:
            return True
        if self.room.through_stream(member.peer) and not self.cluster.has_room(connection, member):
            return False
        # A peer of this host holds its sender back by its own ring, through the stream too.
        peer = None if isinstance(member.peer, Remote) else self.output(member.peer.id)
        return peer is None or peer.outbox.free >= RESERVE

    def output(self, member_id: int) -> Connection | Detached | None:
        """Where the member's events go: its connection, or its detached session's output ring."""
        return self.sessions.detached.get(member_id) or self.connection(member_id)

    def apply(self, outcome: Outcome) -> None:
        """Carry out what the room decided: events into output rings, members to commit, closes.
        What it carries out is counted (chatd.tally), and committed with it."""
        tally, resumed = self.journal.tally, False
        for member_id, event in outcome.deliveries:
            kind = type(event)
            if kind is From:
                if not resumed:  # those after RESUMED are sent again, not relayed again
                    tally.add("messages_relayed")
            elif kind is Resumed:
                resumed = True
                tally.add("sessions_resumed")
            elif kind is Busy:
                tally.add("refused_resume_rate")
            connection = self.output(member_id)
            if connection is None or connection.finishing:
                continue
            try:
                connection.send(event)
            except RingFull:
                if isinstance(connection, Detached):  # held back by _has_room: a bug if it comes
                    log.error("member %d: its detached session's output ring has no room for %r: dropped",
                              member_id, event)
                    continue
                self.close_client(member_id, f"does not read: its output ring has no room for {event!r}")
                continue
            except Exception:  # a bug in an encoder: not the reader's fault, and no reason to die
                log.exception("member %d: encoding %r failed; the event is dropped", member_id, event)
                continue
            self._dirty.add(member_id)
        self._dirty |= {member_id for member_id in outcome.changed
                        if member_id in self.connections or member_id in self.sessions.detached}
        for forward in outcome.forwards:
            self.cluster.forward(forward)
        if outcome.closes:
            self.finish(outcome.closes, "said QUIT")

    def finish(self, member_ids: list[int], reason: str) -> None:
        """These members said their last word: they leave the room now, their connections once
        that word is sent. All stop first, then leave: none hears of another leaving after it."""
        ending = [c for c in map(self.connections.get, member_ids) if c is not None and not c.finishing]
        for connection in ending:
            log.debug("member %d finishing: %s", connection.member_id, reason)
            connection.finish()
            self._dirty.add(connection.member_id)
        for connection in ending:
            self.leave_room(connection.member_id)

    def leave_room(self, member_id: int) -> None:
        """The member leaves the room (its peer is told); its connection, if any, is another matter."""
        member = self.room.members.get(member_id)
        if member is None:
            return
        if member.nick is not None:
            self.cluster.nick_left(member.nick)
        if member.token:
            self.cluster.session_ended(member.token)
        self.apply(self.room.leave(member_id))

    def _lost(self, connection: Connection, reason: str) -> None:
        self.close_client(connection.member_id, reason)

    def close_client(self, member_id: int, reason: str) -> None:
        """Close a client: it leaves the room, the journal and every holder; unless it has a
        session and did not say QUIT: then its session waits for it (chatd.sessions)."""
        member = self.room.members.get(member_id)
        detaching = member is not None and bool(member.token)
        connection = self.drop_connection(member_id, reason, quiet=detaching)
        if connection is None:
            return
        if detaching and not connection.finishing:
            self.sessions.detach(connection, reason)
            return
        self.free_slot(member_id)
        self.leave_room(member_id)

    def session_moved_away(self, member_id: int, why: str, host: str | None = None) -> None:
        """Another host (``host``, if known) serves this member's session (or nick) now
        (chatd.keeper): its client is told ``ERR moved`` and closed (it resumes where the load
        balancer sends it), a detached session ends, and the member leaves the room here: as a
        member of ``host`` from now on, its peer here none the wiser."""
        log.info("member %d: its session moved to %s (%s): closed with ERR moved", member_id,
                 f"host {host}" if host else "another host", why)
        member = self.room.members.get(member_id)
        sent = member.sent if member is not None else 0
        if host is not None and member_id in self.room.members:
            moved = self.room.move_away(member_id, host)
            self.apply(moved)
            # Its peer here may be held back by this member's output ring (_has_room), which is no
            # longer its peer's: taken again now, as no output of its own moved to wake it.
            self._wake.update(moved.changed)
        connection = self.connections.get(member_id)
        if connection is not None and not connection.finishing:
            self.apply(Outcome().tell(member_id, Moved(sent)))
            self.finish([member_id], "its session moved to another host")
            return
        detached = self.sessions.detached.pop(member_id, None)
        if detached is not None:
            if detached.expiry is not None:
                detached.expiry.cancel()
            self.free_slot(member_id)
        self.leave_room(member_id)

    def drop_connection(self, member_id: int, reason: str, quiet: bool = False) -> Connection | None:
        """Shut the member's connection down and forget its socket (the member is another matter);
        ``quiet``: its end is logged by whoever goes on with the member (a session)."""
        connection = self.connections.pop(member_id, None)
        if connection is None:
            return None
        # One line per client in the journal would be thousands a second at scale: only
        # the unexpected ends are worth an info line.
        (log.debug if reason in ROUTINE_ENDS or quiet else log.info)("member %d closed: %s", member_id, reason)
        connection.close()  # shut down first: the copy in its bundle ends with it
        self.address_limit.left(connection)
        self.bundles.forget(member_id)
        self._dirty.discard(member_id)
        self._wake.discard(member_id)
        self.cluster.closed(connection)
        return connection

    def output_moved(self, connection: Connection) -> None:
        """Some of the connection's output was sent: room for those waiting on it, or its end."""
        connection.progress_at = time.monotonic() if connection.outbox else None
        if connection.finishing and not connection.outbox.pending:
            self.close_client(connection.member_id, "said its last word")
            return
        self._wake.add(connection.member_id)
        member = self.room.members.get(connection.member_id)
        if member is None:
            return
        if isinstance(member.peer, Member):
            self._wake.add(member.peer.id)
        # Messages through the stream (from other hosts, or this one's: Room.durable_host) may wait.
        self.cluster.wake(member.nick)

    # -- the commit -----------------------------------------------------------------
    def commit(self) -> None:
        """Commit what changed in one step, then send what the commit allows; repeat while
        that frees room for waiting senders."""
        while self._dirty or self._freed or self._wake:
            for member_id in sorted(self._wake):
                connection = self.connections.get(member_id)
                if connection is not None and connection.blocked:
                    self.take_input(connection)
            self._wake.clear()
            if not self._dirty and not self._freed:
                break
            changes: dict[int, Record | None] = {slot: None for slot in self._freed}
            committed = [self.connections.get(m) or self.sessions.detached[m] for m in self._dirty
                         if m in self.connections or m in self.sessions.detached]
            for connection in committed:
                member = self.room.members.get(connection.member_id) or Member(connection.member_id)
                changes[connection.member_id] = record_of(member, connection)
            self.journal.commit(changes, cursor=self.cluster.cursor)
            self._dirty.clear()
            self._freed.clear()
            for connection in committed:
                connection.inbox.committed = connection.inbox.handled
                released = connection.outbox.kept_committed
                connection.outbox.commit()
                if connection.closed:  # a detached session: nothing to send, nobody to read
                    continue
                if connection.outbox.kept_committed != released:  # a session's ACK made room: now it is free
                    self.output_moved(connection)
                if connection.forwards is not None:
                    connection.forwards.commit()  # forwards to other hosts: now the cluster's to publish
                if connection.outbox or connection.finishing:  # new output, or output a crash left
                    connection.progress_at = connection.progress_at or time.monotonic()
                    self._send(connection)
                if not connection.closed:
                    connection.update_reading()  # the commit freed room in its input ring
            self.cluster.committed([c for c in committed if not isinstance(c, Detached)])
            faults.reached("after-commit")
        if self.journal is not None and self.journal.tally.unsaved:
            self.journal.commit({}, cursor=self.cluster.cursor)  # a count alone (a client refused, a restore)

    def _send(self, connection: Connection) -> None:
        if connection.closed:
            return
        connection.flush()
        if connection.finishing and not connection.outbox.pending and not connection.closed:
            self.close_client(connection.member_id, "said its last word")

    def _drop_stalled(self) -> None:
        now = time.monotonic()
        for connection in list(self.connections.values()):
            waiting_since = connection.progress_at
            if connection.outbox and waiting_since and now - waiting_since > self.stall_timeout:
                self.journal.tally.add("refused_stall_timeout")
                self.close_client(connection.member_id,
                                  f"took none of its {plural(connection.outbox.pending, 'byte')} "
                                  f"of output for {self.stall_timeout:.0f} s")

    def drain(self) -> int:
        """End every client connection on purpose (each gets BYE); the count ended."""
        self.adoption.adopt_all("a drain ends every connection")
        self.sessions.end_all("the operator drained chatd")
        ending = [member_id for member_id, c in self.connections.items() if not c.finishing]
        for member_id in ending:
            self.apply(Outcome().tell(member_id, Bye()))
        self.finish(ending, "drained by the operator")
        log.info("drained %s", plural(len(ending), "connection"))
        return len(ending)

    # -- running ----------------------------------------------------------------------
    def serve_forever(self) -> None:
        self.loop.call_every(AUDIT_INTERVAL, self.backup.audit)
        self.holders.watch(self.loop, self.backup.audit)
        self.loop.call_every(TIDY_INTERVAL, self.bundles.tidy)
        self.loop.call_every(min(self.stall_timeout / 4, 5.0), self._drop_stalled)
        if self.manager.watchdog_interval:
            self.loop.call_every(self.manager.watchdog_interval, self.manager.watchdog, first=0)
        self.loop.run_forever()
