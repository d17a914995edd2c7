"""What the two threads of :mod:`chatd.bus` share besides the :class:`~chatd.bus.mailbox.Mailbox`.

* :class:`BusSettings`: made by chatd's thread before the bus thread starts,
  frozen, read by both.
* :class:`Gauges`: what the bus thread reports about itself for
  :meth:`chatd.bus.Bus.status`. Written by the bus thread only, each field a
  plain value replaced whole (never a container changed in place), so that
  chatd's thread reads it without a lock and never sees half a change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BusSettings:
    servers: tuple[str, ...]
    host_id: str
    stream: str
    nick_bucket: str
    host_bucket: str
    host_lease: float
    replicas: int
    creds: str | None = None  # this host's nkey seed file (--nats-creds): see chatd.bus.access
    ca: str | None = None  # the CA that signed the servers' certificates (--nats-ca): TLS, verified
    session_bucket: str = "chatd_sessions"  # sessions kept in the cluster (chatd.keeper)


@dataclass(slots=True)
class Gauges:
    """Written by the bus thread only (chatd's thread makes it, before the bus thread starts)."""
    server: str | None = None  # the URL connected to
    ready: bool = False  # the stream and buckets are right: publishing and nick work may go
    failure: str | None = None  # a fatal error's message: the bus does nothing more
    max_payload: int | None = None  # the server's, once connected
    publishes_done: int = 0
    last_delivered: int = 0  # the stream sequence of the last Delivered result
    lag: int | None = None  # messages pending for this host after the last delivered
    lease_renewed: float | None = None  # time.monotonic() when this host's lease was last stored
    hosts_alive: tuple[str, ...] = ()  # sorted
