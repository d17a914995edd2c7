"""Boot a real systemd in a throw-away container and drive it from a test.

Theory of operation
-------------------
The host runs systemd but not as PID 1, so units cannot be tested on the host
itself.  Instead :class:`BootedSystemd` boots the host's own installation in a
``systemd-nspawn`` container:

* ``systemd-nspawn`` refuses ``-D /``, so ``/`` is first bind-mounted
  read-only on an empty temporary directory.  That mount is made inside a
  private mount namespace (``unshare --mount --propagation private``) which only
  the nspawn process lives in; it therefore never appears on the host and
  vanishes by itself when nspawn exits, however nspawn exits.
* ``--volatile=yes`` gives the container a fresh tmpfs as ``/`` (so ``/etc``,
  ``/var``, ``/root`` and ``/tmp`` start empty and writable) with only the host's
  ``/usr`` mounted read-only.  Units go to ``/etc/systemd/system``.
* ``--register=no --keep-unit`` keep nspawn away from the (absent) host
  systemd.  Without machined, the container is driven with
  ``nsenter -t <PID 1> -a``: its PID 1 is the child of the nspawn process
  whose innermost PID (``NSpid``) is 1.
* There is no private network: services in the container listen on the host's
  network namespace, so host-side clients reach them on ``127.0.0.1``.
* Host paths listed in ``binds`` appear at the same path in the container
  (read-only unless prefixed with ``rw:``), e.g. a temp dir holding scripts, or
  a virtualenv made from ``/usr/bin/python3``.

Clean-up is layered so that neither containers nor mounts outlive the test:
``__exit__`` (and :meth:`BootedSystemd.close`) powers the container off, waits a
bounded time, then SIGKILLs nspawn and the container's PID 1 and removes the
temporary directory.  The same :meth:`close` runs from an ``atexit`` hook for
containers still alive at interpreter exit (e.g. after Ctrl-C).  If the test
process dies without running Python code at all (SIGKILL), nspawn gets SIGTERM
as its parent-death signal (``setpriv --pdeathsig``), which makes it shut the
container down cleanly; only an empty temporary directory can remain.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping

__all__ = ["BootError", "BootedSystemd", "CommandFailed", "machine_can_boot_containers"]

#: Environment every command run inside the container starts from (the host's
#: environment, e.g. a pyenv ``PATH``, is meaningless in there).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "SYSTEMD_COLORS": "0",
}

_REQUIRED_TOOLS = ("systemd-nspawn", "nsenter", "unshare", "setpriv", "mount")
_CAP_SYS_ADMIN = 21
_LOG_TAIL_CHARS = 20_000

#: Paths that must not be bound: the container mounts or populates its own.
#: Binding them would not only be useless but dangerous: at boot the
#: container's systemd-tmpfiles empties /tmp, and with a read-write bind of
#: /tmp it empties the host's /tmp.  Binds *below* such paths are fine
#: (systemd-tmpfiles does not descend into mount points).
_UNBINDABLE = frozenset({"/", "/boot", "/dev", "/etc", "/proc", "/run", "/sys",
                         "/tmp", "/usr", "/var", "/var/tmp"})
_UNBINDABLE_TREES = ("/dev/", "/proc/", "/run/", "/sys/")

_live: set[BootedSystemd] = set()


class BootError(RuntimeError):
    """The container did not reach a running (or degraded) state."""


class CommandFailed(subprocess.CalledProcessError):
    """A command in the container exited non-zero; ``str()`` shows its output."""

    def __str__(self) -> str:
        return (
            f"{super().__str__()}\n"
            f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}"
        )


def machine_can_boot_containers() -> tuple[bool, str]:
    """Tell whether this machine can run :class:`BootedSystemd` at all.

    Returns ``(True, "")`` or ``(False, reason)``.  Only static prerequisites are
    checked (privileges, tools, cgroups); a broken setup still fails at boot.
    """
    if os.geteuid() != 0:
        return False, "booting a container needs root"
    with open("/proc/self/status") as status:
        cap_eff = next(int(line.split()[1], 16) for line in status if line.startswith("CapEff:"))
    if not cap_eff >> _CAP_SYS_ADMIN & 1:
        return False, "CAP_SYS_ADMIN is missing (unprivileged container?)"
    missing = [tool for tool in _REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)} (apt-get install systemd-container)"
    if not os.access("/lib/systemd/systemd", os.X_OK):
        return False, "/lib/systemd/systemd is not installed"
    cgroup_mounts = _cgroup_mounts()
    if cgroup_mounts.get("/sys/fs/cgroup") != "cgroup2" and "/sys/fs/cgroup/systemd" not in cgroup_mounts:
        return False, "neither a cgroup2 nor a name=systemd hierarchy is mounted on /sys/fs/cgroup"
    if not any(os.access(path, os.W_OK) for path in cgroup_mounts):
        return False, "the cgroup file systems are read-only"
    return True, ""


def _cgroup_mounts() -> dict[str, str]:
    """Map mount points under /sys/fs/cgroup to their file system type."""
    mounts = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            mount_point = fields[4]
            fs_type = fields[fields.index("-") + 1]
            if mount_point.startswith("/sys/fs/cgroup") and fs_type.startswith("cgroup"):
                mounts[mount_point] = fs_type
    return mounts


def _escape_bind_path(path: str) -> str:
    """Escape a path for nspawn's ``--bind`` syntax, where ``:`` separates fields."""
    return path.replace("\\", "\\\\").replace(":", "\\:")


