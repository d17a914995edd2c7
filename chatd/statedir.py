"""The journal on disk: ``chatd --state-dir DIR``, and what chatd starts from when the holders keep nothing.

Theory of operation
-------------------
Without a state directory the journal is a memfd: it lives as long as a
holder keeps it, and a stop of holderd together with chatd's fd store (or a
reboot) ends it. With one, the journal is the file ``DIR/journal`` (mode 0600,
``DIR`` made 0700 if missing), mapped and handed to the holders exactly as the
memfd is (:class:`chatd.journal.Journal`), so a crash of chatd alone goes as
without it. The file only adds a home that outlives the holders:

- **The holders keep a journal** (the usual restore): it is current. If it is
  ``DIR/journal`` itself (same device and inode), nothing changes. If it is
  another file (a memfd: the chatd before ran without ``--state-dir``, as
  every release before this one did), it is copied into ``DIR/journal``
  (:meth:`~chatd.journal.Journal.copy_to`: the pages written, whole under a
  temporary name, then renamed), given to the holders in its place before
  anything is written to it, and served from (:func:`settle_held_journal`). So
  a ``--state-dir`` added to the options takes effect at the next start, as a
  changed ``--port`` does. A copy that fails (a full disk) leaves chatd serving
  from the held one, and ``DIR/journal`` set aside: it is stale.
- **The holders keep nothing** (holderd and the fd store stopped or killed
  with chatd, or a reboot): :func:`journal_kept_on_disk` attaches
  ``DIR/journal``, if one is there and can be trusted, and the restore goes on
  as one whose sockets did not come back (:mod:`chatd.restore`), on new
  listeners. A journal is trusted if it was written in this boot (the page
  cache is the file, whoever died) or sealed when its last chatd stopped
  (:meth:`~chatd.journal.Journal.seal`: everything on disk, nothing written
  after). Otherwise the machine went down without a stop (power loss, kernel
  crash): what reached the disk may be old or torn, so the file is set aside
  as ``DIR/journal.previous`` and chatd starts afresh, rather than serve a
  state nobody committed. A damaged file is set aside too, and a single host's
  (no outboxes) when chatd now joins a cluster (it could not serve from it); a
  file of a version this release does not read is refused (Error
  ``unknown-format``; chatd exits, nothing touched), like a held one.

**Sealing.** A chatd that stops (SIGTERM, not a handover) seals the journal
it served from. Under systemd, ``chatd.service`` also runs ``chatd --seal``
once both instances have stopped (:func:`seal_file`): a serving chatd that
handed over to a standby that was itself stopped before it served leaves no
seal otherwise. ``chatd --seal`` refuses a journal whose owner is alive: a
seal under a writer would be a lie.
"""

from __future__ import annotations

import logging
import os
import stat
import time
from typing import TYPE_CHECKING, Protocol

from fdkeep.errors import Error
from fdkeep.text import plural

from . import journal as journal_module
from .holders import STATE_NAME
from .journal import (HEADER, MAGIC, OWNER, OWNER_OFFSET, ROOT, ROOT_OFFSETS, SEAL, SEAL_OFFSET,
                      SELECTOR_OFFSET, UNKNOWN_FORMAT, VERSION, Journal, format_error, process_identity)

if TYPE_CHECKING:
    from .holders import Holders


class Starting(Protocol):
    """What making or finding the journal uses of the server that will serve from it
    (chatd.server.ChatServer is one)."""

    state_dir: "StateDir | None"
    max_clients: int
    box_size: int
    holders: "Holders"

log = logging.getLogger("chatd")

JOURNAL_NAME = "journal"
#: Where a journal chatd will not serve from is moved (one at a time: the next replaces it).
SET_ASIDE_NAME = "journal.previous"


