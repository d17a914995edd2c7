"""``chatctl selftest``: prove on a running installation that a crash goes unnoticed.

Two probe clients connect to chatd, pair and chat; then chatd is crashed with a
real SIGSEGV (``chatctl crash``) and the probe waits for a *new* chatd process
(another pid) to serve the control socket: under systemd, ``Restart=`` starts
it and it restores itself. The same two connections must then carry messages
both ways with the counters going on, and neither may have seen EOF. Finally
both clients QUIT, so the self-test leaves nothing behind.
"""

from __future__ import annotations

import secrets
import time

from fdkeep.errors import Error
from fdkeep.text import plural

from . import control
from .probe import LineClient


class SelftestFailed(Exception):
    pass


def _expect(client: LineClient, wanted: str, what: str) -> None:
    """Read lines until ``wanted``; fail on EOF or after the client's timeout."""
    try:
        while True:
            line = client.line()
            if line == wanted:
                return
    except EOFError:
        raise SelftestFailed(f"{what}: chatd closed the connection (EOF) instead of sending {wanted!r}") from None
    except TimeoutError:
        raise SelftestFailed(f"{what}: {wanted!r} never arrived") from None


def _wait_for_serving(control_path: str, timeout: float, other_than: int | None = None) -> dict:
    """chatd's status once a chatd serves (one other than pid ``other_than``, after a crash)."""
    deadline = time.monotonic() + timeout
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            status = control.call("status", control_path)
            if status["pid"] != other_than and status["serving"]:
                return status
            if status.get("awaiting_restore"):
                raise SelftestFailed("chatd is not serving: it waits for `chatctl restore`")
            last_error = f"still pid {status['pid']}" if status["serving"] else "not serving yet"
        except Error as exc:
            last_error = exc.message
        time.sleep(0.01)
    if other_than is None:
        raise SelftestFailed(f"no chatd served within {timeout} s ({last_error})")
    raise SelftestFailed(f"no new chatd served within {timeout} s after the crash ({last_error}); "
                         "is it running under systemd with Restart=on-failure?")


def run(host: str, port: int | None, control_path: str, crash: bool = True, timeout: float = 30,
        echo=print) -> dict:
    """The self-test, on ``port``, or (None) on the port chatd reports serving."""
    began = time.monotonic()

    def step(text: str) -> None:
        echo(f"[{time.monotonic() - began:7.3f}s] {text}")

    status = _wait_for_serving(control_path, timeout)  # `systemctl start chatd` may have just returned
    port = port or status["port"]
    step(f"chatd pid {status['pid']} serves port {status['port']} with {plural(status['clients'], 'client')}"
         + (f"; probing port {port}" if port != status["port"] else ""))
    tag = secrets.token_hex(3)
    nicks = (f"selftest-{tag}-a", f"selftest-{tag}-b")
    clients = [LineClient(port, timeout=10, host=host) for _ in nicks]
    ports = [client.local_port for client in clients]
    try:
        for client, nick, other in ((clients[0], *nicks), (clients[1], *reversed(nicks))):
            client.send(f"NICK {nick}", f"PAIR {other}")
        for client, other in zip(clients, reversed(nicks)):
            _expect(client, f"PAIRED {other}", "pairing")
        step(f"{nicks[0]} (port {ports[0]}) and {nicks[1]} (port {ports[1]}) are paired")

        def chat(round_number: int) -> None:
            for sender, receiver, nick in ((clients[0], clients[1], nicks[0]), (clients[1], clients[0], nicks[1])):
                sender.send(f"MSG round {round_number}")
                _expect(receiver, f"FROM {nick} {round_number} round {round_number}", f"message {round_number}")
            step(f"message #{round_number} went both ways")

        chat(1)
        report = {"ok": True, "old_pid": status["pid"], "ports": ports}
        if crash:
            reply = control.call("crash", control_path)
            crashed_at = time.monotonic()
            step(f"chatd pid {reply['pid']} crashed with SIGSEGV")
            new = _wait_for_serving(control_path, timeout, other_than=status["pid"])
            gap_ms = round((time.monotonic() - crashed_at) * 1000, 1)
            step(f"new chatd pid {new['pid']} serves {plural(new['clients'], 'client')} after {gap_ms} ms")
            report.update(new_pid=new["pid"], gap_ms=gap_ms)
            chat(2)
            if [client.sock.getsockname()[1] for client in clients] != ports:
                raise SelftestFailed("the clients' local ports changed: these are not the same connections")
            step("same connections, no EOF, counters went on")
        for client in clients:
            client.send("QUIT")
            _expect(client, "BYE", "quitting")
        step("PASS")
        return report
    finally:
        for client in clients:
            client.close()
