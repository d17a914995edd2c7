"""The seed's story, played with real processes: used by ``chatctl shell`` and ``chatctl demo``.

Every part runs as its own process, started with this Python: holderd and
chatd by a :class:`~ctl.launch.Launcher`, and two ``chatctl client`` processes
C1 and C2 that pair with each other. The sockets live in a scratch directory,
so no root and no systemd are needed. :class:`Story` has one method per
instruction of the master console; each checks what it can see and raises
:class:`~fdkeep.errors.Error` (code ``story-failed``) when the story goes wrong.

What it says is what it saw: a backup reports what holderd answered it keeps,
a crash asks holderd whether it keeps chatd's sockets (if not, the clients'
connections end, and the story waits for their EOF and says so), and a message
is said to wait in the kernel only while chatd is down or not yet restored and
both clients' connections are open.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

from fdkeep.errors import Error
from fdkeep.text import plural
from holderd.client import HolderClient

from .control import backup_report
from .launch import Launcher, wait_until

PAIRED = re.compile(r"< PAIRED (\S+)")


def story_failed(message: str) -> Error:
    return Error("story-failed", message)


class ClientProcess:
    """A ``chatctl client`` child; every line it prints is kept and echoed."""

    def __init__(self, nick: str, pair: str, port: int, env: dict, echo):
        self.nick = nick
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._echo = echo
        self.proc = subprocess.Popen(
            # --no-session: the story tells the truth about one TCP connection each, and what a crash
            # without holderd does to it; a client that took its session back would hide that.
            [sys.executable, "-m", "ctl.cli", "client", "--port", str(port), "--nick", nick, "--pair", pair,
             "--no-session"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            env=env,
        )
        threading.Thread(target=self._collect, daemon=True).start()
        self.local_port = int(wait_until(self._local_port, 10, f"{nick} to connect"))

    def _collect(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.lines.append(line)
            self._echo(line)

    def _local_port(self):
        for line in self.snapshot():
            match = re.search(r"connected local-port=(\d+)", line)
            if match:
                return match.group(1)
        if self.proc.poll() is not None:
            raise story_failed(f"{self.nick} exited: {self.snapshot()}")
        return None

    def snapshot(self) -> list[str]:
        with self._lock:
            return list(self.lines)

    def type(self, text: str) -> None:
        try:
            self.proc.stdin.write(text + "\n")
            self.proc.stdin.flush()
        except OSError as exc:  # BrokenPipeError: the client exited
            raise story_failed(f"{self.nick} cannot take input: it has exited ({exc.strerror or exc})") from None

    def connection_gone(self) -> str | None:
        """Why this client's connection is over, or None while it is open."""
        if self.saw_eof():
            return f"{self.nick}'s connection was closed (it got EOF)"
        if self.proc.poll() is not None:
            return f"{self.nick} has exited"
        return None

    def messages(self) -> list[str]:
        return [line for line in self.snapshot() if re.match(rf"\[{self.nick}\] #\d+ FROM ", line)]

    def saw_eof(self) -> bool:
        return any(line.endswith("] EOF") for line in self.snapshot())

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


