"""The libvirt machinery of the real `vagrant up` test (tests/test_vagrant.py): a libvirtd to
use (the system's, or one started in a private network namespace), its storage pool, network and
domain made and removed exactly, the logs kept, and what the test needs installed.

Kept beside the test, not in it, so that the test reads as its steps.
"""

from __future__ import annotations

import grp
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from xml.etree import ElementTree

# The Debian packages that PROCESS_BACKUP_VAGRANT_UP=1 needs, each with what shows
# that it is installed: commands, files, or Vagrant's plugin.
UP_PACKAGES = {
    "vagrant": ("vagrant",),
    "vagrant-libvirt": ("vagrant-libvirt plugin",),
    "libvirt-daemon-system": ("libvirtd", "virtlogd", "virsh"),
    "qemu-system-x86": ("qemu-system-x86_64",),
    "qemu-utils": ("qemu-img",),
    "dnsmasq-base": ("dnsmasq",),
    "mmdebstrap": ("mmdebstrap",),
    "extlinux": ("extlinux",),
    "syslinux-common": ("/usr/lib/syslinux/mbr/mbr.bin",),
    "fdisk": ("sfdisk",),
    "e2fsprogs": ("mkfs.ext4",),
    "iproute2": ("ip",),
}

LOG_ROOT = Path("/var/tmp/process-backup-vagrant-logs")
KEEP_RUNS = 10
CHECKOUT_IGNORE = shutil.ignore_patterns(
    ".git", ".vagrant", ".venv", ".pytest_cache", "__pycache__", "*.egg-info", "build", "scratch")
PROGRESS = re.compile(r"^\s*(\S+:\s+)?Progress: \d+%")


