"""A small fake bus and a fake server side for the cluster's state machines (chatd.directory,
chatd.inbound, chatd.forwards): what they asked for is recorded, and a test answers with the
bus's own result dataclasses. The room is the real one."""

from __future__ import annotations

import json

from chatd.room import Outcome, Room
from chatd.rings import Outbox


class FakeBus:
    """Records every call; the results are the test's to hand back."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.waiting: list = []  # results the next results() hands over
        self.started_at: int | None = None

    def fileno(self):
        return -1

    def start(self, cursor):
        self.started_at = cursor

    def results(self):
        results, self.waiting = self.waiting, []
        return results

    def status(self):
        return {}

    def close(self):
        pass

    def claim(self, token, nick, value):
        self.calls.append(("claim", token, nick, json.loads(value)))

    def update(self, token, nick, value, revision):
        self.calls.append(("update", token, nick, json.loads(value), revision))

    def release(self, nick, revision):
        self.calls.append(("release", nick, revision))

    def publish(self, token, to_host, receiver, msg_id, payload):
        self.calls.append(("publish", token, to_host, receiver, msg_id, payload))

    def session_get(self, token, sid):
        self.calls.append(("session_get", token, sid))

    def session_put(self, token, sid, value, revision):
        self.calls.append(("session_put", token, sid, json.loads(value) if value else None, revision))

    def take_nick(self, token, nick, value):  # Bus.take: named apart from take() below
        self.calls.append(("take", token, nick, json.loads(value)))

    def replay(self, token, receiver, first, last):
        self.calls.append(("replay", token, receiver, first, last))

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


class FakeMembers:
    """The server's side (chatd.across.ServedMembers): connected members, their outboxes and
    output room, and what was asked of it."""

    def __init__(self, room: Room, box_size: int = 4096):
        self.room = room
        self.box_size = box_size
        self.connected: set[int] = set()
        self.outboxes: dict[int, Outbox] = {}
        self.full: set[int] = set()  # members whose output ring has no room
        self.applied: list[Outcome] = []
        self.parked_answers: list[tuple[int, int, Outcome]] = []
        self.resumed: list[int] = []
        self.freed: list[int] = []
        self.closed: list[tuple[int, str]] = []

    def connect(self, member_id: int, nick: str | None = None, target: str | None = None) -> None:
        """A member joins the room here (taking ``nick`` locally) and is connected."""
        from chatd.room import Nick, Pair

        self.room.join(member_id)
        if nick is not None:
            self.room.handle(member_id, Nick(nick))
        if target is not None:
            self.room.handle(member_id, Pair(target))
        self.connected.add(member_id)
        self.outboxes[member_id] = Outbox(memoryview(bytearray(self.box_size)))

    def deliveries(self) -> list:
        return [delivery for outcome in self.applied for delivery in outcome.deliveries]

    # -- ServedMembers --------------------------------------------------------------
    def is_connected(self, member_id):
        return member_id in self.connected

    def holds(self, member_id):
        return member_id in self.connected

    def connected_ids(self):
        return sorted(self.connected)

    def detached_outboxes(self):
        return []

    def outbox(self, member_id):
        return self.outboxes.get(member_id) if member_id in self.connected else None

    def output_has_room(self, member_id):
        return member_id not in self.full

    def apply(self, outcome):
        self.applied.append(outcome)

    def resume_parked(self, member_id, end, outcome):
        self.parked_answers.append((member_id, end, outcome))

    def resume(self, member_id):
        self.resumed.append(member_id)

    def outbox_freed(self, member_id):
        self.freed.append(member_id)

    def close(self, member_id, reason):
        self.closed.append((member_id, reason))
        self.connected.discard(member_id)
