"""Sessions kept in the cluster, on the bus thread: their bucket, and a receiver's messages read again.

Imported by the bus thread only, as :mod:`chatd.bus.engine` is. chatd's side is
:mod:`chatd.keeper`, which says what the entries mean. Here:

- the **sessions bucket** (``chatd_sessions``, one revision a key, entries kept a
  day after their last write): :meth:`Bus.session_get`, and
  :meth:`Bus.session_put`, a create (revision 0) or a compare-and-set on the
  revision the caller holds. That revision is the session's *fence*: a host
  whose write fails on it has lost the session to another.
- **a receiver's messages again** (:meth:`Bus.replay`): the stream's messages on
  ``chat.*.<receiver>`` from one sequence to another, in order, fetched one by
  one with the stream's "next message on this subject" (``STREAM.MSG.GET`` with
  ``next_by_subj``): no consumer is made, nothing is left behind, and a retry
  starts again from the first. A range holds what a session's client had not
  acknowledged when its host was lost: tens of messages, not thousands.

Work on one key runs one job at a time, in call order, each retried until
answered (:func:`~chatd.bus.tasks.retry`), as the directory's nick work is.
"""

from __future__ import annotations

import nats.errors
import nats.js.errors

from .checks import describe
from .directory import EngineSide
from .payloads import MAX_REPLAY
from .results import Replayed, SessionRead, SessionWritten
from .tasks import Lanes, retry


class SessionWork:
    """The sessions bucket and replays, as chatd asks for them."""

    def __init__(self, engine: EngineSide):
        self.engine = engine
        self.settings = engine.settings
        self.bucket = None  # the KV bucket, once the engine's setup found it right
        self._work = Lanes(engine.spawn, self._job)

    def use_bucket(self, bucket) -> None:
        self.bucket = bucket

    def queue(self, command: tuple) -> None:
        """A get, put or replay from chatd: after the ones before it on the same key."""
        self._work.add((command[0] == "replay", command[2]), command)

    async def _job(self, command: tuple) -> None:
        kind, token, key = command[:3]

        async def attempt(tries: int):
            if kind == "session_get":
                return await self._get(token, key)
            if kind == "session_put":
                return await self._put(token, key, command[3], command[4], tries)
            return await self._replay(token, key, command[3], command[4])

        def failed(exc: Exception) -> None:
            if not isinstance(exc, nats.errors.TimeoutError):
                self.engine.say("kv-retrying", f"a session operation ({kind}) failed, retrying: {describe(exc)}")

        self.engine.put(await retry(attempt, failed, gate=self.engine.ready))

    async def _get(self, token, sid: str) -> SessionRead:
        try:
            entry = await self.bucket.get(sid)
        except nats.js.errors.KeyNotFoundError:
            return SessionRead(token, sid, None, 0)
        return SessionRead(token, sid, entry.value, entry.revision)

    async def _put(self, token, sid: str, value: bytes, revision: int, attempt: int) -> SessionWritten:
        try:
            if revision:
                return SessionWritten(token, sid, True, await self.bucket.update(sid, value, last=revision))
            return SessionWritten(token, sid, True, await self.bucket.create(sid, value))
        except nats.js.errors.KeyWrongLastSequenceError:
            pass
        # Lost the compare-and-set, or an earlier attempt won it and only its answer was lost.
        try:
            entry = await self.bucket.get(sid)
        except nats.js.errors.KeyNotFoundError:
            return SessionWritten(token, sid, False, 0)
        if attempt and entry.value == value:
            return SessionWritten(token, sid, True, entry.revision)
        return SessionWritten(token, sid, False, entry.revision)

    async def _replay(self, token, receiver: str, first: int, last: int) -> Replayed:
        js, stream = self.engine.js, self.settings.stream
        subject = f"chat.*.{receiver}"
        found, seq = [], max(first, 1)
        while seq <= last and len(found) < MAX_REPLAY:
            try:
                msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                break  # none on the subject from seq on
            if msg.seq > last:
                break
            found.append((msg.seq, msg.subject, bytes(msg.data or b"")))
            seq = msg.seq + 1
        return Replayed(token, receiver, tuple(found))
