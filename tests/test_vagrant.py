"""The Vagrantfile: always validated; booted for real on request.

``vagrant validate -p`` (ignore provider config: Debian's vagrant alone has no
usable provider, so a plain ``validate`` fails with "No usable default
provider") parses the Vagrantfile and checks every setting and the
provisioner's script. It skips when the ``vagrant`` binary is missing, except
under CI (``CI=true``), where it fails: CI must run it.

``PROCESS_BACKUP_VAGRANT_UP=1`` also runs the real thing (root, about 6
minutes on 2 cores with plain emulation; Debian packages: vagrant
vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils dnsmasq-base
mmdebstrap extlinux syslinux-common fdisk): build a Debian 12 box offline
with ``scripts/build-vagrant-box``, start
virtlogd and libvirtd by hand in a private network namespace, ``vagrant up``
with the libvirt provider in plain emulation (``PROCESS_BACKUP_LIBVIRT_DRIVER=qemu``),
provisioning offline from wheels built here, and check that provisioning (with
``chatctl selftest``) passed and chatd answers through the forwarded port. The
VM, the box, the daemons and the namespace are removed afterwards, whatever
happened. It refuses to run beside a libvirtd it did not start. Its steps, with
their times, are printed (``pytest -s``) and the `vagrant up` output is shown on
failure.

Vagrant runs with ``VAGRANT_HOME`` and ``VAGRANT_DOTFILE_PATH`` in a temporary
directory, so nothing is left in the checkout or in ``~/.vagrant.d``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def running_under_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture
def vagrant() -> str:
    path = shutil.which("vagrant")
    if path is None:
        reason = "the vagrant binary is not installed (Debian: apt-get install vagrant)"
        if running_under_ci():
            pytest.fail(f"{reason}; CI=true, so this test must not be skipped")
        pytest.skip(reason)
    return path


def vagrant_env(tmp_path: Path, cwd: Path, **extra: str) -> dict[str, str]:
    """An environment that keeps all of Vagrant's files under tmp_path."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VAGRANT_", "PROCESS_BACKUP_"))}
    home = tmp_path / "vagrant-home"
    dotfiles = tmp_path / "vagrant-dotfiles"
    home.mkdir(exist_ok=True)
    dotfiles.mkdir(exist_ok=True)
    env.update(
        VAGRANT_CWD=str(cwd),
        VAGRANT_HOME=str(home),
        VAGRANT_DOTFILE_PATH=str(dotfiles),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_NO_COLOR="1",
    )
    env.update(extra)
    return env


def validate(vagrant: str, tmp_path: Path, cwd: Path = REPO, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [vagrant, "validate", "--ignore-provider"], cwd=cwd, env=vagrant_env(tmp_path, cwd, **extra),
        capture_output=True, text=True, timeout=180,
    )


