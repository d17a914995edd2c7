"""The Vagrantfile: always validated; booted for real on request.

``vagrant validate -p`` (ignore provider config: Debian's vagrant alone has no
usable provider, so a plain ``validate`` fails with "No usable default
provider") parses the Vagrantfile and checks every setting and the
provisioner's script. It skips when the ``vagrant`` binary is missing, except
under CI (``CI=true``), where it fails: CI must run it.

``PROCESS_BACKUP_VAGRANT_UP=1`` also runs the real thing (as root, about 4
minutes on 2 cores with plain emulation, 5.5 with a system libvirtd that
re-probes QEMU, see Libvirt.note_kvm_probing in tests/vagrant_libvirt.py, beside
it; the Debian packages it needs are its UP_PACKAGES, and it names them when one is missing): build a
Debian 12 box with ``scripts/build-vagrant-box``, ``vagrant up`` with the libvirt
provider in plain emulation (``PROCESS_BACKUP_LIBVIRT_DRIVER=qemu``),
provisioning from wheels built here, and check that provisioning (with
``chatctl selftest``) passed and chatd answers through the forwarded port. The
VM has no network but an isolated one to the host; building the box
(``mmdebstrap``) and the wheels (``pip``) still needs Debian's and PyPI's
package registries.

It uses the libvirtd that answers on ``qemu:///system`` if there is one (Debian's
``libvirt-daemon-system`` starts one when installed): it adds a storage pool, a
network and a domain of its own there, removes exactly those and leaves the
daemons running. Without one, it starts virtlogd and libvirtd itself, in a
private network namespace, and stops them afterwards. Either way the VM, the
box and all the test made are removed afterwards, whatever happened, and
whatever is still running then fails the test. Its steps, with their times, are
printed (``pytest -s``); its logs (the steps, the box build, the whole ``vagrant
up`` with the in-VM self-test, libvirt's of the guest's qemu) are kept in a directory
under ``/var/tmp/process-backup-vagrant-logs/`` (the last ten runs), whose path
it prints at the end.

Vagrant runs with ``VAGRANT_HOME`` and ``VAGRANT_DOTFILE_PATH`` in a temporary
directory, so nothing is left in the checkout or in ``~/.vagrant.d``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import offline_wheels
from vagrant_libvirt import (CHECKOUT_IGNORE, UP_PACKAGES, Libvirt, collapse_progress, free_port,
                             missing_for_vagrant_up, tail)

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


def test_the_missing_package_check_leaves_no_vagrant_d(vagrant, tmp_path, monkeypatch):
    """It asks Vagrant for its plugins with a home of its own: ~/.vagrant.d stays unmade."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("VAGRANT_HOME", raising=False)
    missing_for_vagrant_up()
    assert not (tmp_path / ".vagrant.d").exists()


def test_progress_reports_collapse_to_the_last():
    text = ("==> default: Uploading base box image as volume into Libvirt storage...\n"
            + "".join(f"    default: Progress: {n}%\n" for n in range(101))
            + "==> default: Starting domain.\r\x1b[K    box: Progress: 7% (Rate: 1M/s)\r    box: Progress: 99%\n"
            + "    box: Progress: 100%\n")
    assert collapse_progress(text).splitlines() == [
        "==> default: Uploading base box image as volume into Libvirt storage...",
        "    default: Progress: 100%",
        "==> default: Starting domain.",
        "    box: Progress: 100%",
    ]


# --- the real thing: PROCESS_BACKUP_VAGRANT_UP=1 -------------------------------------------------

VAGRANT_UP = os.environ.get("PROCESS_BACKUP_VAGRANT_UP") == "1"