def new_log_dir() -> Path:
    """A directory of its own for this run's logs, under LOG_ROOT; the oldest runs beyond KEEP_RUNS go."""
    LOG_ROOT.mkdir(mode=0o755, exist_ok=True)
    runs = sorted(path for path in LOG_ROOT.iterdir() if path.is_dir())
    for old in runs[:max(0, len(runs) - (KEEP_RUNS - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    path = LOG_ROOT / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(mode=0o755)
    return path


def processes_mentioning(*needles: str) -> dict[int, str]:
    """Live processes whose command line contains one of needles (not this one, not zombies)."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(needle in cmdline for needle in needles):
            found[int(pid)] = cmdline.strip()
    return found


class Libvirt:
    """The libvirtd the test uses, what it makes there, and this run's logs.

    A libvirtd that already answers on qemu:///system (Debian's
    libvirt-daemon-system starts one, or its sockets, when it is installed) is
    used as it is: the test adds a storage pool, a network and a domain of its
    own, all named after ``self.tag``, removes exactly those, and leaves the
    daemons running. Without one, it starts virtlogd and libvirtd itself, in a
    network namespace of its own, and stops them afterwards.

    Either way the VM's network (vagrant-libvirt's management network) is
    isolated, on a subnet no interface, route or libvirt network uses: the VM
    reaches the host and nothing else. In the namespace, so do Vagrant's ssh
    tunnel for the forwarded port and every check of it. Everything but the logs
    lives under one directory (which qemu, running as libvirt-qemu, must be able
    to traverse); the logs stay in a directory of their own under LOG_ROOT.
    """

    def __init__(self):
        self.started = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="process-backup-vagrant-", dir="/var/tmp"))
        self.work.chmod(0o755)
        self.logs = new_log_dir()
        self.tag = f"process-backup-test-{os.getpid()}"
        self.pool = self.network = self.tag
        self.system = False  # True: a libvirtd that was running already
        self.netns: str | None = None  # our own libvirtd's network namespace
        self.daemons: list[subprocess.Popen] = []
        self.run_libvirt_before = tree(Path("/run/libvirt"))  # None: no such directory
        self.before: dict[str, set[str]] = {}
        self.domain_logs_before = set(os.listdir("/var/log/libvirt/qemu")) if os.path.isdir("/var/log/libvirt/qemu") else set()

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f}s] {text}"
        print(line, flush=True)
        with open(self.logs / "steps.log", "a") as log:
            log.write(line + "\n")

    def in_net(self, argv: list[str]) -> list[str]:
        """argv, to run where the VM's network is: our namespace, or the host."""
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def run(self, argv: list[str], timeout: float, env=None, in_net: bool = False, check: bool = True,
            log_name: str | None = None) -> subprocess.CompletedProcess:
        if in_net:
            argv = self.in_net(argv)
        result = subprocess.run(argv, env=env, capture_output=True, text=True, errors="replace", timeout=timeout)
        output = collapse_progress(result.stdout + result.stderr)
        if log_name:
            (self.logs / log_name).write_text(output + "\n")
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} exited {result.returncode}:\n{tail(output)}"
                                 + (f"\n(all of it: {self.logs / log_name})" if log_name else ""))
        result.output = output
        return result

    def run_noting(self, argv: list[str], timeout: float, env, milestones: tuple[str, ...],
                   log_name: str) -> subprocess.CompletedProcess:
        """Run where the VM's network is, logging each line with its time and noting the milestones.

        A run of progress reports goes into the log as its last line only.
        """
        argv = self.in_net(argv)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", start_new_session=True)
        watchdog = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
        watchdog.start()
        lines = []
        try:
            with open(self.logs / log_name, "w") as log:
                pending = None  # the latest progress report, written when something else comes
                for raw in proc.stdout:
                    line = strip_progress(raw.rstrip("\n"))
                    stamped = f"[{time.monotonic() - self.started:7.1f}s] {line}\n"
                    if PROGRESS.match(line):
                        pending = stamped
                        if lines and PROGRESS.match(lines[-1]):
                            lines[-1] = line
                            continue
                        lines.append(line)
                        continue
                    if pending:
                        log.write(pending)
                        pending = None
                    lines.append(line)
                    log.write(stamped)
                    log.flush()
                    if any(milestone in line for milestone in milestones):
                        self.note("  " + line.strip())
                if pending:
                    log.write(pending)
            proc.wait()
        finally:
            watchdog.cancel()
        result = subprocess.CompletedProcess(argv, proc.returncode, "\n".join(lines), "")
        result.output = result.stdout
        return result

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run(["virsh", "-q", "-c", "qemu:///system", *args], timeout=300, check=check)

    def names(self, kind: str) -> set[str]:
        """The names of every domain, network or pool ("list", "net-list", "pool-list"), inactive too."""
        return set(self.virsh(kind, "--all", "--name", check=False).stdout.split())

    # --- start ---

    def start(self) -> None:
        if self.virsh("version", check=False).returncode == 0:
            self.system = True
            self.note("using the libvirtd that answers on qemu:///system (its daemons are left as they are)")
            self.note_kvm_probing()
        elif Path("/run/libvirt/libvirt-sock").exists():
            raise AssertionError(
                "/run/libvirt/libvirt-sock exists but no libvirtd answers on it: start the system's libvirtd "
                "(systemctl start libvirtd) and the test uses it, or, if nothing serves that socket any more, "
                "remove it and the test starts its own")
        else:
            self.start_own_daemons()
        self.before = {kind: self.names(kind) for kind in ("list", "net-list", "pool-list")}
        if self.pool in self.before["pool-list"] or self.network in self.before["net-list"]:
            raise AssertionError(f"libvirt already has a pool or network named {self.tag}")
        (self.work / "pool").mkdir(mode=0o755)
        self.virsh("pool-create-as", self.pool, "dir", "--target", str(self.work / "pool"))
        self.subnet = self.free_subnet()
        self.note(f"storage pool {self.pool}; the VM's network: {self.network}, {self.subnet}, isolated")

    def start_own_daemons(self) -> None:
        self.netns = f"pbvagrant{os.getpid()}"
        self.run(["ip", "netns", "add", self.netns], timeout=30)
        self.run(["ip", "link", "set", "lo", "up"], timeout=30, in_net=True)
        for daemon in ("virtlogd", "libvirtd"):
            argv = self.in_net([daemon, "--pid-file", str(self.work / f"{daemon}.pid")])
            if daemon == "libvirtd" and Path("/dev/kvm").exists():
                # The guest runs in plain emulation anyway. Seen here: /dev/kvm (a PVM
                # hypervisor that cannot run a stock kernel) makes libvirtd re-probe
                # QEMU's capabilities at every lookup, 30 s for each domain defined
                # (see note_kvm_probing). Hidden behind an unusable file in a mount
                # namespace of libvirtd's own, the probe is cached and a define takes
                # milliseconds; that mount would break the private /dev libvirt makes
                # for each guest, so its qemu.conf there (a copy, bound over) turns that off.
                hide = self.work / "no-kvm"
                hide.touch(mode=0)
                qemu_conf = self.work / "qemu.conf"
                original = Path("/etc/libvirt/qemu.conf")
                qemu_conf.write_text((original.read_text() if original.exists() else "") + "\nnamespaces = []\n")
                argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /dev/kvm && mount --bind "$1" /etc/libvirt/qemu.conf && shift && exec "$@"',
                        str(hide), str(qemu_conf), *argv]
            log = open(self.logs / f"{daemon}.log", "w")
            with log:
                self.daemons.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                                     start_new_session=True))
        deadline = time.monotonic() + 60
        while self.virsh("version", check=False).returncode != 0:
            if time.monotonic() > deadline or any(d.poll() is not None for d in self.daemons):
                raise AssertionError("libvirtd did not answer: " + (self.logs / "libvirtd.log").read_text()[-3000:])
            time.sleep(0.5)
        self.note("virtlogd and libvirtd started in network namespace " + self.netns)

    def note_kvm_probing(self) -> None:
        """Say so when a running libvirtd will be slow here.

        libvirtd probes QEMU's capabilities as root, finds KVM, and then, at every
        lookup, finds the cached result stale because its qemu user cannot open
        /dev/kvm: it probes again, about 30 s, at each domain definition and start.
        Hosts with udev give /dev/kvm to group kvm (mode 0660), which libvirt-qemu
        is in, and see none of this; the test cannot hide /dev/kvm from a daemon
        it did not start, so it runs, only slower.
        """
        try:
            kvm = os.stat("/dev/kvm")
        except OSError:
            return
        try:
            kvm_gid = grp.getgrnam("kvm").gr_gid
        except KeyError:
            kvm_gid = None
        if kvm.st_mode & 0o006 or (kvm.st_gid == kvm_gid and kvm.st_mode & 0o060 == 0o060):
            return
        self.note(f"note: /dev/kvm is mode {kvm.st_mode & 0o777:o}, not group kvm as udev makes it: this libvirtd "
                  "re-probes QEMU (about 30 s) at each domain definition and start, so the run is slower")

    def free_subnet(self) -> str:
        """A /24 for the VM's network that overlaps no address, route or libvirt network."""
        used = []
        words = []  # "inet ADDRESS/PREFIX" of each address, the destination of each route
        for line in self.run(["ip", "-4", "-o", "addr", "show"], timeout=30, in_net=True).stdout.splitlines():
            words += line.split()[line.split().index("inet") + 1:][:1]
        for line in self.run(["ip", "-4", "route", "show", "table", "all"], timeout=30, in_net=True).stdout.splitlines():
            words += line.split()[:2]  # "10.0.0.0/24 dev ...", "local 10.0.0.2 dev ..."
        for word in words:
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                pass  # "default", "local", "broadcast", "dev" ...
        for name in self.names("net-list"):
            xml = self.virsh("net-dumpxml", name, check=False).stdout
            try:
                root = ElementTree.fromstring(xml)
            except ElementTree.ParseError:
                continue
            for ip in root.iter("ip"):
                if ip.get("family", "ipv4") == "ipv4" and ip.get("address"):
                    mask = ip.get("netmask") or ip.get("prefix") or "24"
                    used.append(ipaddress.ip_network(f"{ip.get('address')}/{mask}", strict=False))
        for third in range(200, 255):
            candidate = ipaddress.ip_network(f"192.168.{third}.0/24")
            if not any(candidate.overlaps(net) for net in used):
                return str(candidate)
        raise AssertionError("no free subnet among 192.168.200-254.0/24 for the VM's network")

    def vagrantfile_for_home(self) -> str:
        """The test's own settings, in VAGRANT_HOME's Vagrantfile (the project's overrides them where it sets them)."""
        return textwrap.dedent(f"""\
            Vagrant.configure("2") do |config|
              config.vm.provider "libvirt" do |lv|
                lv.management_network_name = "{self.network}"
                lv.management_network_address = "{self.subnet}"
                lv.management_network_mode = "none"  # isolated: the VM reaches the host only
              end
            end
            """)

    # --- close ---

    def close(self, domain_prefix: str) -> list[str]:
        """Remove all of it, whatever state it is in, each step on its own; return what is left over."""
        steps = [
            ("domains", lambda: self._remove_domains(domain_prefix)),
            ("networks", self._remove_networks),
            ("pool", self._remove_pool),
            ("daemons", self._stop_daemons),
            ("tunnels", self._kill_tunnels),
            ("netns", lambda: self.netns and self.run(["ip", "netns", "delete", self.netns], timeout=30, check=False)),
            ("domain logs", lambda: self._remove_domain_logs(domain_prefix)),
        ]
        problems = []
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # keep cleaning
                problems.append(f"cleanup of {name} failed: {exc!r}")
        problems += self._leftovers(domain_prefix)
        if not self.system:  # what our libvirtd left in /run/libvirt, now that it is gone
            if self.run_libvirt_before is None:
                shutil.rmtree("/run/libvirt", ignore_errors=True)
            else:
                for path in sorted(tree(Path("/run/libvirt")) - self.run_libvirt_before, key=len, reverse=True):
                    Path(path).rmdir() if Path(path).is_dir() and not Path(path).is_symlink() else Path(path).unlink()
        shutil.rmtree(self.work, ignore_errors=True)
        for problem in problems:
            print(problem, file=sys.stderr)
        return problems

    def _remove_domains(self, prefix: str) -> None:
        for name in self.names("list") - self.before.get("list", set()):
            if name.startswith(prefix):
                self.virsh("destroy", name, check=False)
                self.virsh("undefine", name, "--nvram", check=False)

    def _remove_networks(self) -> None:
        new = self.names("net-list") - self.before.get("net-list", set())
        if self.system:
            for name in new:
                if name.startswith(self.tag):
                    self.virsh("net-destroy", name, check=False)
                    self.virsh("net-undefine", name, check=False)
        else:
            for name in self.virsh("net-list", "--name", check=False).stdout.split():
                self.virsh("net-destroy", name, check=False)  # our libvirtd started every active one
            for name in new:
                self.virsh("net-undefine", name, check=False)
        # What libvirtd 9.0 leaves of a network it no longer has (the host's
        # firewall keeps the empty LIBVIRT_* chains it adds once, for every network).
        for path in Path("/run/libvirt/network").glob(self.tag + "*"):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()

    def _remove_pool(self) -> None:
        if self.pool not in self.names("pool-list") - self.before.get("pool-list", set()):
            return
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
        for pid, cmdline in processes_mentioning(str(self.work)).items():
            if cmdline.startswith("ssh "):
                os.kill(pid, signal.SIGTERM)

    def _remove_domain_logs(self, prefix: str) -> None:
        """The log libvirt keeps of the guest's qemu: into our logs, then away."""
        logs = Path("/var/log/libvirt/qemu")
        if logs.is_dir():
            for name in set(os.listdir(logs)) - self.domain_logs_before:
                if name.startswith(prefix):
                    shutil.copyfile(logs / name, self.logs / f"qemu-{name}")
                    (logs / name).unlink(missing_ok=True)

    def _leftovers(self, prefix: str) -> list[str]:
        """What is still there: processes (killed now), the namespace, and what libvirt still lists."""
        problems = []
        deadline = time.monotonic() + 10
        while (left := processes_mentioning(str(self.work), self.tag, *([self.netns] if self.netns else []))) \
                and time.monotonic() < deadline:
            time.sleep(0.5)  # qemu and dnsmasq take a moment to go
        for pid, cmdline in left.items():
            problems.append(f"left running, killed now: {pid} {cmdline[:200]}")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.netns and self.netns in self.run(["ip", "netns", "list"], timeout=30, check=False).stdout.split():
            problems.append(f"network namespace {self.netns} is still there")
        for path in Path("/run/libvirt/network").glob(self.tag + "*"):
            problems.append(f"{path} is still there")
        if self.system:
            for kind in ("list", "net-list", "pool-list"):
                extra = self.names(kind) - self.before.get(kind, set())
                gone = self.before.get(kind, set()) - self.names(kind)
                if extra or gone:
                    problems.append(f"virsh {kind}: left {sorted(extra)}, gone {sorted(gone)}")
        return problems


