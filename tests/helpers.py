"""Small helpers the tests share (not part of the product)."""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: A release's heading in CHANGELOG.md: ``## 0.1.0 (commit 0f01ab1)``, ``## 0.2.0 (this commit)``.
RELEASE = re.compile(r"^## (\d+\.\d+\.\d+) \((this commit|commit ([0-9a-f]{7,40}))\)$", re.M)


def is_open(fd: int) -> bool:
    """Whether ``fd`` is an open descriptor of this process."""
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
                    "-w", str(directory), f"{root}[cluster]", "setuptools", "wheel"], check=True, timeout=900)
    for own in glob.glob(os.path.join(str(directory), "process_backup-*.whl")):
        os.remove(own)  # provision builds the checkout itself


def skip_or_fail(reason: str, tests: str) -> None:
    """Skip where a test lacks what it needs (``reason``); under CI (CI=true: scripts/test installs
    all of it) fail instead, so that CI never passes by skipping ``tests``."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true, so {tests} must not be skipped")
    pytest.skip(reason)


def needs_root_to_act_as_another_uid() -> None:
    if os.geteuid() != 0:
        skip_or_fail("needs root to act as another uid", "the tests as another uid")


class OtherUser:
    """Another uid running our client code: ``create`` makes a real user for the test
    (``useradd``, gone again at :meth:`close`), else an existing uid (``nobody``).
    Its scripts run under the system's python with a private copy of the client
    packages in a world-readable directory (root's home, and a venv in it, is mode
    700 on Debian), through ``runuser`` for a made user. Sockets the daemons should
    let it reach go in :attr:`directory`."""

    def __init__(self, create: bool = False, uid: int = 65534, packages=("fdkeep", "holderd")):
        import shutil
        import subprocess
        import tempfile

        from ctl.launch import SOURCE_ROOT

        self.name = None
        if create:
            self.name = f"pbtest{os.getpid()}x{random.randrange(10 ** 6)}"
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", self.name],
                           check=True, capture_output=True, timeout=30)
            import pwd

            uid = pwd.getpwnam(self.name).pw_uid
        self.uid = uid
        self.directory = tempfile.mkdtemp(prefix="other-user-")
        os.chmod(self.directory, 0o755)
        for package in packages:
            shutil.copytree(os.path.join(SOURCE_ROOT, package), os.path.join(self.directory, "lib", package),
                            ignore=shutil.ignore_patterns("__pycache__"))
        for root, dirs, files in os.walk(self.directory):
            for name in dirs + files:
                os.chmod(os.path.join(root, name), 0o755)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def run(self, script: str, **values) -> str:
        """Run ``script`` (``{name!r}`` fields filled from ``values``) as this user; its stdout."""
        import subprocess

        code = f"import sys\nsys.path.insert(0, {os.path.join(self.directory, 'lib')!r})\n" + script.format(**values)
        python = ["/usr/bin/python3", "-I", "-c", code]
        if self.name is not None:
            out = subprocess.run(["runuser", "-u", self.name, "--", *python], capture_output=True, text=True,
                                 timeout=30, cwd=self.directory)
        else:
            out = subprocess.run(python, user=self.uid, capture_output=True, text=True, timeout=30,
                                 cwd=self.directory)
        assert out.returncode == 0, out.stderr
        return out.stdout

    def close(self) -> None:
        import shutil
        import subprocess

        shutil.rmtree(self.directory, ignore_errors=True)
        if self.name is not None:
            subprocess.run(["userdel", self.name], capture_output=True, timeout=30)
            self.name = None


def require_nats() -> None:
    """Skip where nats-server or nats-py is missing; under CI, fail instead: they must run."""
    from ctl.hosts import missing_for_cluster

    missing = missing_for_cluster()
    if missing:
        skip_or_fail(f"needs {missing}", "the cluster tests")


def require_haproxy() -> None:
    """Skip where haproxy is missing; under CI, fail instead: scripts/test installs it."""
    from ctl.haproxy import missing_haproxy

    missing = missing_haproxy()
    if missing:
        skip_or_fail(f"needs {missing}", "the HAProxy tests")


def previous_release(into: Path, parts: tuple[str, ...] = ("chatd", "fdkeep", "holderd")) -> tuple[str, Path]:
    """(version, tree) of the release CHANGELOG.md names before this one, out of git history
    (its ``parts``, extracted into ``into``: run chatd, fdkeep and holderd with PYTHONPATH=tree;
    ``parts=()`` extracts its whole tree, to install it as it was, scripts and units included).
    Fails, never skips, where the history lacks it: the upgrade tests must run in CI."""
    import pytest

    releases = list(RELEASE.finditer((ROOT / "CHANGELOG.md").read_text()))
    assert len(releases) >= 2, "CHANGELOG.md names no release before this one"
    version, commit = releases[1].group(1), releases[1].group(3)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, *parts],
                             capture_output=True, timeout=60)
    if archive.returncode != 0:
        pytest.fail(f"the previous release ({version}, commit {commit}) is not in this checkout's git history: "
                    f"{archive.stderr.decode(errors='replace').strip()} (a shallow clone? fetch its history)")
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    return version, into


def line_client(port: int, nick: str | None = None, pair: str | None = None, timeout: float = 5.0):
    """A line client of chatd on ``port``, named and paired if asked (each answer checked)."""
    from ctl.probe import LineClient

    client = LineClient(port, timeout=timeout)
    if nick:
        client.send(f"NICK {nick}")
        assert client.line() == f"OK NICK {nick}"
    if pair:
        client.send(f"PAIR {pair}")
        assert client.line() == f"OK PAIR {pair}"
    return client


def serving_pid(procs) -> int | None:
    """The pid of the chatd answering at ``procs``' well-known control socket as the one serving
    (any release: 0.1.0's status has a role too); None if none answers so."""
    from ctl import control
    from fdkeep.errors import Error

    try:
        status = control.call("status", procs.control_socket, timeout=2)
    except Error:
        return None
    return status["pid"] if status.get("role") == "serving" else None


class RunningHolderd:
    """A real Holderd in this process, its loop run on a thread until :meth:`stop` (twice is fine)."""

    def __init__(self, path: str):
        import threading

        from holderd.daemon import Holderd
        from holderd.protocol import Limits

        self.path = path
        self.daemon = Holderd(path, {os.geteuid()}, Limits(), 1 << 20)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            self.daemon.loop.run_once(0.02)

    def stop(self):
        if not self.stopping.is_set():
            self.stopping.set()
            self.thread.join(5)
            self.daemon.close()


def lease_granted(lease, timeout: float = 5) -> bool:
    """Whether holderd grants ``lease`` (a holderd.client.Lease waiting in line) within ``timeout``."""
    import select

    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        select.select([lease.fileno()], [], [], left)
        answer = lease.poll()
        if answer is not None:
            return answer == "granted"
    return False