class BootedSystemd:
    """A systemd booted in an nspawn container; use it as a context manager.

    ``binds`` lists host paths to bind-mount at the same path in the container:
    a plain path (``str`` or ``os.PathLike``) is read-only, a string of the form
    ``"rw:/some/path"`` is read-write.  System directories such as ``/tmp`` or
    ``/run`` are refused (see ``_UNBINDABLE``); their subdirectories are fine.  ``name`` is the machine (host) name,
    random by default.  ``boot_timeout`` bounds the whole boot in seconds and
    ``shutdown_timeout`` how long a poweroff may take before nspawn is killed.

    After ``__enter__``, ``pid1`` is the host PID of the container's systemd,
    and ``boot_seconds`` (then, after ``__exit__``, ``shutdown_seconds``) how
    long booting (and shutting down) took.
    """

    def __init__(
        self,
        binds: Iterable[str | os.PathLike[str]] = (),
        name: str | None = None,
        boot_timeout: float = 60,
        shutdown_timeout: float = 30,
    ) -> None:
        self.name = name or f"booted-{secrets.token_hex(4)}"
        self.boot_timeout = boot_timeout
        self.shutdown_timeout = shutdown_timeout
        self._bind_args = [self._bind_arg(bind) for bind in binds]
        self.pid1: int | None = None
        self.boot_seconds: float | None = None
        self.shutdown_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None

    @staticmethod
    def _bind_arg(bind: str | os.PathLike[str]) -> str:
        path = os.fspath(bind)
        option = "--bind-ro"
        if path.startswith("rw:"):
            option, path = "--bind", path[len("rw:"):]
        if not os.path.isabs(path) or not os.path.exists(path):
            raise ValueError(f"bind {bind!r}: not an existing absolute path")
        real = os.path.realpath(path)
        if real in _UNBINDABLE or real.startswith(_UNBINDABLE_TREES):
            raise ValueError(f"bind {bind!r}: the container manages {real} itself")
        return f"{option}={_escape_bind_path(path)}"

    # -- life cycle ---------------------------------------------------------

    def __enter__(self) -> BootedSystemd:
        started = time.monotonic()
        _live.add(self)
        try:
            self._boot(deadline=started + self.boot_timeout)
        except BaseException:
            self.close()
            raise
        self.boot_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def console_output(self) -> str:
        """The end of nspawn's output so far (boot messages, shutdown, errors)."""
        if self._tmpdir is None:
            return ""
        with open(self._log_path(), errors="replace", newline="") as log:
            return log.read()[-_LOG_TAIL_CHARS:].replace("\r", "")

    def _log_path(self) -> str:
        assert self._tmpdir is not None
        return os.path.join(self._tmpdir, "console.log")

    def _boot(self, deadline: float) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix=f"{self.name}-")
        root = os.path.join(self._tmpdir, "root")
        os.mkdir(root)
        nspawn = [
            "systemd-nspawn", f"--directory={root}", "--volatile=yes", "--boot",
            "--register=no", "--keep-unit", "--console=read-only",
            f"--machine={self.name}", *self._bind_args,
            "--", "systemd.firstboot=off", "systemd.log_color=0",
        ]
        command = [
            "setpriv", "--pdeathsig=TERM", "--",
            "unshare", "--mount", "--propagation=private", "--",
            "sh", "-euc", 'mount --bind -o ro / "$0"; exec "$@"', root, *nspawn,
        ]
        with open(self._log_path(), "wb") as log:
            self._proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "SYSTEMD_COLORS": "0"}, start_new_session=True,
            )
        self.pid1 = self._wait_for_pid1(deadline)
        self._wait_until_running(deadline)

    def _check_nspawn_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise BootError(
                f"systemd-nspawn exited with status {self._proc.returncode} while booting "
                f"{self.name}; its output:\n{self.console_output()}"
            )

    def _check_deadline(self, deadline: float, waiting_for: str) -> None:
        if time.monotonic() > deadline:
            raise BootError(
                f"timed out after {self.boot_timeout} s waiting for {waiting_for} of "
                f"{self.name}; nspawn output:\n{self.console_output()}"
            )

    def _wait_for_pid1(self, deadline: float) -> int:
        """Wait for the nspawn child that is PID 1 of its namespace to exec systemd."""
        while True:
            self._check_nspawn_alive()
            pid = self._container_init_pid()
            if pid is not None and _proc_status(pid).get("Name") == "systemd":
                return pid
            self._check_deadline(deadline, "the container's PID 1")
            time.sleep(0.05)

    def _container_init_pid(self) -> int | None:
        """Host PID of the container's PID 1, if nspawn has started it."""
        assert self._proc is not None
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                status = _proc_status(int(entry))
                if status.get("PPid") == str(self._proc.pid) and status.get("NSpid", "").endswith("\t1"):
                    return int(entry)
        return None

    def _wait_until_running(self, deadline: float) -> None:
        """Poll ``systemctl is-system-running --wait`` until boot has finished."""
        state = ""
        while True:
            self._check_nspawn_alive()
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                result = self.run("systemctl", "is-system-running", "--wait",
                                  check=False, timeout=remaining)
            except subprocess.TimeoutExpired:
                result = None
            if result is not None:
                state = result.stdout.strip()
                if state in ("running", "degraded"):
                    return
                if state in ("maintenance", "stopping"):
                    raise BootError(
                        f"{self.name} is {state!r} after boot; nspawn output:\n"
                        f"{self.console_output()}"
                    )
            # Otherwise PID 1 has not yet created /run/systemd/system (systemctl
            # says "offline") or its bus socket: try again.
            self._check_deadline(deadline, f"the system to run (last state {state!r})")
            time.sleep(0.1)

    def close(self) -> None:
        """Power off, kill what is left, remove temporary files.  Idempotent."""
        started = time.monotonic()
        try:
            if self._proc is not None and self._proc.poll() is None:
                self._shut_down()
                self.shutdown_seconds = time.monotonic() - started
        finally:
            self._remove_tmpdir()
            _live.discard(self)

    def _shut_down(self) -> None:
        assert self._proc is not None
        if self.pid1 is None:
            self.pid1 = self._container_init_pid()
        try:
            if self.pid1 is None:
                raise subprocess.SubprocessError("PID 1 not found")
            self.run("systemctl", "poweroff", timeout=10)
        except subprocess.SubprocessError:
            # No usable manager: nspawn turns SIGTERM into an orderly shutdown.
            self._proc.terminate()
        try:
            self._proc.wait(self.shutdown_timeout)
        except subprocess.TimeoutExpired:
            # SIGKILL the container's PID 1 (its whole PID namespace dies with
            # it) while it is still nspawn's child, so that its PID cannot have
            # been reused; nspawn then reaps it and exits, cleaning up after
            # itself.  Only if it does not is nspawn killed too.
            pid1 = self._container_init_pid()
            if pid1 is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid1, signal.SIGKILL)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def _remove_tmpdir(self) -> None:
        """Remove our temporary directory and what a killed nspawn leaves behind.

        Entries are removed one by one, never with ``rm -r``: nothing is mounted
        on ``root`` in the host's mount namespace (see the module docstring), and
        were it otherwise, ``rmdir`` would fail rather than descend into ``/``.
        """
        tmpdir, self._tmpdir = self._tmpdir, None
        if tmpdir is None:
            return
        # The console log and nspawn's image lock file ".#root.lck".
        for entry in os.scandir(tmpdir):
            if entry.is_dir(follow_symlinks=False):
                os.rmdir(entry.path)
            else:
                os.unlink(entry.path)
        os.rmdir(tmpdir)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.name}")

    # -- driving the container ---------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the container's namespaces; output is captured as text.

        The command gets :data:`BASE_ENV` updated with ``env``, not the host's
        environment.  With ``check``, a non-zero exit raises
        :class:`CommandFailed`, which shows stdout and stderr.
        """
        assert self.pid1 is not None, "container is not running"
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            input=input, capture_output=True, text=True, timeout=timeout,
            env={**BASE_ENV, **(env or {})},
        )
        if check and result.returncode != 0:
            raise CommandFailed(result.returncode, argv, result.stdout, result.stderr)
        return result

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``systemctl ARGS...`` in the container."""
        return self.run("systemctl", *args, check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """The value of one property of ``unit`` (``systemctl show -p PROP --value``)."""
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.rstrip("\n")

    def journal(self, unit: str, since: str | None = None) -> str:
        """The journal of ``unit``; ``since`` takes any ``journalctl --since`` value."""
        argv = ["journalctl", "-u", unit, "--no-pager", "-o", "short-precise"]
        if since is not None:
            argv += ["--since", since]
        return self.run(*argv).stdout

    def journal_entries(self, unit: str, since: str | None = None) -> list[tuple[float, str, str]]:
        """The journal of ``unit`` (or of a pattern, ``chatd@*``) as (seconds, unit, message), in order.

        Each entry is placed at the time it was made where the journal knows it (systemd's own
        lines carry it), else when the journal received it (a service's stdout); the unit is
        the one a line is about, without ``.service`` (PID 1's lines name it in ``UNIT=``)."""
        argv = ["journalctl", "-u", unit, "-o", "json", "--no-pager"]
        if since is not None:
            argv += ["--since", since]
        entries = []
        for line in self.run(*argv).stdout.splitlines():
            entry = json.loads(line)
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):  # not UTF-8: the journal gives the bytes
                message = bytes(message).decode(errors="replace")
            stamp = int(entry.get("_SOURCE_REALTIME_TIMESTAMP") or entry["__REALTIME_TIMESTAMP"]) / 1e6
            about = (entry.get("UNIT") or entry.get("_SYSTEMD_UNIT", "")).removesuffix(".service")
            entries.append((stamp, about, message))
        return sorted(entries)

    def install_unit(self, name: str, text: str) -> None:
        """Write ``/etc/systemd/system/NAME`` in the container and reload systemd."""
        if "/" in name:
            raise ValueError(f"unit name {name!r} contains a slash")
        self.run("sh", "-c", 'cat > "$1"', "sh", f"/etc/systemd/system/{name}", input=text)
        self.systemctl("daemon-reload")


def _proc_status(pid: int) -> dict[str, str]:
    """The fields of ``/proc/PID/status`` (empty if the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            lines = status.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict((key, value.strip()) for key, _, value in (line.partition(":") for line in lines))


@atexit.register
def _close_leftovers() -> None:
    """Last resort for containers whose ``__exit__`` never ran."""
    for container in list(_live):
        container.close()