@pytest.mark.skipif(not VAGRANT_UP, reason="a real `vagrant up` (minutes, root, libvirt): set PROCESS_BACKUP_VAGRANT_UP=1")
def test_vagrant_up_provisions_and_passes_the_selftest(vagrant):
    if os.geteuid() != 0:
        pytest.fail("PROCESS_BACKUP_VAGRANT_UP=1 needs root (it builds a box, and may start libvirtd)")
    missing = missing_for_vagrant_up()
    if missing:
        pytest.fail(f"PROCESS_BACKUP_VAGRANT_UP=1 but Debian's {', '.join(missing)} missing; as root: "
                    f"apt-get install {' '.join(UP_PACKAGES)}")

    lv = Libvirt()
    checkout = lv.work / lv.tag  # vagrant-libvirt names the domain after it
    domain_prefix = checkout.name + "_"
    box_name = "local/process-backup-debian12"
    env = vagrant_env(
        lv.work, checkout,
        PROCESS_BACKUP_BOX=box_name,
        PROCESS_BACKUP_LIBVIRT_DRIVER="qemu",
        PROCESS_BACKUP_LIBVIRT_POOL=lv.pool,
        PROCESS_BACKUP_PROVISION_ARGS="--wheels /vagrant/wheels",
    )
    destroyed = False
    problems: list[str] = []
    try:
        lv.start()
        # In our namespace 5001 is free; on the host, take one that is.
        host_port = free_port() if lv.system else 5001
        env["PROCESS_BACKUP_HOST_PORT"] = str(host_port)
        (Path(env["VAGRANT_HOME"]) / "Vagrantfile").write_text(lv.vagrantfile_for_home())

        box = lv.work / "debian12.box"
        lv.run([str(REPO / "scripts" / "build-vagrant-box"), str(box)], timeout=900, log_name="box.log")
        lv.note(f"box built: {box.stat().st_size >> 20} MiB")

        shutil.copytree(REPO, checkout, ignore=CHECKOUT_IGNORE)
        offline_wheels(checkout / "wheels")
        lv.note("checkout copied, wheels built for an offline install")

        lv.run([vagrant, "box", "add", "--name", box_name, str(box)], timeout=600, env=env, log_name="box-add.log")
        box.unlink()
        lv.note("box added")

        milestones = ("Uploading base box", "Starting domain", "Waiting for domain to get an IP",
                      "Machine booted and ready", "Rsyncing folder", "Running provisioner", "== provision:",
                      "PASS", "FAIL", "rror")
        up = lv.run_noting([vagrant, "up", "--provider=libvirt", "--no-color"], timeout=2400, env=env,
                           milestones=milestones, log_name="up.log")
        lv.note(f"vagrant up exited {up.returncode}")
        where = f"\n(all of it: {lv.logs / 'up.log'})"
        assert up.returncode == 0, tail(up.output, 80) + where
        assert "== provision: self-test" in up.output, tail(up.output, 80) + where
        assert "PASS" in up.output, tail(up.output, 80) + where
        assert "== provision: done" in up.output, tail(up.output, 80) + where

        status = lv.run([vagrant, "ssh", "-c", "sudo chatctl status && systemctl is-active chatd holderd"],
                        timeout=300, env=env, in_net=True)
        assert "chatd: pid" in status.output and "active" in status.output, status.output
        lv.note("chatctl status in the guest: " + status.output.strip().splitlines()[0])

        # chatd in the guest, through the forwarded port on 127.0.0.1 (vagrant-libvirt's
        # ssh tunnel, whose pid file names the port it took).
        tunnels = sorted((lv.work / "vagrant-dotfiles").rglob("ssh_*.pid"))
        assert tunnels, "vagrant-libvirt started no ssh tunnel for the forwarded port"
        port = int(tunnels[0].stem.removeprefix("ssh_"))
        probe = (f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=30); "
                 "s.sendall(b'NICK probe\\nWHO\\n'); data = b''\n"
                 "while b'END' not in data:\n"
                 "    chunk = s.recv(4096)\n"
                 "    if not chunk: break\n"
                 "    data += chunk\n"
                 "print(data.decode())")
        answer = lv.run([sys.executable, "-c", probe], timeout=120, in_net=True)
        assert "OK NICK probe" in answer.output and "USER probe" in answer.output, answer.output
        lv.note(f"chatd answers through the forwarded port, 127.0.0.1:{port}")

        destroy = lv.run([vagrant, "destroy", "-f"], timeout=600, env=env, in_net=True, check=False,
                         log_name="destroy.log")
        destroyed = destroy.returncode == 0
        assert destroyed, tail(destroy.output)
        lv.note("vagrant destroy done")
    finally:
        if not destroyed and (lv.work / "vagrant-dotfiles" / "machines").exists():
            lv.run([vagrant, "destroy", "-f"], timeout=600, env=env, in_net=True, check=False,
                   log_name="destroy.log")
        problems = lv.close(domain_prefix)
        lv.note(f"cleaned up{'' if not problems else ', with problems: ' + '; '.join(problems)}")
        print(f"logs of this run (kept): {lv.logs}", flush=True)
    assert not problems, problems
