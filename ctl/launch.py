"""Starting holderd and chatd as child processes, and ending every one of them.

Theory of operation
-------------------
One launcher for everything that runs the daemons as real processes: the demo
and the master console (:mod:`ctl.story`), the process tests, and the
benchmarks. A :class:`Launcher` owns one working directory: the sockets
(``holderd.sock``, ``control.sock``) and one log file per process started
(``holderd-0.log``, ``chatd-1.log`` …) live there, so nothing needs root and two
launchers never meet. Children run this same Python and import this same
checkout, installed or not.

chatd is started on ``--port 0`` and ``--http-port 0``: the kernel picks free
ports (no race with other programs), and the launcher learns them from chatd's
status; a restored chatd keeps the same listening sockets, so the ports stay.
Where this Python lacks h11 or wsproto (the demo from a bare checkout), chatd
gets ``--http-port -1`` and serves the line protocol alone.

:meth:`Launcher.close` ends every process it started (SIGTERM, then
SIGKILL after a grace period) and removes a directory it made itself.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from chatd.protocols import web_unavailable
from fdkeep.errors import Error
from holderd.client import HolderClient

from . import control
from .children import stop

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """``predicate()``'s first true value; Error ``timeout`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Error("timeout", f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_for_answer(proc: subprocess.Popen, ask, timeout: float, what: str):
    """Wait until ``ask()`` answers instead of raising Error ``unavailable``; fail if ``proc`` exits first."""

    def answers():
        if proc.poll() is not None:
            raise Error("exited", f"{what} exited with status {proc.returncode}")
        try:
            return ask()
        except Error as exc:
            if exc.code != "unavailable":
                raise
            return None

    return wait_until(answers, timeout, f"{what} to answer")


class Launcher:
    def __init__(self, workdir: str | None = None, env: dict | None = None, prefix: tuple[str, ...] = ()):
        self._own_workdir = workdir is None
        #: Put before every command started: e.g. ``nsenter --net=/run/netns/NAME``, so that the
        #: daemons run in a network namespace (testkit.partition); it must exec, keeping the pid.
        self.prefix = tuple(prefix)
        self.workdir = workdir or tempfile.mkdtemp(prefix="process-backup-")
        self.holder_socket = os.path.join(self.workdir, "holderd.sock")
        self.control_socket = os.path.join(self.workdir, "control.sock")
        python_path = os.pathsep.join(filter(None, [SOURCE_ROOT, os.environ.get("PYTHONPATH")]))
        self.env = {
            **(env if env is not None else os.environ),
            "HOLDERD_SOCKET": self.holder_socket,
            "CHATD_CONTROL": self.control_socket,
            "PYTHONPATH": python_path,
        }
        self.started: list[subprocess.Popen] = []
        self._log_paths: dict[subprocess.Popen, str] = {}
        self.holderd: subprocess.Popen | None = None
        self.chatd: subprocess.Popen | None = None
        self.port: int | None = None
        self.http_port: int | None = None

    def spawn(self, name: str, *argv: str, env: dict | None = None, fd_limit: int | None = None) -> subprocess.Popen:
        """``python -m ARGV…`` with its output in ``NAME-<n>.log``; ``env`` adds to the environment;
        ``fd_limit`` sets its RLIMIT_NOFILE, soft and hard (tests of running out of fds)."""
        log_path = os.path.join(self.workdir, f"{name}-{len(self.started)}.log")
        log = open(log_path, "w")

        def limit_fds():
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

        with log:
            proc = subprocess.Popen([*self.prefix, sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT,
                                    env={**self.env, **(env or {})}, cwd=self.workdir,
                                    preexec_fn=limit_fds if fd_limit else None)
        self.started.append(proc)
        self._log_paths[proc] = log_path
        return proc

    def log_path(self, proc: subprocess.Popen) -> str:
        """The log file of ``proc``, one of the processes started here."""
        return self._log_paths[proc]

    def start_holderd(self, *extra: str, wait: bool = True, env: dict | None = None,
                      fd_limit: int | None = None) -> subprocess.Popen:
        self.holderd = self.spawn("holderd", "holderd.daemon", "--socket", self.holder_socket, *extra, env=env,
                                  fd_limit=fd_limit)
        if wait:
            wait_for_answer(self.holderd, self.ping_holderd, 10, "holderd")
        return self.holderd

    def ping_holderd(self) -> dict:
        with HolderClient(self.holder_socket, timeout=1) as holder:
            return holder.ping()

    def start_chatd(self, *extra: str, wait: bool = True, env: dict | None = None,
                    fd_limit: int | None = None) -> subprocess.Popen:
        """chatd on this launcher's port (a free one the first time); with ``wait``, until it answers."""
        self.chatd = self.spawn(
            "chatd", "chatd", "--port", str(self.port or 0), "--http-port", str(self.web_port()),
            "--control", self.control_socket, "--holder", self.holder_socket, *extra, env=env, fd_limit=fd_limit,
        )
        if wait:
            self.wait_chatd()
        return self.chatd

    def web_port(self) -> int:
        """The web port to ask chatd for: the one it had, 0 (a free one) the first time, -1 (none)
        where this Python lacks the web chat's libraries (the demo from a bare checkout)."""
        if web_unavailable():
            return -1
        return self.http_port or 0

    def wait_chatd(self, timeout: float = 15) -> dict:
        """chatd's status once it answers; learns its port."""
        status = wait_for_answer(self.chatd, lambda: self.control("status"), timeout, "chatd")
        if status.get("port"):
            self.port = status["port"]
        if status.get("http_port"):
            self.http_port = status["http_port"]
        return status

    def control(self, op: str) -> dict:
        return control.call(op, self.control_socket)

    def logs(self) -> str:
        """Every process's log, each under a header line."""
        parts = []
        for name in sorted(os.listdir(self.workdir)):
            if name.endswith(".log"):
                with open(os.path.join(self.workdir, name), errors="replace") as f:
                    parts.append(f"--- {name}\n{f.read()}")
        return "\n".join(parts)

    def close(self) -> None:
        """End every process started here; remove the directory if this launcher made it."""
        stop(self.started)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
