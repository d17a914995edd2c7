"""systemd's fd store as a holder of chatd's descriptors (see :mod:`chatd.backup`).

Each fd goes to the store under its holder name (``chatd/listen``,
``chatd/state``, ``chatd/client/<slot>``). The store keeps no metadata, and needs
none: a client's pairing and counters are in the state file, which is stored
too, so the store alone restores everything.

systemd ignores a socket it already holds, whatever name comes with it, so an
fd is sent only once per name; a name whose socket changed is removed first.
Re-sending would cost PID 1 more than it seems: it compares each incoming fd
with every stored one.
"""

from __future__ import annotations

import logging
import os

from holderd.client import Retrieved
from holderd.servicemanager import ServiceManager

from .backup import PREFIX

log = logging.getLogger("chatd")


class SystemdHolder:
    label = "systemd"

    def __init__(self, manager: ServiceManager):
        self.manager = manager
        self.working: bool | None = True
        self._stored: dict[str, int] = {}  # name -> inode of the socket stored under it

    def store(self, items: list[tuple[str, bytes, int]]) -> bool:
        for name, _meta, fd in items:
            inode = os.fstat(fd).st_ino
            previous = self._stored.get(name)
            if previous == inode:
                continue
            if previous is not None:
                self.manager.remove(name)
            self.working = self.manager.store(name, fd)
            self._stored[name] = inode
        return bool(self.working)

    def remove(self, names: list[str]) -> bool:
        for name in names:
            if self._stored.pop(name, None) is not None:
                self.manager.remove(name)
        return True

    def retrieve(self) -> list[Retrieved]:
        items = []
        for fd, name in sorted(self.manager.take_passed_fds().items()):
            if not name.startswith(PREFIX):
                log.warning("systemd passed fd %d named %r, not chatd's: closing it", fd, name)
                self.manager.remove(name)
                os.close(fd)
                continue
            inode = os.fstat(fd).st_ino
            self._stored[name] = inode
            items.append(Retrieved(name, b"", fd, inode))
        return items

    def forget_all(self) -> bool:
        passed = self.manager.take_passed_fds()
        for fd in passed:
            os.close(fd)
        names = set(self._stored) | set(passed.values())
        for name in names:
            self.manager.remove(name)
        self._stored.clear()
        log.info("systemd's fd store forgot the %d fds it kept for chatd (--fresh)", len(names))
        return True

    def held_names(self) -> set[str]:
        return set(self._stored)

    def held_count(self) -> int | None:
        return len(self._stored)
