"""A host whose lease may have lapsed tells every client holding a nick to move, and closes it
(chatd.fencing); a client without a nick holds nothing another host can take, and stays."""

from chatd.fencing import Fence
from chatd.room import Forward, Moved, Msg, Room

from cluster_fakes import FakeMembers


def test_every_client_with_a_nick_is_told_what_was_handled_and_closed():
    room = Room()
    room.durable_host = "h1"  # as --cluster runs it: messages go through the stream
    members = FakeMembers(room)
    members.connect(1, "ann", "bob")
    members.connect(2, "bob", "ann")
    members.connect(3)  # no nick
    for _ in range(3):
        outcome = room.handle(1, Msg("hi"))
        assert [type(f) for f in outcome.forwards] == [Forward]
    fence = Fence(room, members)
    assert not fence.fenced
    fence.lapsed(4.6)
    [outcome] = members.applied
    assert outcome.deliveries == [(1, Moved(3)), (2, Moved(0))]
    assert outcome.closes == [1, 2]
    assert fence.fenced and fence.moved == 2
    fence.renewed()
    assert not fence.fenced and fence.moved == 2