def test_vagrantfile_validates(vagrant, tmp_path):
    had_dotdir = (REPO / ".vagrant").exists()
    result = validate(vagrant, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout, result.stdout + result.stderr
    assert (REPO / ".vagrant").exists() == had_dotdir, "vagrant left a .vagrant directory in the checkout"


def test_vagrantfile_validates_with_every_override(vagrant, tmp_path):
    result = validate(
        vagrant, tmp_path,
        PROCESS_BACKUP_BOX="local/process-backup-test",
        PROCESS_BACKUP_LIBVIRT_DRIVER="qemu",
        PROCESS_BACKUP_LIBVIRT_POOL="process-backup-test",
        PROCESS_BACKUP_HOST_PORT="15001",
        PROCESS_BACKUP_MEMORY="768",
        PROCESS_BACKUP_CPUS="1",
        PROCESS_BACKUP_PROVISION_ARGS="--wheels /vagrant/wheels --no-selftest",
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_catches_a_broken_vagrantfile(vagrant, tmp_path):
    """The check above is not vacuous: a wrong setting, or a missing provision script, fails it."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    text = (REPO / "Vagrantfile").read_text()
    assert "config.vm.hostname" in text

    (checkout / "Vagrantfile").write_text(text)
    missing_script = validate(vagrant, tmp_path, cwd=checkout)
    assert missing_script.returncode != 0
    assert "scripts/provision" in missing_script.stdout + missing_script.stderr

    shutil.copy2(REPO / "scripts" / "provision", checkout / "scripts" / "provision")
    assert validate(vagrant, tmp_path, cwd=checkout).returncode == 0

    (checkout / "Vagrantfile").write_text(text.replace("config.vm.hostname", "config.vm.hostnme"))
    wrong_setting = validate(vagrant, tmp_path, cwd=checkout)
    assert wrong_setting.returncode != 0
    assert "hostnme" in wrong_setting.stdout + wrong_setting.stderr


# --- the real thing: PROCESS_BACKUP_VAGRANT_UP=1 -------------------------------------------------

VAGRANT_UP = os.environ.get("PROCESS_BACKUP_VAGRANT_UP") == "1"
UP_PACKAGES = ("vagrant vagrant-libvirt libvirt-daemon-system qemu-system-x86 qemu-utils dnsmasq-base "
               "mmdebstrap extlinux syslinux-common fdisk e2fsprogs")
CHECKOUT_IGNORE = shutil.ignore_patterns(
    ".git", ".vagrant", ".venv", ".pytest_cache", "__pycache__", "*.egg-info", "build", "scratch")


class Sandbox:
    """virtlogd and libvirtd started here, in a network namespace of their own, and all they made.

    The namespace has no way out: the VM's network (vagrant-libvirt's management
    network, a NAT bridge) lives and dies in it, and so do Vagrant's ssh tunnel
    for the forwarded port and every check of it. Everything lives under one
    directory (which qemu, running as libvirt-qemu, must be able to traverse).
    """

    def __init__(self):
        self.work = Path(tempfile.mkdtemp(prefix="process-backup-vagrant-", dir="/var/tmp"))
        self.work.chmod(0o755)
        self.log_path = self.work / "steps.log"
        self.netns = f"pbvagrant{os.getpid()}"
        self.pool = f"process-backup-test-{os.getpid()}"
        self.daemons: list[subprocess.Popen] = []
        self.had_run_libvirt = Path("/run/libvirt").exists()
        self.networks_before: set[str] = set()
        self.domain_logs_before = set(os.listdir("/var/log/libvirt/qemu")) if os.path.isdir("/var/log/libvirt/qemu") else set()
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        print(line, flush=True)
        with open(self.log_path, "a") as log:
            log.write(line + "\n")

    def run(self, argv: list[str], timeout: float, env=None, netns: bool = False, check: bool = True,
            log_name: str | None = None) -> subprocess.CompletedProcess:
        if netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
        output = strip_progress(result.stdout + result.stderr)
        if log_name:
            (self.work / log_name).write_text(output)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{tail(output)}")
        result.output = output
        return result

    def run_noting(self, argv: list[str], timeout: float, env, milestones: tuple[str, ...],
                   log_name: str) -> subprocess.CompletedProcess:
        """Run in the namespace, logging each line with its time and noting the milestones."""
        argv = ["ip", "netns", "exec", self.netns, *argv]
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        watchdog.start()
        lines = []
        try:
            with open(self.work / log_name, "w") as log:
                for raw in proc.stdout:
                    line = strip_progress(raw.rstrip("\n"))
                    lines.append(line)
                    log.write(f"[{time.monotonic() - self.started:7.1f}s] {line}\n")
                    log.flush()
                    if any(milestone in line for milestone in milestones):
                        self.note("  " + line.strip())
            proc.wait()
        finally:
            watchdog.cancel()
        result = subprocess.CompletedProcess(argv, proc.returncode, "\n".join(lines), "")
        result.output = result.stdout
        return result

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["virsh", "-q", "-c", "qemu:///system", *args], timeout=120, check=check)

    def start(self) -> None:
        if self.virsh("version", check=False).returncode == 0 or Path("/run/libvirt/libvirt-sock").exists():
            raise AssertionError("a libvirtd is already running (or left its socket): this test starts and "
                                 "stops its own, so stop that one first")
        self.run(["ip", "netns", "add", self.netns], timeout=30)
        self.run(["ip", "link", "set", "lo", "up"], timeout=30, netns=True)
        for daemon in ("virtlogd", "libvirtd"):
            argv = ["ip", "netns", "exec", self.netns, daemon, "--pid-file", str(self.work / f"{daemon}.pid")]
            if daemon == "libvirtd" and Path("/dev/kvm").exists():
                # The guest runs in plain emulation anyway. Seen here: /dev/kvm (a PVM
                # hypervisor that cannot run a stock kernel) makes libvirtd re-probe
                # QEMU's capabilities at every lookup, 30 s for each domain defined.
                # Hidden behind an unusable file in a mount namespace of libvirtd's
                # own, the probe is cached and a define takes milliseconds; that
                # mount would break the private /dev libvirt makes for each guest,
                # so its qemu.conf there (a copy, bound over) turns that off.
                hide = self.work / "no-kvm"
                hide.touch(mode=0)
                qemu_conf = self.work / "qemu.conf"
                original = Path("/etc/libvirt/qemu.conf")
                qemu_conf.write_text((original.read_text() if original.exists() else "") + "\nnamespaces = []\n")
                argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /dev/kvm && mount --bind "$1" /etc/libvirt/qemu.conf && shift && exec "$@"',
                        str(hide), str(qemu_conf), *argv]
            log = open(self.work / f"{daemon}.log", "w")
            with log:
                self.daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True))
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline or any(d.poll() is not None for d in self.daemons):
                raise AssertionError("libvirtd did not answer: " + (self.work / "libvirtd.log").read_text()[-3000:])
            time.sleep(0.5)
        self.networks_before = set(self.virsh("net-list", "--all", "--name").stdout.split())
        (self.work / "pool").mkdir(mode=0o755)
        self.virsh("pool-create-as", self.pool, "dir", "--target", str(self.work / "pool"))
        self.note("virtlogd and libvirtd up in network namespace " + self.netns)

    def close(self, domain_prefix: str) -> None:
        """Remove all of it, whatever state it is in; each step on its own."""
        steps = [
            ("domains", lambda: self._remove_domains(domain_prefix)),
            ("networks", self._remove_networks),
            ("pool", self._remove_pool),
            ("daemons", self._stop_daemons),
            ("tunnels", self._kill_tunnels),
            ("netns", lambda: self.run(["ip", "netns", "delete", self.netns], timeout=30, check=False)),
            ("leftovers", lambda: self._remove_leftovers(domain_prefix)),
        ]
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning
                print(f"cleanup of {name} failed: {exc!r}", file=sys.stderr)
        shutil.rmtree(self.work, ignore_errors=True)

    def _remove_domains(self, prefix: str) -> None:
        for name in self.virsh("list", "--all", "--name", check=False).stdout.split():
            if name.startswith(prefix):
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--nvram", check=False)

    def _remove_networks(self) -> None:
        for name in self.virsh("net-list", "--name", check=False).stdout.split():
            self.virsh("net-destroy", name, check=False)  # our libvirtd started every active one
        for name in set(self.virsh("net-list", "--all", "--name", check=False).stdout.split()) - self.networks_before:
            self.virsh("net-undefine", name, check=False)

    def _remove_pool(self) -> None:
        for volume in self.virsh("vol-list", self.pool, check=False).stdout.splitlines():
            if volume.split():
                self.virsh("vol-delete", "--pool", self.pool, volume.split()[0], check=False)
        self.virsh("pool-destroy", self.pool, check=False)

    def _stop_daemons(self) -> None:
        for daemon in reversed(self.daemons):
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(20)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(10)

    def _kill_tunnels(self) -> None:
        """Vagrant's ssh port-forwarding processes, known by the key file under our directory."""
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if cmdline.startswith("ssh ") and str(self.work) in cmdline:
                os.kill(int(pid), signal.SIGTERM)

    def _remove_leftovers(self, prefix: str) -> None:
        logs = Path("/var/log/libvirt/qemu")
        if logs.is_dir():
            for name in set(os.listdir(logs)) - self.domain_logs_before:
                if name.startswith(prefix):
                    (logs / name).unlink(missing_ok=True)
        if not self.had_run_libvirt:
            shutil.rmtree("/run/libvirt", ignore_errors=True)


def strip_progress(text: str) -> str:
    """Vagrant's progress bars: keep the last state of each line."""
    text = text.replace("\x1b[K", "")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def missing_for_vagrant_up() -> list[str]:
    missing = [tool for tool in ("vagrant", "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img",
                                 "dnsmasq", "mmdebstrap", "extlinux", "sfdisk", "mkfs.ext4", "ip")
               if shutil.which(tool) is None]
    if not Path("/usr/lib/syslinux/mbr/mbr.bin").exists():
        missing.append("syslinux-common")
    if shutil.which("vagrant") and "vagrant-libvirt" not in subprocess.run(
            ["vagrant", "plugin", "list"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}).stdout:
        missing.append("vagrant-libvirt")
    return missing


@pytest.mark.skipif(not VAGRANT_UP, reason="a real `vagrant up` (minutes, root, libvirt): set PROCESS_BACKUP_VAGRANT_UP=1")
def test_vagrant_up_provisions_and_passes_the_selftest(vagrant):
    if os.geteuid() != 0:
        pytest.fail("PROCESS_BACKUP_VAGRANT_UP=1 needs root (it starts libvirtd and builds a box)")
    missing = missing_for_vagrant_up()
    if missing:
        pytest.fail(f"PROCESS_BACKUP_VAGRANT_UP=1 but {', '.join(missing)} missing: apt-get install {UP_PACKAGES}")

    sandbox = Sandbox()
    checkout = sandbox.work / f"checkout{os.getpid()}"  # vagrant-libvirt names the domain after it
    domain_prefix = checkout.name + "_"
    box_name = "local/process-backup-debian12"
    env = vagrant_env(
        sandbox.work, checkout,
        PROCESS_BACKUP_BOX=box_name,
        PROCESS_BACKUP_LIBVIRT_DRIVER="qemu",
        PROCESS_BACKUP_LIBVIRT_POOL=sandbox.pool,
        PROCESS_BACKUP_PROVISION_ARGS="--wheels /vagrant/wheels",
        PROCESS_BACKUP_HOST_PORT="5001",  # the namespace's own port space: free
    )
    destroyed = False
    try:
        sandbox.start()

        box = sandbox.work / "debian12.box"
        sandbox.run([str(REPO / "scripts" / "build-vagrant-box"), str(box)], timeout=900, log_name="box.log")
        sandbox.note(f"box built: {box.stat().st_size >> 20} MiB")

        shutil.copytree(REPO, checkout, ignore=CHECKOUT_IGNORE)
        sandbox.run([sys.executable, "-m", "pip", "wheel", "-q", "--use-pep517", "--disable-pip-version-check",
                     "-w", str(checkout / "wheels"), "systemd-python", "sdnotify", "setuptools", "wheel"],
                    timeout=600)
        sandbox.note("checkout copied, wheels built for an offline install")

        sandbox.run([vagrant, "box", "add", "--name", box_name, str(box)], timeout=600, env=env)
        box.unlink()
        sandbox.note("box added")

        milestones = ("Uploading base box", "Starting domain", "Waiting for domain to get an IP",
                      "Machine booted and ready", "Rsyncing folder", "Running provisioner", "== provision:",
                      "PASS", "FAIL", "rror")
        up = sandbox.run_noting([vagrant, "up", "--provider=libvirt", "--no-color"], timeout=1800, env=env,
                                milestones=milestones, log_name="up.log")
        sandbox.note(f"vagrant up exited {up.returncode}")
        assert up.returncode == 0, tail(up.output, 80)
        assert "== provision: self-test" in up.output, tail(up.output, 80)
        assert "PASS" in up.output, tail(up.output, 80)
        assert "== provision: done" in up.output, tail(up.output, 80)

        status = sandbox.run([vagrant, "ssh", "-c", "sudo chatctl status && systemctl is-active chatd holderd"],
                             timeout=300, env=env, netns=True)
        assert "chatd: pid" in status.output and "active" in status.output, status.output
        sandbox.note("chatctl status in the guest: " + status.output.strip().splitlines()[0])

        # chatd in the guest, through the forwarded port on the namespace's 127.0.0.1.
        probe = ("import socket; s = socket.create_connection(('127.0.0.1', 5001), timeout=30); "
                 "s.sendall(b'NICK probe\\nWHO\\n'); data = b''\n"
                 "while b'END' not in data:\n"
                 "    chunk = s.recv(4096)\n"
                 "    if not chunk: break\n"
                 "    data += chunk\n"
                 "print(data.decode())")
        answer = sandbox.run([sys.executable, "-c", probe], timeout=120, netns=True)
        assert "OK NICK probe" in answer.output and "USER probe" in answer.output, answer.output
        sandbox.note("chatd answers through the forwarded port")

        destroy = sandbox.run([vagrant, "destroy", "-f"], timeout=600, env=env, netns=True, check=False)
        destroyed = destroy.returncode == 0
        assert destroyed, tail(destroy.output)
        sandbox.note("vagrant destroy done")
    finally:
        if not destroyed and (sandbox.work / "vagrant-dotfiles" / "machines").exists():
            sandbox.run([vagrant, "destroy", "-f"], timeout=600, env=env, netns=True, check=False)
        sandbox.close(domain_prefix)
