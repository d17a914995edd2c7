"""``chatctl client``: a line-protocol client for people and for scripts, that takes its
session back when its connection is lost.

Theory of operation
-------------------
What it prints on stdout tells the truth about the chat: ``connected local-port=N``
when it starts, each line from chatd as it comes (``< OK NICK ann``), messages
numbered ``#1``, ``#2`` … in the order shown. What it says about its connection
(lost, reconnecting, resumed, given up) goes to stderr. Each line typed is sent as a
message (``MSG <line>``); a line starting with ``/`` is a command (``/who`` sends
``WHO``, ``/quit`` ``QUIT``); ``/port`` prints the local port. The end of input
sends ``QUIT``.

**The session** (README, "Sessions"). Right after connecting, before its ``NICK``
and ``PAIR``, the client asks chatd for a session (``SESSION``; ``--no-session``:
not) and keeps the token in memory, and with ``--session-file`` in that file too
(:class:`SessionFile`). From then on it numbers every chat command it sends (1, 2,
3 …: every command but ``SESSION``, ``RESUME`` and ``ACK``, as chatd counts them) and
keeps each until chatd counts it handled (``HANDLED <count>``, the answer to an
``ACK``); it sends at most :data:`UNCONFIRMED` bytes of commands beyond the last
count, then asks for the count and waits for it, so what it keeps stays bounded
(and chatd's input ring always has room for the ``ACK``). It says which messages it
has shown (``ACK <n>``) after every :data:`ACK_EVERY` of them or :data:`ACK_BYTES`.

**A lost connection** (EOF or a reset without ``BYE``, an error writing; with
``--dead-after``, nothing at all from chatd for that long though a heartbeat ``ACK``
asked) is not the end: the client says ``reconnecting…`` on stderr and connects again
after a full-jitter backoff (:func:`backoff_delay`), then sends ``RESUME <token> <n
of the last message shown>``. chatd answers ``RESUMED <nick> <peer> <handled>`` and
sends again every message after that ``n``; the client sends again its commands
after ``handled`` (what was typed while cut is sent then, once) and goes on: the
numbering of what it shows just continues. Nothing is shown twice: with a session a
``FROM`` whose ``n`` is not above the last shown is dropped (a guard: chatd sends
each once). ``ERR busy <s>`` (a crowd resuming): ``RESUME`` again on the same
connection after the backoff's delay, never sooner than ``s``. ``ERR
unknown-session`` (the session's grace ran out, or chatd lost its journal): it says
so and goes on as a new client: ``SESSION``, ``NICK`` and ``PAIR`` again as chatd
last confirmed them, then what was typed and never sent; commands sent and never
confirmed are not sent again (whether chatd handled them cannot be known now) and it
says how many. After ``--retries`` tries in a row without a resumed session it gives
up, exit status 3. Without a session (``--no-session``, a chatd in a cluster
answering ``ERR sessions-off``, or a connection lost before chatd's answer to
``SESSION``) a lost connection ends the client, as it always did.

One thread waits on both stdin and the socket (``poll``), so the client ends the
moment the server ends the connection (``BYE``), even while no one types: nothing is
left waiting for one more line, which would swallow the next command typed in that
terminal. stdin is read with ``os.read`` on its fd, never through Python's buffer
(which ``poll`` cannot see), so a terminal, a pipe and a file all work. What is
typed is queued in the client and goes out through a non-blocking socket: while
chatd holds a fast sender back (flow control), or while the connection is being
taken back, the client stops reading stdin past :data:`SEND_QUEUE` bytes queued, but
goes on reading what chatd sends it.

State: :class:`_Client` owns it all (the connection, the queue of commands, the
session's counts), on the one thread; :class:`SessionFile` only writes what the
client hands it.

Exit status (:data:`EXIT_STATUS`): 0 when the server said ``BYE`` (after ``QUIT``,
or ``chatctl drain``), or the session was over after ``QUIT``; 1 when it cannot
connect at first; 2 for a session file it must not use; 3 when the connection ended
otherwise (without a session, EOF or a reset without ``BYE``; with one, given up
after ``--retries`` tries; or no ``BYE`` within :data:`QUIT_WAIT` seconds of ``QUIT``).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import random
import select
import socket
import sys
import time

#: Seconds to wait for the server's BYE once stdin has ended and QUIT is sent.
QUIT_WAIT = 5.0
#: Bytes of commands queued, not yet sent, past which the client stops reading stdin until they go.
SEND_QUEUE = 256 * 1024
#: With a session: an ACK after this many messages shown, or bytes of them (chatd keeps what it
#: sent until then, in an output ring whose room the peer waits for; README: at least this often).
ACK_EVERY = 16
ACK_BYTES = 32 * 1024
#: ... and at most this many bytes of commands sent beyond chatd's last count of them handled:
#: chatd reads on while a command waits for room, and 64 KiB always fit its input ring (README).
UNCONFIRMED = 64 * 1024
#: Reconnecting: tries before giving up, and the backoff (seconds) of the first try and its cap,
#: as the web page's (README, "The web chat"): eight tries span about a minute at worst, well
#: within chatd's session grace (120 s).
RETRIES = 8
BACKOFF = 1.0
BACKOFF_CAP = 15.0
#: With a session: silence from chatd this long, though a heartbeat asked, gives a connection up
#: (a half-open one never ends by itself). Longer than a takeover of a crashed chatd takes, which
#: must not cost a reconnection; 0: never. The heartbeat is answered in its turn, so a command of
#: this client held back that long (its peer's output ring full) costs a reconnection too: a
#: resume, nothing lost.
DEAD_AFTER = 30.0
#: Seconds one connection attempt may take (the client reads no stdin meanwhile).
CONNECT_TIMEOUT = 5.0
#: The session's own commands, which chatd does not count and this client sends itself.
SESSION_VERBS = ("SESSION", "RESUME", "ACK")
BYE, CANNOT_CONNECT, BAD_SESSION_FILE, LOST = 0, 1, 2, 3
EXIT_STATUS = (f"{BYE}: the server said BYE (after QUIT or /quit, end of input, or `chatctl drain`), or the "
               f"session was over after QUIT; {CANNOT_CONNECT}: could not connect; {BAD_SESSION_FILE}: a "
               f"--session-file it must not use; {LOST}: the connection ended without BYE (without a session: "
               f"EOF or a reset; with one: given up after --retries tries), or no BYE within "
               f"{QUIT_WAIT:.0f} s of QUIT; 130: Ctrl-C")


def to_wire(typed: str) -> str:
    """``hello`` -> ``MSG hello``; ``/pair bob`` -> ``PAIR bob``."""
    if not typed.startswith("/"):
        return f"MSG {typed}"
    verb, space, rest = typed[1:].partition(" ")
    return verb.upper() + space + rest


def verb_of(wire: bytes) -> str:
    """The command chatd reads in a line: its first word, ASCII, matched without regard to case
    (chatd.protocols.line.parse_line); "" for one no command has."""
    word = wire.rstrip(b"\n").split(b" ", 1)[0]
    return word.decode("ascii").upper() if word.isascii() else ""


def backoff_delay(attempt: int, base: float, cap: float, floor: float = 0.0, rng=random) -> float:
    """Seconds before try ``attempt`` (0 first): full jitter, anywhere in [0, min(cap, base·2^attempt)]
    (the cap applied before the jitter, so a crowd cut at once comes back spread), never less than
    ``floor`` (what chatd asked with ``ERR busy``)."""
    return max(floor, rng.uniform(0, min(cap, base * 2 ** min(attempt, 60))))


def shown_token(token: str) -> str:
    """A token as this client prints it: never whole (it is a secret; chatd logs as much)."""
    return f"{token[:4]}…"


class SessionFileError(Exception):
    """A session file the client must not use; the message names the fix."""


class SessionFile:
    """``--session-file``: what a client started again needs to take its session back: the token,
    the ``n`` of the last message shown, the commands not known handled and how many were numbered.

    The file is created with mode 0600 and refused if others may read it (the token is a secret).
    The client holds an exclusive lock on it while it runs: two clients resuming one session would
    take it from each other forever. Each save writes the whole state at offset 0, then cuts the
    file to its length: a client killed between the two leaves the new state followed by an old
    tail, which :meth:`load` ignores (it reads the first JSON value). Emptied when the session ends."""

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SessionFileError(f"cannot open the session file {path}: {exc.strerror or exc}") from None
        try:
            info = os.fstat(self.fd)
            if info.st_uid != os.geteuid():
                raise SessionFileError(f"the session file {path} belongs to uid {info.st_uid}, not to you "
                                       f"(uid {os.geteuid()}): give each user a file of their own")
            if info.st_mode & 0o077:
                raise SessionFileError(f"the session file {path} may be read by others (mode "
                                       f"{info.st_mode & 0o777:o}) and it holds a secret token: "
                                       f"chmod 600 {path} (or remove it to start a new session)")
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SessionFileError(f"another chatctl client uses the session file {path}: give each "
                                       "client a file of its own") from None
        except BaseException:
            os.close(self.fd)
            raise
        self._saved: bytes | None = None

    def load(self) -> dict | None:
        """The saved state; None for an empty file (no session). SessionFileError for one this client
        did not write: it is not guessed at (a wrong token would only start a new session anyway)."""
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0).decode("utf-8", "replace") if size else ""
        if not data.strip():
            return None
        try:
            state, _ = json.JSONDecoder().raw_decode(data)
            token, last_n, numbered = state["token"], int(state["last_n"]), int(state["numbered"])
            commands = [(int(number), str(line)) for number, line in state["commands"]]
            written = int(state.get("written", len(commands)))
            if not isinstance(token, str):
                raise TypeError("the token is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise SessionFileError(f"the session file {self.path} is not one this client wrote ({exc}): "
                                   "remove it to start a new session") from None
        return {"token": token, "last_n": last_n, "numbered": numbered, "commands": commands,
                "written": written,
                "nick": state.get("nick"), "target": state.get("target")}

    def save(self, state: dict | None) -> None:
        data = json.dumps(state).encode("utf-8", "surrogateescape") if state else b""
        if data == self._saved:
            return
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))
        self._saved = data

    def close(self) -> None:
        os.close(self.fd)


def run(host: str, port: int, nick: str | None, pair: str | None, out=sys.stdout, inp=sys.stdin,
        err=sys.stderr, sessions: bool = True, session_file: str | None = None, retries: int = RETRIES,
        backoff: float = BACKOFF, backoff_cap: float = BACKOFF_CAP, dead_after: float = DEAD_AFTER) -> int:
    prefix = f"[{nick}] " if nick else ""

    def writer(stream):
        def write(text: str) -> None:
            stream.write(prefix + text + "\n")
            stream.flush()
        return write

    say, note = writer(out), writer(err)
    store = None
    if session_file:
        try:
            store = SessionFile(session_file)
            saved = store.load()
        except SessionFileError as exc:
            if store is not None:
                store.close()
            note(str(exc))
            return BAD_SESSION_FILE
    else:
        saved = None
    try:
        try:
            sock = socket.create_connection((host, port), timeout=10)
        except OSError as exc:
            say(f"cannot connect to chatd at {host}:{port} ({exc.strerror or exc}); is chatd running there? "
                "(`chatctl status`; or pass --host/--port)")
            return CANNOT_CONNECT
        client = _Client((host, port), inp.fileno(), say, note, store, sessions=sessions, retries=retries,
                         backoff=backoff, backoff_cap=backoff_cap, dead_after=dead_after)
        try:
            return client.start(sock, nick, pair, saved)
        finally:
            client.close()
    finally:
        if store is not None:
            store.close()


class _Client:
    """The client: stdin's lines out as numbered commands, chatd's lines in, over one connection
    at a time, until chatd says BYE or the client gives up. The only owner of its state."""

    def __init__(self, address, stdin_fd: int, say, note, store: SessionFile | None, *, sessions: bool,
                 retries: int, backoff: float, backoff_cap: float, dead_after: float):
        self.address = address
        self.stdin_fd = stdin_fd
        self.say = say  # what the chat shows: stdout
        self.note = note  # what the client says of its connection: stderr
        self.store = store
        self.retries, self.backoff, self.backoff_cap, self.dead_after = retries, backoff, backoff_cap, dead_after
        # -- the connection
        self.sock: socket.socket | None = None
        self.local_port: int | None = None
        self.phase = "down"  # down (none) | resuming (RESUME sent, no answer yet) | open
        self.outgoing = bytearray()  # bytes for this connection: commands, ACKs, RESUME
        self.incoming = bytearray()  # chatd's bytes not yet a whole line
        self.last_heard = 0.0  # when chatd last sent anything on this connection
        self.heartbeat_at = 0.0  # when the last heartbeat ACK was sent on it
        # -- reconnecting
        self.attempts = 0  # tries since the session was last resumed
        self.retry_at: float | None = None  # down: connect then; resuming: RESUME again then (busy)
        # -- input
        self.typed = bytearray()  # stdin's bytes not yet a whole line
        self.input_ended = False
        self.quit_deadline: float | None = None  # the end of input's QUIT is sent: BYE by then
        # -- the session
        self.sessions = sessions  # asking for one, or having one
        self.token: str | None = None
        self.numbered = 0  # the number of the last command numbered since SESSION
        #: Commands not known handled, oldest first: (number, line); the first `sent` of them
        #: were written to a connection, the rest wait their turn (without a session, only those).
        self.commands: collections.deque[tuple[int, bytes]] = collections.deque()
        self.sent = 0
        self.sent_bytes = 0  # bytes of those sent
        #: The first `written` of them were written to some connection: chatd may have handled them.
        self.written = 0
        self.queued_bytes = 0  # bytes of those not sent
        self.counting = False  # an ACK is out whose HANDLED will say the count
        self.last_n = 0  # the n of the last message shown
        self.unacked, self.unacked_bytes = 0, 0  # messages shown since the last ACK
        self.shown = 0  # the #k of the last message shown
        self.nick: str | None = None  # as chatd last confirmed them (a new client takes them again)
        self.target: str | None = None
        self.saved_mark: tuple | None = None  # what the session file was last written from

    # -- starting, ending ------------------------------------------------------------------
    def start(self, sock: socket.socket, nick: str | None, pair: str | None, saved: dict | None) -> int:
        self.nick, self.target = nick, pair
        self._connected(sock)
        self.say(f"connected local-port={self.local_port}")
        if saved and self.sessions:
            self.token, self.last_n, self.numbered = saved["token"], saved["last_n"], saved["numbered"]
            self.nick, self.target = nick or saved["nick"], pair or saved["target"]
            for number, line in saved["commands"]:
                self._keep(number, line.encode("utf-8", "surrogateescape"))
            self.written = min(saved["written"], len(self.commands))
            self.note(f"taking back the session {shown_token(self.token)} of {self.store.path}")
            self._send_resume()
        else:
            self._begin(nick, pair)
        return self.run()

    def _begin(self, nick: str | None, pair: str | None) -> None:
        """A new client on this connection: a session asked for first, then the nick and pairing."""
        self.phase = "open"
        if self.sessions:
            self.outgoing += b"SESSION\n"
        if nick:
            self.command(f"NICK {nick}")
        if pair:
            self.command(f"PAIR {pair}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            status = self._timers(time.monotonic())
            if status is not None:
                return status
            self._transmit()
            poller = select.poll()
            if self.sock is not None:
                poller.register(self.sock, select.POLLIN | (select.POLLOUT if self.outgoing else 0))
            reading_stdin = not self.input_ended and self.queued_bytes + len(self.outgoing) < SEND_QUEUE
            if reading_stdin:
                poller.register(self.stdin_fd, select.POLLIN)
            wake = self._next_timer()
            timeout = None if wake is None else max(wake - time.monotonic(), 0) * 1000
            ready = dict(poller.poll(timeout))
            if self.sock is not None and self.sock.fileno() in ready:
                status = self._receive()
                if status is not None:
                    return status
            if reading_stdin and self.stdin_fd in ready:
                self._read_stdin()
            self._transmit()
            status = self._send()
            if status is not None:
                return status
            self._save()

    def _next_timer(self) -> float | None:
        times = [self.retry_at, self.quit_deadline]
        if self._watching():
            times += [self.last_heard + self.dead_after, max(self.last_heard, self.heartbeat_at) + self.dead_after / 2]
        times = [t for t in times if t is not None]
        return min(times) if times else None

    def _watching(self) -> bool:
        """Is chatd's silence watched on this connection (a half-open one never ends by itself)?"""
        return (self.dead_after > 0 and self.sock is not None and self.token is not None
                and not (self.phase == "resuming" and self.retry_at is not None))

    def _timers(self, now: float) -> int | None:
        """What is due now: a connection to make, a RESUME to send again, a heartbeat, a silence
        long enough to give the connection up, a QUIT unanswered; an exit status once it ends."""
        if self.phase == "down" and self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            try:
                sock = socket.create_connection(self.address, timeout=CONNECT_TIMEOUT)
            except OSError as exc:
                return self._retry_later(f"cannot connect ({exc.strerror or exc})")
            self._connected(sock)
            self.note(f"connected again local-port={self.local_port}: resuming the session")
            self._send_resume()
        if self.phase == "resuming" and self.retry_at is not None and now >= self.retry_at:
            self.retry_at = None
            self._send_resume()
        if self._watching():
            if now - self.last_heard >= self.dead_after:
                return self._lost(f"nothing from chatd for {self.dead_after:g} s")
            if self.phase == "open" and now - max(self.last_heard, self.heartbeat_at) >= self.dead_after / 2:
                self.heartbeat_at = now
                self._ack()  # answered with HANDLED: chatd is there
        if self.quit_deadline is not None and now >= self.quit_deadline:
            self.say(f"no BYE from chatd within {QUIT_WAIT:.0f} s of QUIT: closing")
            return LOST
        return None

    # -- the connection ----------------------------------------------------------------------
    def _connected(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.local_port = sock.getsockname()[1]
        self.outgoing.clear()
        self.incoming.clear()
        self.last_heard = self.heartbeat_at = time.monotonic()
        self.counting = False

    def _send_resume(self) -> None:
        self.phase = "resuming"
        self.last_heard = time.monotonic()
        self.outgoing += f"RESUME {self.token} {self.last_n}\n".encode()

    def _lost(self, reason: str) -> int | None:
        """This connection is over without BYE: with a session, reconnect; else the end."""
        self.close()
        self.phase = "down"
        self.quit_deadline = None
        if not (self.sessions and self.token):
            self.say("EOF" if reason == "EOF" else f"connection lost: {reason}")
            return LOST
        self.outgoing.clear()
        # Whatever chatd had not handled goes again after RESUMED; whatever it sent and this
        # client did not read whole comes again after the n it says it has.
        self.sent, self.queued_bytes, self.sent_bytes = 0, self.queued_bytes + self.sent_bytes, 0
        return self._retry_later(f"connection lost ({reason})")

    def _retry_later(self, why: str, floor: float = 0.0) -> int | None:
        if self.attempts >= self.retries:
            self.close()
            where = f"`chatctl client --session-file {self.store.path}`" if self.store else "a client"
            self.note(f"{why}: gave up after {self.retries} tries to take the session back from chatd at "
                      f"{self.address[0]}:{self.address[1]}. chatd keeps it for its grace (--session-grace, "
                      f"120 s by default): {where} started within it takes it back")
            return LOST
        delay = backoff_delay(self.attempts, self.backoff, self.backoff_cap, floor)
        self.attempts += 1
        self.retry_at = time.monotonic() + delay
        self.note(f"{why}: reconnecting… (try {self.attempts} of {self.retries} in {delay:.1f} s)")
        return None

    def _receive(self) -> int | None:
        """Read what chatd sent; an exit status once the client is done."""
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._lost(exc.strerror or str(exc))
        if not data:
            if self.incoming and not (self.sessions and self.token):
                self._line(bytes(self.incoming))  # without a session, what came is all there is
            return self._lost("EOF")
        self.last_heard = time.monotonic()
        self.incoming += data
        while self.sock is not None:
            newline = self.incoming.find(b"\n")
            if newline < 0:
                return None
            line = bytes(self.incoming[:newline])
            del self.incoming[:newline + 1]
            status = self._line(line)
            if status is not None:
                return status
        return None

    def _send(self) -> int | None:
        """Send what is queued, as much as the socket takes now."""
        if self.sock is None or not self.outgoing:
            return None
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self._lost(exc.strerror or str(exc))
        del self.outgoing[:sent]
        return None

    # -- chatd's lines -----------------------------------------------------------------------
    def _line(self, raw: bytes) -> int | None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        words = line.split(" ")
        if line.startswith("FROM "):
            self._from(line, len(raw) + 1)
            return None
        if self.sessions:
            status = self._session_line(words)
            if status is not False:
                return status
        if words[:2] == ["OK", "NICK"] and len(words) == 3:
            self.nick = words[2]
        elif words[:2] == ["OK", "PAIR"] and len(words) == 3:
            self.target = words[2]
        self.say(f"< {line}")
        if line == "BYE":
            self.close()
            if self.store:
                self.store.save(None)  # the session is over
            return BYE
        return None

    def _from(self, line: str, size: int) -> None:
        if self.token is not None:
            n = line.split(" ", 3)[2]
            n = int(n) if n.isdigit() else 0
            if n <= self.last_n:
                # Shown already: chatd sends each once, so this is a guard, and it says when it acts.
                self.note(f"not shown again: message {n} (the last shown is {self.last_n})")
                return
            self.last_n = n
        self.shown += 1
        self.say(f"#{self.shown} {line}")
        if self.token is not None:
            self.unacked += 1
            self.unacked_bytes += size
            if self.unacked >= ACK_EVERY or self.unacked_bytes >= ACK_BYTES:
                self._ack()

    def _session_line(self, words: list[str]):
        """The answers to the session's commands, which this client sent itself (so they are not
        shown); False for any other line."""
        if words[0] == "SESSION" and len(words) == 3 and words[2].isdigit():
            self.token = words[1]
            self.note(f"session {shown_token(self.token)}: a lost connection is taken back")
            return None
        if words[0] == "HANDLED" and len(words) == 2 and words[1].isdigit():
            self.counting = False
            self._confirmed(int(words[1]))
            return None
        if words[0] == "RESUMED" and len(words) == 4 and words[3].isdigit() and self.phase == "resuming":
            self._resumed(words[1], words[2], int(words[3]))
            return None
        if words[:2] == ["ERR", "busy"] and self.phase == "resuming":
            seconds = float(words[2]) if len(words) > 2 and words[2].isdigit() else 1.0
            # The connection stays: RESUME goes again on it when _retry_later says (_timers).
            return self._retry_later(f"chatd is busy (many sessions resuming) and asks for {seconds:g} s",
                                     floor=seconds)
        if words == ["ERR", "unknown-session"] and self.phase == "resuming":
            return self._new_client()
        if words == ["ERR", "sessions-off"]:
            self._without_session()
            return None
        return False

    def _confirmed(self, handled: int) -> None:
        """chatd handled this client's commands up to number ``handled``: they are not kept."""
        while self.sent and self.commands[0][0] <= handled:
            _, line = self.commands.popleft()
            self.sent -= 1
            self.written -= 1
            self.sent_bytes -= len(line)

    def _resumed(self, nick: str, peer: str, handled: int) -> None:
        self.phase = "open"
        self.attempts = 0
        self.nick = None if nick == "-" else nick
        self.target = None if peer == "-" else peer
        # Every command after `handled` goes again (all are unsent since the loss), in order.
        while self.commands and self.commands[0][0] <= handled:
            _, line = self.commands.popleft()
            self.written = max(self.written - 1, 0)
            self.queued_bytes -= len(line)
        self.numbered = max(self.numbered, handled)
        again = len(self.commands)
        self.note(f"resumed local-port={self.local_port}: {self.nick or 'no nick'}, "
                  f"{'paired with ' + self.target if self.target else 'not paired'}"
                  + (f"; {again} command(s) chatd had not handled go now" if again else ""))

    def _new_client(self) -> int | None:
        """chatd does not know the session (its grace ran out, its journal was lost): this
        connection goes on as a new client."""
        unconfirmed = [line for _, line in list(self.commands)[:self.written]]
        if any(verb_of(line) == "QUIT" for line in unconfirmed):
            self.note("the session is over (chatd handled QUIT, or the session's grace ran out)")
            if self.store:
                self.store.save(None)
            return BYE
        self.note("chatd no longer has this session (unknown-session: its grace ran out, or chatd lost its "
                  "journal): going on as a new client"
                  + (f"; {len(unconfirmed)} command(s) sent before were not confirmed and may not have arrived"
                     if unconfirmed else ""))
        unsent = [line for _, line in list(self.commands)[self.written:]]
        self.commands.clear()
        self.sent = self.written = self.sent_bytes = self.queued_bytes = 0
        self.token, self.numbered, self.last_n, self.unacked, self.unacked_bytes = None, 0, 0, 0, 0
        self.attempts = 0
        self._begin(self.nick, self.target)
        for line in unsent:
            self.numbered += 1
            self._keep(self.numbered, line)
        return None

    def _without_session(self) -> None:
        self.note("chatd keeps no sessions (sessions-off: a chatd in a cluster): a lost connection ends "
                  "this client")
        self.sessions = False
        for _ in range(self.sent):  # sent: chatd handles them in order; nothing is kept without a session
            self.commands.popleft()
        self.sent = self.written = self.sent_bytes = 0

    def _ack(self) -> None:
        """Say which messages were shown; chatd answers with the count of commands handled."""
        self.outgoing += f"ACK {self.last_n}\n".encode()
        self.counting = True
        self.unacked, self.unacked_bytes = 0, 0

    # -- commands out --------------------------------------------------------------------------
    def command(self, line: str) -> None:
        """A chat command, numbered (with a session) and kept until chatd says it is handled."""
        self.numbered += 1
        # surrogateescape: bytes that are not UTF-8 go as they came (chatd answers ERR bad-encoding)
        self._keep(self.numbered, line.encode("utf-8", "surrogateescape") + b"\n")

    def _keep(self, number: int, line: bytes) -> None:
        self.commands.append((number, line))
        self.queued_bytes += len(line)

    def _transmit(self) -> None:
        """Commands waiting go out, as many as may be unconfirmed at once (with a session)."""
        while self.phase == "open" and self.sent < len(self.commands):
            _, line = self.commands[self.sent]
            if self.sessions and self.sent_bytes and self.sent_bytes + len(line) > UNCONFIRMED:
                if self.token is not None and not self.counting:
                    self._ack()  # its HANDLED lets the next ones go
                return
            self.outgoing += line
            self.queued_bytes -= len(line)
            if self.sessions:
                self.sent += 1
                self.written = max(self.written, self.sent)
                self.sent_bytes += len(line)
            else:
                self.commands.popleft()  # nothing to send again without a session
            if self.input_ended and verb_of(line) == "QUIT" and self.quit_deadline is None:
                self.quit_deadline = time.monotonic() + QUIT_WAIT

    def _save(self) -> None:
        if self.store is None or self.token is None:
            return
        # Commands come in at the back and go at the front: their count, the first one's number
        # and the last number given tell whether they changed (no state built when nothing did).
        mark = (self.token, self.last_n, self.numbered, self.written, len(self.commands),
                self.commands[0][0] if self.commands else 0, self.nick, self.target)
        if mark == self.saved_mark:
            return
        self.saved_mark = mark
        self.store.save({
            "token": self.token, "last_n": self.last_n, "numbered": self.numbered, "written": self.written,
            "commands": [[number, line.decode("utf-8", "surrogateescape")] for number, line in self.commands],
            "nick": self.nick, "target": self.target,
        })

    # -- stdin -----------------------------------------------------------------------------------
    def _read_stdin(self) -> None:
        try:
            data = os.read(self.stdin_fd, 65536)
        except OSError:  # a terminal that hung up (EIO): the end of input
            data = b""
        if not data:
            if self.typed:
                self._typed_line(bytes(self.typed))
            self.input_ended = True
            self.command("QUIT")
            return
        self.typed += data
        while True:
            newline = self.typed.find(b"\n")
            if newline < 0:
                return
            line = bytes(self.typed[:newline])
            del self.typed[:newline + 1]
            self._typed_line(line)

    def _typed_line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "surrogateescape")
        if line == "/port":
            self.say(f"local-port={self.local_port}" if self.sock is not None else "not connected (reconnecting)")
            return
        wire = to_wire(line)
        if self.sessions and verb_of(wire.encode("utf-8", "surrogateescape")) in SESSION_VERBS:
            self.note(f"not sent: {', '.join(SESSION_VERBS)} are this client's own while it keeps a session "
                      "(--no-session to send them by hand)")
            return
        self.command(wire)
