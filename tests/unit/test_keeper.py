"""The cluster's side of sessions (chatd.keeper) as a state machine: parked commands in, bus calls
out; the bus's answers in, parked commands answered. The room is the real one."""

from chatd.bus import SessionWritten
from chatd.inbound import Inbound
from chatd.keeper import Checkpoint, Keeper, sid_of
from chatd.room import Ack, Resume, Room
from chatd.sessions import digest

from cluster_fakes import FakeBus, FakeMembers


class Parking:
    """A connection as the keeper sees it: its member id, and whether it was parked."""

    def __init__(self, member_id):
        self.member_id = member_id
        self.parked = False

    def park(self):
        self.parked = True


class Answers(FakeMembers):
    """FakeMembers that records the parked commands the keeper answers."""

    def __init__(self, room):
        super().__init__(room)
        self.answered: list[tuple] = []

    def answer_parked(self, member_id, end, command, started=None):
        self.answered.append((member_id, end, command))


class Loop:
    def call_later(self, delay, call):
        call()


def keeper_with_a_session(pending=lambda member_id: False):
    room = Room()
    bus, members = FakeBus(), Answers(room)
    members.connect(1, "ann", "bob")
    room.start_session(1, "0123", digest("0123"))
    keeper = Keeper(bus, "h1", room, members, Inbound(room, members), directory=None, loop=Loop(),
                    pending=pending)
    hashed = digest("0123")
    keeper._revisions[hashed] = 5  # its entry was written at revision 5 (SESSION)
    keeper._checkpoints[hashed] = Checkpoint(0, 0, 0, 0)  # and what it had received then
    return keeper, bus, members, room, hashed


def test_an_ack_is_answered_only_once_the_entry_holds_its_count():
    keeper, bus, members, room, hashed = keeper_with_a_session()
    connection = Parking(1)
    assert keeper.parks(connection, 40, Ack(0)) and connection.parked
    [(kind, token, sid, entry, revision)] = bus.take()
    assert (kind, sid, revision, entry["host"], entry["handled"]) == ("session_put", sid_of(hashed), 5, "h1", 0)
    assert members.answered == [], "not before the cluster holds it"
    keeper.written(SessionWritten(token, sid, True, 6))
    assert members.answered == [(1, 40, Ack(0))]


def test_an_ack_waits_for_its_forwards_then_the_write():
    pending = {1}
    keeper, bus, members, room, hashed = keeper_with_a_session(pending=lambda member_id: member_id in pending)
    keeper.parks(Parking(1), 40, Ack(0))
    assert bus.take() == [], "its forwards are not all in the stream: the count would claim them"
    pending.clear()
    keeper.outbox_drained(1)
    assert [call[0] for call in bus.take()] == ["session_put"]


def test_a_resume_on_a_new_connection_and_the_old_ones_ack_both_wait_and_both_are_answered():
    """A client left its connection silently (its ACK still in the pipe) and resumed on a new one:
    the two wait on one session, and one answer must not strand the other (it did: the RESUME's
    connection waited for good, and the client's last messages with it)."""
    keeper, bus, members, room, hashed = keeper_with_a_session()
    members.connect(2)  # the new connection
    assert keeper.parks(Parking(1), 40, Ack(0))
    resume = Resume("0123", 0)
    assert keeper.parks(Parking(2), 17, resume)
    [(_, token, sid, _, _)] = bus.take()  # one write in flight
    keeper.written(SessionWritten(token, sid, True, 6))
    assert members.answered == [(1, 40, Ack(0))], "the write answers what waited when it was made"
    [(_, token, sid, _, revision)] = bus.take()
    assert revision == 6, "the RESUME, parked meanwhile, gets a write of its own"
    keeper.written(SessionWritten(token, sid, True, 7))
    assert members.answered[1:] == [(2, 17, resume)]