def tree(top: Path) -> set[str] | None:
    """Every path under top, or None if there is no top."""
    if not top.is_dir():
        return None
    paths = set()
    for folder, folders, files in os.walk(top):
        paths.update(os.path.join(folder, name) for name in folders + files)
    return paths


def strip_progress(text: str) -> str:
    """Vagrant's progress bars: keep the last state of each line."""
    text = text.replace("\x1b[K", "")
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())


def collapse_progress(text: str) -> str:
    """Vagrant's progress reports (hundreds, without a terminal): each run of them down to its last."""
    lines: list[str] = []
    for line in strip_progress(text).splitlines():
        if lines and PROGRESS.match(line) and PROGRESS.match(lines[-1]):
            lines[-1] = line
        else:
            lines.append(line)
    return "\n".join(lines)


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(collapse_progress(text).splitlines()[-lines:])


def missing_for_vagrant_up() -> list[str]:
    """The packages of UP_PACKAGES that are not installed, by what they provide."""
    missing = []
    for package, provides in UP_PACKAGES.items():
        for thing in provides:
            if thing == "vagrant-libvirt plugin":
                if shutil.which("vagrant") and not has_vagrant_libvirt():
                    missing.append(package)
                    break
            elif not (Path(thing).exists() if thing.startswith("/") else shutil.which(thing)):
                missing.append(package)
                break
    return missing


def has_vagrant_libvirt() -> bool:
    """Whether Vagrant, with a fresh VAGRANT_HOME like the test's, finds the plugin.

    Debian's vagrant-libvirt is a system plugin, which any VAGRANT_HOME sees; one
    from `vagrant plugin install` lives in ~/.vagrant.d, which the test does not
    use. A temporary home also keeps Vagrant from making ~/.vagrant.d here.
    """
    with tempfile.TemporaryDirectory(prefix="process-backup-vagrant-home-") as home:
        listed = subprocess.run(["vagrant", "plugin", "list"], capture_output=True, text=True, timeout=120,
                                env={**os.environ, "VAGRANT_HOME": home, "VAGRANT_CHECKPOINT_DISABLE": "1"})
    return "vagrant-libvirt" in listed.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
