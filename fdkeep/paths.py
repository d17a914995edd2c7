"""Where a daemon puts its socket when nobody says.

One rule for every program, so that a client finds a daemon's socket by the
same reasoning the daemon used to place it (each program names its own file;
this module knows no program):

1. ``$RUNTIME_DIRECTORY`` when the service itself runs under systemd with
   ``RuntimeDirectory=`` (only for the daemon's own socket);
2. ``/run/<app>/`` for root;
3. ``$XDG_RUNTIME_DIR/<app>/`` for a user with a session;
4. ``/tmp/<app>-<uid>/`` otherwise.
"""

from __future__ import annotations

import os


def runtime_dir(app: str, *, own_service: bool = False) -> str:
    if own_service and os.environ.get("RUNTIME_DIRECTORY"):
        # systemd may list several directories separated by ':'; ours is first.
        return os.environ["RUNTIME_DIRECTORY"].split(":")[0]
    if os.geteuid() == 0:
        return f"/run/{app}"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, app)
    return f"/tmp/{app}-{os.geteuid()}"


def prepare_socket_path(path: str) -> None:
    """Make the socket's directory (0755 if new) and clear a stale socket file."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o755, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