class Story:
    def __init__(self, echo=print):
        self.launcher = Launcher()
        self.workdir = self.launcher.workdir
        lock = threading.Lock()

        def echo_whole_lines(text: str) -> None:  # the clients' threads print too
            with lock:
                echo(text)

        self.echo = echo_whole_lines
        self.began = time.monotonic()
        self.chatd_runs = 0
        self.clients: dict[str, ClientProcess] = {}
        self.sent = 0
        #: chatd runs with --restore --wait and has not taken its sockets back yet.
        self.awaiting_restore = False
        self.crashed_at: float | None = None
        self.gap_ms: float | None = None

    @property
    def chatd(self):
        return self.launcher.chatd

    @property
    def port(self) -> int | None:
        return self.launcher.port

    # -- output ---------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.echo(f"[{time.monotonic() - self.began:7.3f}s] {text}")

    def logs(self) -> str:
        return self.launcher.logs()

    def _control(self, op: str) -> dict:
        return self.launcher.control(op)

    # -- the master console's instructions ------------------------------------------------
    def create(self) -> None:
        """Start holderd, the backup process."""
        holderd = self.launcher.holderd
        if holderd and holderd.poll() is None:
            self.say("holderd runs already")
            return
        holderd = self.launcher.start_holderd()
        self.say(f"holderd started (pid {holderd.pid}), socket {self.launcher.holder_socket}")

    def start_chatd(self, restore: bool = False) -> None:
        """Start chatd: fresh, or (restore=True) waiting for `restore` to take its sockets back."""
        if self.chatd and self.chatd.poll() is None:
            raise story_failed(f"chatd runs already (pid {self.chatd.pid})")
        self.launcher.start_chatd(*(["--restore", "--wait"] if restore else []), wait=False)
        status = self.launcher.wait_chatd()
        self.awaiting_restore = restore
        mode = "in restore mode, waiting for `restore`" if restore else f"on port {self.port}"
        self.say(f"chatd started (pid {status['pid']}) {mode}")

    def start_clients(self) -> None:
        for nick, other in (("C1", "C2"), ("C2", "C1")):
            self.clients[nick] = ClientProcess(nick, other, self.port, self.launcher.env, self.echo)
        for nick, other in (("C1", "C2"), ("C2", "C1")):
            client = self.clients[nick]
            wait_until(lambda: f"[{nick}] < PAIRED {other}" in client.snapshot(), 10, f"{nick} to pair")
        self.say(
            "C1 and C2 connected and paired (local ports "
            f"{self.clients['C1'].local_port} and {self.clients['C2'].local_port})"
        )

    def serving(self) -> bool:
        return self.chatd is not None and self.chatd.poll() is None and not self.awaiting_restore

    def send(self, sender: str, receiver: str) -> str | None:
        """``1to2``: the sender types a message; while chatd serves, until the receiver shows it."""
        for nick in (sender, receiver):
            gone = self.clients[nick].connection_gone()
            if gone:
                raise story_failed(f"nothing sent: {gone}; chatd died with nothing keeping its sockets. "
                                   "Type exit, and start `chatctl shell` again to begin anew")
        self.sent += 1
        text = f"message {self.sent} from {sender}"
        before = len(self.clients[receiver].messages())
        self.clients[sender].type(text)
        if not self.serving():
            why = "chatd is down" if self.chatd is None or self.chatd.poll() is not None else "chatd awaits `restore`"
            self.say(f"{sender} sent {text!r} ({why}: it waits in the kernel, on the connection holderd keeps)")
            return None
        return self.expect(receiver, text, before)

    def expect(self, receiver: str, text: str, before: int) -> str:
        client = self.clients[receiver]
        arrived = wait_until(
            lambda: next((m for m in client.messages()[before:] if m.endswith(" " + text)), None),
            10,
            f"{receiver} to receive {text!r}",
        )
        self.say(f"{receiver} received: {arrived.split('] ', 1)[1]}")
        return arrived

    def backup(self) -> bool:
        """``backup``: says what each holder answered it keeps; True if one keeps everything."""
        lines, backed_up = backup_report(self._control("backup"))
        if not self._holderd_runs():
            lines.append("(no holderd runs here: type create, then backup)")
        self.say("backup: " + lines[0])
        for line in lines[1:]:
            self.echo(line)
        return backed_up

    def _holderd_runs(self) -> bool:
        return self.launcher.holderd is not None and self.launcher.holderd.poll() is None

    def held_by_holderd(self) -> list[str]:
        """The names holderd answers it keeps for chatd (none if no holderd runs)."""
        if not self._holderd_runs():
            return []
        with HolderClient(self.launcher.holder_socket, timeout=5) as holder:
            return sorted(item["name"] for item in holder.list("chatd/"))

    def crash(self) -> None:
        """chatd dies of SIGSEGV; then whether its sockets live on in holderd, or the clients got EOF."""
        pid = self.chatd.pid
        self.crashed_at = time.monotonic()
        self._control("crash")
        code = self.chatd.wait(10)
        if code != -signal.SIGSEGV:
            raise story_failed(f"chatd (pid {pid}) ended with {code}, not SIGSEGV")
        held = self.held_by_holderd()
        if any(name.startswith("chatd/bundle/") for name in held) and "chatd/listen" in held:
            self.say(f"chatd (pid {pid}) died of SIGSEGV; holderd keeps its {plural(len(held), 'fd')}: "
                     "the clients' connections stay open")
            return
        self.say(f"chatd (pid {pid}) died of SIGSEGV, and nothing kept its client sockets "
                 f"({'no holderd runs' if not self._holderd_runs() else 'holderd keeps ' + plural(len(held), 'fd')})")
        for client in self.clients.values():
            wait_until(client.connection_gone, 10, f"{client.nick} to see its connection end")
        self.say("C1's and C2's connections are gone (both got EOF): nothing can be restored for them")

    def restore(self) -> None:
        try:
            reply = self._control("restore")
        except Error as exc:
            if exc.code != "nothing-held":
                raise
            raise story_failed("nothing to restore: no holder kept chatd's sockets when it died. "
                               "Type exit, and start `chatctl shell` again to begin anew") from None
        self.awaiting_restore = False
        if self.crashed_at is not None:
            self.gap_ms = (time.monotonic() - self.crashed_at) * 1000
        self.say(
            f"restore: {plural(reply['clients'], 'client')} and {plural(reply['pairs'], 'pair')} back on port "
            f"{reply['port']} in {reply['milliseconds']} ms"
        )

    def check_connections(self) -> None:
        """The same two TCP connections: neither client saw EOF, chatd sees their ports."""
        for client in self.clients.values():
            if client.saw_eof():
                raise story_failed(f"{client.nick} saw its connection close")
            if client.proc.poll() is not None:
                raise story_failed(f"{client.nick} exited")
        remote_ports = {int(row["remote"].rsplit(":", 1)[1]) for row in self._control("clients")["clients"]}
        for client in self.clients.values():
            if client.local_port not in remote_ports:
                raise story_failed(f"chatd does not serve {client.nick}'s connection (port {client.local_port})")
        self.say(
            "same connections: C1 on port %d and C2 on port %d, no EOF, chatd serves both"
            % (self.clients["C1"].local_port, self.clients["C2"].local_port)
        )

    def check_numbering(self) -> None:
        """Each client's k-th message carries n = k: the count went on across the crash."""
        for client in self.clients.values():
            for k, line in enumerate(client.messages(), 1):
                n = int(line.split()[4])
                if n != k:
                    raise story_failed(f"{client.nick}'s message #{k} arrived numbered {n}: {line}")
        self.say("numbering: every message arrived once, in order, n = 1, 2, 3 … on both sides")

    def close(self) -> None:
        for client in self.clients.values():
            client.stop()
        self.launcher.close()


def play_demo(echo=print) -> int:
    """The whole story, non-interactively. 0 only if the same connections carry messages after."""
    story = Story(echo)
    try:
        story.say(f"scratch directory {story.workdir}")
        story.create()
        story.start_chatd()
        story.start_clients()
        story.send("C1", "C2")
        story.send("C2", "C1")
        if not story.backup():
            raise story_failed("the backup was not kept whole")
        story.crash()
        story.send("C1", "C2")  # chatd is down: it waits in the kernel
        story.start_chatd(restore=True)
        story.restore()
        story.expect("C2", f"message {story.sent} from C1", 1)
        story.send("C2", "C1")
        story.send("C1", "C2")
        story.check_connections()
        story.check_numbering()
        numbers = {nick: len(c.messages()) for nick, c in story.clients.items()}
        story.say(
            f"PASS: C1 received {numbers['C1']} messages, C2 {numbers['C2']}, "
            f"crash to restored: {story.gap_ms:.0f} ms (chatd restart included)"
        )
        return 0
    except (Error, OSError) as exc:
        story.say(f"FAIL: {exc}")
        echo(story.logs())
        return 1
    finally:
        story.close()
