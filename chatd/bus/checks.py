"""What :mod:`chatd.bus` decides without the network: names, nick values, the stream's and buckets'
configurations, the cursor against the stream, a KV change's key.

Theory of operation
-------------------
Every function here is pure: it takes values (nats-py's configuration and state
objects read back from the server, or anything with the same attributes) and
returns a verdict, and it imports neither asyncio nor nats-py, so chatd's
thread may use it and unit tests need no server.

The stream and bucket checks are the bus's defence against a cluster that does
not give what exactly-once delivery rests on. A stream or bucket another host
made first is accepted as it is if it gives what matters, judged on the
configuration **read back** from the server (nats-server 2.9 ignores options it
does not know without a word): the stream must take ``chat.>``, keep one
message per ``Nats-Msg-Id`` for :data:`DUPLICATE_WINDOW` at least, have the
replicas asked for or more and keep its messages in files; a bucket must keep
one revision a key, have the replicas, and expire its entries exactly as asked
(nicks never, host leases after ``host_lease``). A check returns None when all
is well, else the one line for chatd's log that names every problem and the
fix; the bus makes that a fatal error and does nothing more.
"""

from __future__ import annotations

import json
import re

from fdkeep.errors import Error

from .payloads import read_kv_key

#: What the stream keeps: one message per Nats-Msg-Id for this long, every message this long.
DUPLICATE_WINDOW = 600.0
MAX_AGE = 86400.0
#: The subjects of the stream: chat.<to_host>.<receiver>.
STREAM_SUBJECTS = "chat.>"
#: What a host id, a receiver or a nick may be: a NATS subject token and KV key.
NAME_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_token(what: str, value: str) -> None:
    """Raise :class:`~fdkeep.errors.Error` unless ``value`` can be part of a subject or key."""
    if not isinstance(value, str) or not NAME_TOKEN.match(value):
        raise Error("bad-name", f"{what} {value!r} cannot be part of a NATS subject or key: "
                                "use 1 to 64 of A-Z a-z 0-9 _ -")


#: A host lease's version (docs/formats.md): its "v" field, absent for 1 (what every release
#: so far writes); a value of another version names no host this release can trust.
LEASE_VERSION = 1


def holder(value: bytes) -> str | None:
    """The host a nick's value or a host lease names (JSON ``{"host": ...}``); None if it
    names none, or is of a version this release does not read."""
    try:
        value = json.loads(value)
        named, version = value.get("host"), value.get("v", 1)
    except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
        return None
    return named if isinstance(named, str) and version == LEASE_VERSION else None


def describe(exc: BaseException) -> str:
    """An exception as a log line's part: its type and nats-py's message without "nats: "."""
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[len("nats: "):]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def stream_refusal(name: str, config, replicas: int) -> str | None:
    """Why the stream ``name`` configured as ``config`` (a StreamConfig) will not do; None if it will."""
    problems = []
    if STREAM_SUBJECTS not in (config.subjects or []):
        problems.append(f"its subjects are {config.subjects}, not {STREAM_SUBJECTS}")
    if (config.duplicate_window or 0) < DUPLICATE_WINDOW:
        problems.append(f"its duplicate window is {config.duplicate_window or 0:.0f} s, under "
                        f"{DUPLICATE_WINDOW:.0f} s (a publish retried later would be stored twice)")
    if (config.num_replicas or 1) < replicas:
        problems.append(f"it has {config.num_replicas} replica(s), not {replicas} "
                        "(an acked message could be lost with one node)")
    if config.storage != "file":  # nats-py's StorageType is a str enum: FILE == "file"
        problems.append(f"its storage is {config.storage}, not file")
    if not problems:
        return None
    return (f"stream {name} will not do: {'; '.join(problems)}. Fix: remove the stream (every host must "
            "agree on its settings) and start chatd again")


def bucket_refusal(name: str, config, replicas: int, ttl: float | None) -> str | None:
    """Why the KV bucket ``name`` (``config``: its stream's StreamConfig) will not do for entries
    that expire after ``ttl`` s (None: never); None if it will."""
    problems = []
    if config.max_msgs_per_subject != 1:
        problems.append(f"it keeps {config.max_msgs_per_subject} revisions a key, not 1")
    if (config.num_replicas or 1) < replicas:
        problems.append(f"it has {config.num_replicas} replica(s), not {replicas}")
    if ttl is None and config.max_age:
        problems.append(f"its entries expire after {config.max_age:.0f} s: nicks would vanish")
    if ttl is not None and abs((config.max_age or 0) - ttl) > 0.001:
        problems.append(f"its entries expire after {config.max_age or 0:g} s, not host_lease = {ttl:g} s "
                        "(every host must use the same lease)")
    if not problems:
        return None
    return (f"KV bucket {name} will not do: {'; '.join(problems)}. Fix: give every host the same settings, "
            "or remove the bucket, and start chatd again")


def cursor_refusal(stream: str, cursor: int, state) -> str | None:
    """Why delivering from ``cursor`` + 1 would be wrong for the stream in ``state`` (a StreamState):
    it ends before the cursor, so it was made anew. None if the cursor fits."""
    if cursor <= state.last_seq:
        return None
    return (f"this host's journal has read stream {stream} up to sequence {cursor}, but the stream ends at "
            f"{state.last_seq}: it was made anew, and delivering from the old cursor would skip messages. "
            "Fix: start chatd with a fresh journal (its cursor at 0)")


def unread_expired(stream: str, cursor: int, state, max_age: float | None) -> str | None:
    """The messages after ``cursor`` the stream no longer has (they expired unread), in words;
    None if it has them all (or the cursor is 0: this host never read any)."""
    if not (cursor and state.first_seq > cursor + 1 and state.messages):
        return None
    return (f"stream {stream} starts at sequence {state.first_seq}: messages {cursor + 1} to "
            f"{state.first_seq - 1} expired (max age {max_age or 0:.0f} s) before this host read them")


def kv_entry(prefix: str, subject: str, headers: dict | None, seq: int) -> tuple[str, int, bool]:
    """A KV change seen on the bucket's stream: (key, revision, deleted). ``prefix`` is
    ``$KV.<bucket>.``; a delete or purge is marked by the header ``KV-Operation`` (any other
    value of it is a put). A key that is no nick or host id (anyone may publish to
    ``$KV.<bucket>.a.b``): :class:`~chatd.bus.payloads.BusPayloadError`."""
    operation = (headers or {}).get("KV-Operation") if isinstance(headers, dict) else None
    return read_kv_key(prefix, subject), seq, operation in ("DEL", "PURGE")
