"""``chatctl install-units``: put chatd and holderd under systemd.

It does what a package's post-install script would, and nothing more:

1. creates the system users ``holderd`` and ``chatd`` (no home, no shell) if
   they are missing;
2. writes ``holderd.service``, ``chatd@.service`` (chatd's two processes,
   taking turns) and ``chatd.service`` (which starts and stops both) into the
   unit directory,
   with the units' placeholder prefix ``/opt/process-backup`` replaced by the
   prefix this package is installed in (so ``ExecStart=`` finds the programs);
3. optionally writes ``/etc/default/chatd`` (``CHATD_OPTIONS=``);
4. runs ``systemctl daemon-reload``.

Starting is left to the operator: ``systemctl enable --now chatd``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

UNITS = ("holderd.service", "chatd.service", "chatd@.service")
USERS = {"holderd": "holderd socket holder", "chatd": "chatd chat server"}
PLACEHOLDER_PREFIX = "/opt/process-backup"


class InstallError(Exception):
    pass


def units_source(prefix: str) -> Path:
    """Where the unit files are: installed beside the package, or in a source checkout."""
    candidates = [
        Path(prefix) / "share" / "process-backup" / "units",
        Path(__file__).resolve().parent.parent / "units",
    ]
    for candidate in candidates:
        if all((candidate / unit).is_file() for unit in UNITS):
            return candidate
    raise InstallError(f"unit files not found in {' or '.join(map(str, candidates))}")


def render_unit(text: str, prefix: str) -> str:
    return text.replace(PLACEHOLDER_PREFIX + "/", prefix.rstrip("/") + "/")



def ensure_user(name: str, comment: str) -> bool:
    """Create a system user and group ``name``; False if it existed already."""
    try:
        import pwd

        pwd.getpwnam(name)
        return False
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", comment, name],
        check=True, capture_output=True, text=True,
    )
    return True


def install_units(
    prefix: str = sys.prefix,
    unit_dir: str = "/etc/systemd/system",
    chatd_options: str | None = None,
    reload: bool = True,
) -> dict:
    if os.geteuid() != 0:
        raise InstallError("installing units needs root: run it as root")
    for program in ("chatd", "holderd"):
        if not os.access(os.path.join(prefix, "bin", program), os.X_OK):
            raise InstallError(
                f"{prefix}/bin/{program} is missing: give --prefix the directory the package "
                "is installed in (the virtualenv holding bin/chatd)"
            )
    source = units_source(prefix)
    report = {"prefix": prefix, "unit_dir": unit_dir, "units": [], "users_created": []}
    try:
        for name, comment in USERS.items():
            if ensure_user(name, comment):
                report["users_created"].append(name)
    except subprocess.CalledProcessError as exc:
        raise InstallError(f"useradd failed: {exc.stderr.strip()}") from None
    os.makedirs(unit_dir, exist_ok=True)
    for unit in UNITS:
        target = os.path.join(unit_dir, unit)
        with open(target, "w") as out:
            out.write(render_unit((source / unit).read_text(), prefix))
        report["units"].append(target)
    if chatd_options is not None:
        os.makedirs("/etc/default", exist_ok=True)
        with open("/etc/default/chatd", "w") as out:
            out.write(f"# Options for chatd (see `chatd --help`), written by chatctl install-units.\n"
                      f"CHATD_OPTIONS={chatd_options}\n")
        report["defaults"] = "/etc/default/chatd"
    report["reloaded"] = False
    if reload:
        if not os.path.isdir("/run/systemd/system"):
            raise InstallError("units written, but systemd is not running here: nothing to reload")
        result = subprocess.run(["systemctl", "daemon-reload"], capture_output=True, text=True)
        if result.returncode != 0:
            raise InstallError(f"systemctl daemon-reload failed: {result.stderr.strip()}")
        report["reloaded"] = True
    return report