class StateDir:
    """Where the journal lives on disk, and the one owner of the files in that directory."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.journal_path = os.path.join(self.directory, JOURNAL_NAME)
        self.set_aside_path = os.path.join(self.directory, SET_ASIDE_NAME)

    def prepare(self) -> None:
        """The directory, made (0700) if missing; Error ``state-dir`` naming the fix if it
        cannot be made or written."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if not stat.S_ISDIR(os.stat(self.directory).st_mode):
                raise NotADirectoryError(f"{self.directory} is not a directory")
        except OSError as exc:
            raise Error("state-dir", f"cannot use {self.directory} as chatd's state directory: "
                                     f"{exc.strerror or exc}; pass a directory chatd may create or write "
                                     "(--state-dir)") from None
        if not os.access(self.directory, os.W_OK | os.X_OK):
            raise Error("state-dir", f"chatd (uid {os.geteuid()}) cannot write its state directory "
                                     f"{self.directory}: give it to that user, or pass another --state-dir")

    def identity(self) -> tuple[int, int] | None:
        """(device, inode) of the journal file there now; None if there is none."""
        try:
            found = os.stat(self.journal_path)
        except FileNotFoundError:
            return None
        return found.st_dev, found.st_ino

    def set_aside(self, why: str) -> None:
        """Move the journal out of the way (to ``journal.previous``), saying ``why``."""
        try:
            os.replace(self.journal_path, self.set_aside_path)
            journal_module.sync_directory(self.journal_path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("%s must be set aside (%s), but cannot be (%s): a new journal replaces it, if it can be "
                      "made there", self.journal_path, why, exc.strerror or exc)
            return
        log.warning("%s set aside as %s: %s", self.journal_path, self.set_aside_path, why)


def new_journal(server: Starting) -> Journal:
    """A new journal for ``server``: ``DIR/journal`` with a state directory, else a memfd."""
    if server.state_dir is None:
        return Journal.create(server.max_clients, box_size=server.box_size)
    return Journal.create(server.max_clients, box_size=server.box_size, path=server.state_dir.journal_path)


def journal_kept_on_disk(server: Starting, held: list) -> tuple[Journal, int] | None:
    """The holders keep no listening socket: the state directory's journal, attached, and its
    fd, if one is there and can be trusted (the module's docstring); else None (a fresh start).
    ``held``: the journals the holders kept anyway (useless without a listener); if the file is
    none of them, it is stale. Raises Error ``unknown-format`` for a file of another version."""
    state_dir = server.state_dir
    if state_dir is None or state_dir.identity() is None:
        return None
    path = state_dir.journal_path
    inode = state_dir.identity()[1]
    if held and all(item.ino != inode for item in held):
        state_dir.set_aside("the holders kept another journal (dropped with what they kept: no listening "
                            "socket came back to serve it), so this one is stale")
        return None
    try:
        journal = Journal.attach(path)
    except Error as exc:
        if exc.code == UNKNOWN_FORMAT:
            raise
        state_dir.set_aside(f"it is damaged ({exc.message}); chatd starts afresh")
        return None
    except (OSError, ValueError) as exc:
        state_dir.set_aside(f"it cannot be read ({exc}); chatd starts afresh")
        return None
    if server.box_size and not journal.box_size:
        journal.close()
        state_dir.set_aside("it is a single host's journal (no outboxes) and chatd now joins a cluster "
                            "(--cluster), which it cannot from that journal: chatd starts afresh, with outboxes")
        return None
    if journal.boot_found == journal_module.boot_id():
        why = "written in this boot, so exactly as the last chatd left it"
    elif journal.sealed:
        why = "sealed when chatd last stopped, before the machine restarted"
    else:
        journal.close()
        state_dir.set_aside("it was last written in an earlier boot and not sealed: the machine went down while "
                            "chatd served (a power loss, a kernel crash, or chatd killed before a reboot), so what "
                            "reached the disk may be old, or torn across pages. chatd starts afresh: the sessions "
                            "it kept are lost")
        return None
    if journal.slots < server.max_clients:
        log.warning("%s has room for %s, fewer than chatd may serve now (--max-clients, or the fd limit): "
                    "%d at most until a fresh start (`chatd --fresh`, which sets it aside)", path,
                    plural(journal.slots, "client"), journal.slots)
    records = journal.used()
    log.info("the holders keep nothing for chatd (holderd and the fd store were stopped or killed, or the machine "
             "restarted): starting from %s, %s; the connections of its %s are gone; listening anew",
             path, why, plural(records, "client"))
    return journal, journal.fd


def settle_held_journal(server: Starting, journal: Journal, journal_fd: int | None) -> tuple[Journal, int | None]:
    """The journal the holders kept is current; with a state directory, it is served from
    ``DIR/journal``: as it is if it is that file, else copied there and the copy given to the
    holders in its place (the held ``journal`` is then unmapped; its fd stays the caller's).
    ``journal_fd`` None: a new journal (already made where it belongs)."""
    state_dir = server.state_dir
    if state_dir is None or journal_fd is None:
        return journal, journal_fd
    held = os.fstat(journal_fd)
    if state_dir.identity() == (held.st_dev, held.st_ino):
        return journal, journal_fd
    what = "a memfd (the chatd before ran without --state-dir)" if journal_module.is_memfd(journal_fd) else \
        f"another file ({os.readlink(f'/proc/self/fd/{journal_fd}')})"
    began = time.monotonic()
    try:
        copy = journal.copy_to(state_dir.journal_path)
    except Error as exc:
        log.error("%s; serving from the held journal, which is current", exc.message)
        state_dir.set_aside("the holders keep another journal, which is current")
        return journal, journal_fd
    server.holders.store([(STATE_NAME, b"{}", copy.fd)])  # before a byte is written to it
    journal.close(close_fd=False)
    log.info("the holders kept %s, not %s: it is current, so it was copied there (%d MiB written in %.0f ms) "
             "and is served from there; the holders keep the copy in its place",
             what, state_dir.journal_path, os.stat(state_dir.journal_path).st_blocks * 512 >> 20,
             (time.monotonic() - began) * 1000)
    return copy, copy.fd


def seal_file(path: str) -> str:
    """``chatd --seal``: put the journal at ``path`` on disk and seal it, for the next boot
    (:meth:`chatd.journal.Journal.seal`, without mapping it: nothing is written but the seal).
    What was done, in words; Error if it cannot be, or must not be (a live chatd serves from it)."""

    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return f"no journal at {path}: nothing to seal"
    except OSError as exc:
        raise Error("state-dir", f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        header = os.pread(fd, SEAL_OFFSET + SEAL.size, 0)
        if len(header) < SEAL_OFFSET + SEAL.size:
            raise Error("bad-state", f"{path} is too short for a journal: not sealed")
        magic, version = HEADER.unpack_from(header)[:2]
        if (magic, version) != (MAGIC, VERSION):
            raise format_error(magic, version, path)
        owner = OWNER.unpack_from(header, OWNER_OFFSET)
        if owner[0] and process_identity(owner[0]) == owner:
            raise Error("serving", f"chatd pid {owner[0]} serves from {path}: not sealed (a chatd seals its "
                                   "journal itself when it stops)")
        committed, _ = ROOT.unpack_from(header, ROOT_OFFSETS[header[SELECTOR_OFFSET] & 1])
        os.fsync(fd)
        os.pwrite(fd, SEAL.pack(1, committed), SEAL_OFFSET)
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"sealed {path} at commit {committed}: its next start after a reboot trusts it"
