"""Small helpers the tests share (not part of the product)."""

from __future__ import annotations

import os
import random
import socket


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range (32768 and up),
    so that no client's outgoing connection can take it in the meantime."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32768")


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) pair of TCP sockets on loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return client, server


def offline_wheels(directory) -> None:
    """Wheels of everything installing this checkout needs (its dependencies and its build
    backend), so that a container or VM can install it with no network: provision --wheels."""
    import glob
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--use-pep517", "--disable-pip-version-check",
                    "-w", str(directory), str(root), "setuptools", "wheel"], check=True, timeout=900)
    for own in glob.glob(os.path.join(str(directory), "process_backup-*.whl")):
        os.remove(own)  # provision builds the checkout itself
