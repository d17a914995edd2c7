"""What :class:`chatd.bus.Bus` gives back through :meth:`~chatd.bus.Bus.results`: frozen values,
made on the bus thread and read on chatd's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Published:
    """The publish ``token`` was stored at stream sequence ``seq`` (``duplicate``: stored before)."""
    token: Any
    seq: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class Claimed:
    """``ok``: the nick is this host's now, at ``revision``. Else ``holder`` (a host id, None if
    unreadable) has it, at ``revision``."""
    token: Any
    nick: str
    ok: bool
    revision: int | None
    holder: str | None


@dataclass(frozen=True, slots=True)
class Updated:
    """``ok``: the new value is stored at ``revision``; else the revision given was not the last."""
    token: Any
    nick: str
    ok: bool
    revision: int | None


@dataclass(frozen=True, slots=True)
class Released:
    """``ok``: the nick's entry is deleted; else the revision given was not the last (not deleted)."""
    nick: str
    ok: bool


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message for this host, at stream sequence ``seq`` (the cursor to journal once it is committed)."""
    seq: int
    subject: str
    headers: dict
    payload: bytes


@dataclass(frozen=True, slots=True)
class NickChanged:
    """The nicks bucket changed: ``value`` None when the nick was released. ``lapsing``: the hosts
    taken for alive whose lease, when this change was stored, had gone unrenewed for a lease (their
    lease puts' and this change's times, both NATS's): the change may be another host taking the
    nick of one whose lease expired, which this host has not yet seen."""
    nick: str
    value: bytes | None
    revision: int
    lapsing: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class HostChanged:
    """A host's lease appeared (``alive``) or was deleted or expired."""
    host_id: str
    alive: bool


@dataclass(frozen=True, slots=True)
class LeaseLapsed:
    """This host's lease may be gone from the hosts bucket: it was last stored by a put sent
    ``seconds`` ago (no less than the lease, less a margin), and none since was acknowledged. Other
    hosts may take its nicks: it must stop serving them (chatd.fencing). Told once per lapse."""
    seconds: float


@dataclass(frozen=True, slots=True)
class LeaseRenewed:
    """This host's lease is stored again after a :class:`LeaseLapsed`."""


@dataclass(frozen=True, slots=True)
class DirectoryComplete:
    """Every nick and host lease that existed when the bus connected has come (as
    :class:`NickChanged` and :class:`HostChanged`): what is not known now does not exist.
    Comes once."""


@dataclass(frozen=True, slots=True)
class BusError:
    """A line for chatd's log. ``fatal``: the bus stopped working and will not recover by itself."""
    code: str
    message: str
    fatal: bool = False


@dataclass(frozen=True, slots=True)
class Connected:
    server: str


@dataclass(frozen=True, slots=True)
class Disconnected:
    reason: str


@dataclass(frozen=True, slots=True)
class SessionRead:
    """A session's entry in the sessions bucket (``value`` None: there is none), with its revision."""
    token: Any
    sid: str
    value: bytes | None
    revision: int


@dataclass(frozen=True, slots=True)
class SessionWritten:
    """A session's entry written (``ok``) or not: another write came first (``revision``: the entry's now, 0 if gone)."""
    token: Any
    sid: str
    ok: bool
    revision: int


@dataclass(frozen=True, slots=True)
class Replayed:
    """The stream's messages for ``receiver`` from ``first`` to ``last`` (sequence, subject, payload), in order."""
    token: Any
    receiver: str
    messages: tuple
