"""``chatctl client``: a line-protocol client for people and for scripts.

It connects once and never reconnects, so what it prints tells the truth about
its one TCP connection: ``connected local-port=N`` when it starts, each line from
the server as it comes (messages numbered ``#1``, ``#2`` … as they arrive), and
``EOF`` if the server ever closes the connection. Each line typed is sent as a
message (``MSG <line>``); a line starting with ``/`` is a command (``/who``
sends ``WHO``); ``/port`` prints the local port again. The end of input sends
``QUIT``.
"""

from __future__ import annotations

import socket
import sys
import threading


def to_wire(typed: str) -> str:
    """``hello`` -> ``MSG hello``; ``/pair bob`` -> ``PAIR bob``."""
    if not typed.startswith("/"):
        return f"MSG {typed}"
    verb, space, rest = typed[1:].partition(" ")
    return verb.upper() + space + rest


def run(host: str, port: int, nick: str | None, pair: str | None, out=sys.stdout, inp=sys.stdin) -> int:
    prefix = f"[{nick}] " if nick else ""
    lock = threading.Lock()

    def say(text: str) -> None:
        with lock:
            out.write(prefix + text + "\n")
            out.flush()

    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        say(f"cannot connect to chatd at {host}:{port} ({exc.strerror or exc}); is chatd running there? "
            "(`chatctl status`; or pass --host/--port)")
        return 1
    sock.settimeout(None)
    local_port = sock.getsockname()[1]
    say(f"connected local-port={local_port}")
    ended = threading.Event()

    def receive() -> None:
        received = 0
        for raw in sock.makefile("rb"):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line.startswith("FROM "):
                received += 1
                say(f"#{received} {line}")
            else:
                say(f"< {line}")
        say("EOF")
        ended.set()

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    if nick:
        sock.sendall(f"NICK {nick}\n".encode())
    if pair:
        sock.sendall(f"PAIR {pair}\n".encode())
    try:
        for line in inp:
            line = line.rstrip("\n")
            if ended.is_set():
                break
            if line == "/port":
                say(f"local-port={local_port}")
                continue
            sock.sendall(to_wire(line).encode() + b"\n")
        else:
            sock.sendall(b"QUIT\n")
    except (OSError, KeyboardInterrupt):
        pass
    ended.wait(5)
    sock.close()
    return 0
