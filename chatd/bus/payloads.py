"""What other hosts (or anyone who can publish to NATS) put on the bus, decoded or refused by name.

Theory of operation
-------------------
Everything chatd takes from NATS is bytes someone else wrote: a forward in the
stream (:func:`chatd.forwards.decode_forwards`), a nick's directory entry
(:func:`read_entry`), the key and operation of a change in a KV bucket
(:func:`read_kv_key`, :func:`chatd.bus.checks.kv_entry`). Each decoder is a pure
function that, for **any** bytes, returns the value or raises
:class:`BusPayloadError`, and nothing else: no KeyError from a missing field,
no TypeError from a field of the wrong type, no RecursionError from JSON nested
a million deep, no OverflowError from a count too big for the journal's 8 bytes.
The error's ``kind`` says what is wrong in one word (``json``, ``field``,
``version``, ``length``, ``utf8``, ``key``...), its message in full.

Its callers skip what is refused (a stream message counts as handled, so the
cursor moves past it; a KV change is ignored) and say so through a
:class:`Complaints`: the first refusal of each kind is logged whole, later ones
are counted and summed up at most every :data:`COMPLAIN_EVERY` seconds, so that
a stranger publishing garbage in a loop cannot fill the log.

Pure and free of asyncio and nats-py: both of chatd's threads use it.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable

#: What a nick or a directory entry's target may be (chatd.room.NAME_RE, not imported: the bus
#: thread does not load the room).
NICK = re.compile(r"[A-Za-z0-9_-]{1,32}\Z")
#: What a host id or a KV key may be (chatd.bus.checks.NAME_TOKEN).
TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
#: A directory entry's version: its "v" field, absent for 1.
ENTRY_VERSION = 1
#: The largest directory entry (an honest one is under 100 bytes).
MAX_ENTRY = 1024
#: Refusals of one kind are summed up in the log at most this often (seconds).
COMPLAIN_EVERY = 60.0


class BusPayloadError(ValueError):
    """A payload from the bus that is not what this release of chatd writes. ``kind``: one word
    for what is wrong (the log says the first of each kind whole)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def json_object(data: bytes, what: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    """``data`` as a JSON object with every ``required`` field and no field but those and
    ``optional`` ones; BusPayloadError otherwise."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BusPayloadError("utf8", f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        fields = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, an int of 5,000 digits; nesting
        raise BusPayloadError("json", f"{what} is not JSON ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not isinstance(fields, dict):
        raise BusPayloadError("json", f"{what} is a JSON {type(fields).__name__}, not an object")
    missing = [name for name in required if name not in fields]
    if missing:
        raise BusPayloadError("field", f"{what} lacks {', '.join(missing)}")
    extra = sorted(set(fields) - set(required) - set(optional))
    if extra:
        raise BusPayloadError("field", f"{what} has fields this release does not write: "
                                       f"{', '.join(repr(name)[:40] for name in extra[:5])}")
    return fields


def version(fields: dict, what: str, expected: int) -> None:
    """Refuse ``fields`` unless its "v" (absent: 1) is ``expected``, exactly (not True, not 1.0)."""
    found = fields.get("v", 1)
    if type(found) is not int or found != expected:
        raise BusPayloadError("version", f"{what} of version {repr(found)[:20]}; this release reads "
                                         f"version {expected}")


def name(fields: dict, field: str, what: str, rule: re.Pattern = NICK, *, optional: bool = False) -> str | None:
    """The field, a string matching ``rule`` (or None, if ``optional``)."""
    value = fields.get(field)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not rule.match(value):
        raise BusPayloadError("field", f"{what}'s {field!r} is {repr(value)[:40]}, not a name "
                                       f"(1 to {32 if rule is NICK else 64} of A-Z a-z 0-9 _ -)")
    return value


def count(fields: dict, field: str, what: str, lowest: int, highest: int) -> int:
    """The field, an int (not a bool) from ``lowest`` to ``highest``."""
    value = fields[field]
    if type(value) is not int or not lowest <= value <= highest:
        raise BusPayloadError("field", f"{what}'s {field!r} is {str(value)[:40]!r}, not an integer from "
                                       f"{lowest} to {highest}")
    return value


def read_entry(value: bytes) -> tuple[str, str | None]:
    """(host, target) of a nick's directory entry, ``{"host": ..., "target": ... or null}``;
    BusPayloadError if it is not one this release reads (kind ``version``: another release's)."""
    if len(value) > MAX_ENTRY:
        raise BusPayloadError("length", f"a directory entry of {len(value)} bytes (at most {MAX_ENTRY})")
    fields = json_object(value, "a directory entry", ("host",), ("target", "v"))
    version(fields, "a directory entry", ENTRY_VERSION)
    return name(fields, "host", "a directory entry", TOKEN), name(fields, "target", "a directory entry",
                                                                  optional=True)


def read_kv_key(prefix: str, subject: str) -> str:
    """The key of a KV change on ``subject`` (``prefix`` is ``$KV.<bucket>.``): a nick or host id.
    Anyone may publish to ``$KV.<bucket>.a.b`` or ``$KV.<bucket>.%%``: such a key names no one."""
    key = subject[len(prefix):] if subject.startswith(prefix) else subject
    if not TOKEN.match(key):
        raise BusPayloadError("key", f"a KV key {key[:70]!r} is not a nick or host id")
    return key


class Complaints:
    """Refused payloads in the log: the first of each (what, kind) whole, the rest counted and
    summed up at most every ``every`` seconds (when the next one comes). ``say(line)`` writes it."""

    def __init__(self, say: Callable[[str], None], every: float = COMPLAIN_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.say = say
        self.every = every
        self.clock = clock
        #: (what, kind) -> [refused in all, refused since last said, when last said]
        self._seen: dict[tuple[str, str], list] = {}

    @property
    def refused(self) -> int:
        return sum(seen[0] for seen in self._seen.values())

    def refused_of(self, what: str) -> dict[str, int]:
        return {kind: seen[0] for (of, kind), seen in self._seen.items() if of == what}

    def __call__(self, what: str, exc: BusPayloadError, where: str) -> None:
        """``what`` (e.g. "stream message") at ``where`` (e.g. "seq 17") was refused for ``exc``."""
        key = (what, exc.kind)
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None:
            self._seen[key] = [1, 0, now]
            self.say(f"{what} {where} is not chatd's: {exc}; skipped (more refused for {exc.kind!r} are "
                     f"counted, and summed up at most every {self.every:g} s)")
            return
        seen[0] += 1
        seen[1] += 1
        if now - seen[2] >= self.every:
            self.say(f"{what}: {seen[1]} more refused for {exc.kind!r} (the latest {where}: {exc}); "
                     f"{seen[0]} in all")
            seen[1], seen[2] = 0, now


#: The most messages one replay (chatd.bus.sessions) gives back; more are asked for in parts.
MAX_REPLAY = 2_000
#: A replay's last sequence that means "to the stream's end".
NO_END = 2 ** 63 - 1
#: A session's entry's version (chatd.keeper): its "v" field.
SESSION_VERSION = 1
#: The largest session entry (an honest one is under 300 bytes).
MAX_SESSION = 1024
#: A session entry's fields (chatd.keeper.SessionEntry names them).
SESSION_FIELDS = ("v", "host", "nick", "target", "handled", "inc", "sent", "n", "seq", "pinc", "pk")
def read_session(value: bytes) -> dict:
    """A session's entry in the sessions bucket as its fields; BusPayloadError if it is not one
    this release writes (``ended``: a session that ended, whose entry is kept empty)."""
    if not value:
        raise BusPayloadError("ended", "the session ended")
    if len(value) > MAX_SESSION:
        raise BusPayloadError("length", f"a session entry of {len(value)} bytes (at most {MAX_SESSION})")
    fields = json_object(value, "a session entry", SESSION_FIELDS)
    version(fields, "a session entry", SESSION_VERSION)
    name(fields, "host", "a session entry", TOKEN)
    name(fields, "nick", "a session entry", optional=True)
    name(fields, "target", "a session entry", optional=True)
    for field in ("handled", "inc", "sent", "n", "seq", "pinc", "pk"):
        count(fields, field, "a session entry", 0, 2 ** 64 - 1)  # the journal's 8 bytes
    return fields
