"""Messages from other hosts (chatd.inbound) as a state machine: stream messages in, the
room's outcomes and the cursor out."""

import pytest

from chatd.bus import Delivered
from chatd.forwards import encode_forward
from chatd.inbound import Inbound
from chatd.room import Forward, From, Pair, Room

from cluster_fakes import FakeMembers


@pytest.fixture
def side():
    room = Room()
    members = FakeMembers(room)
    members.connect(1, "ann", "bob")
    room.remote_changed("bob", "h2", "ann")  # ann and bob (on h2) are paired
    inbound = Inbound(room, members, stash_limit=1000)
    inbound.start(10)
    inbound.directory_read()
    return inbound, members, room


def message(seq, *texts, sender="bob", receiver="ann", incarnation=7, first_k=1):
    payload = b"".join(encode_forward(Forward(0, "h1", receiver, sender, incarnation, first_k + i, text))
                       for i, text in enumerate(texts))
    return Delivered(seq, f"chat.h1.{receiver}", {}, payload)


def test_a_message_goes_to_its_receiver_and_the_cursor_moves_past_it(side):
    inbound, members, room = side
    inbound.delivered(message(11, "hi", "again"))
    assert members.deliveries() == [(1, From("bob", 1, "hi")), (1, From("bob", 2, "again"))]
    assert inbound.cursor == 11


def test_before_the_directory_is_read_messages_are_held_and_the_cursor_stays(side):
    _, members, room = side
    inbound = Inbound(room, members)
    assert inbound.cursor is None, "not started: the journal's cursor stays"
    inbound.start(10)
    inbound.delivered(message(11, "early"))
    inbound.delivered(message(12, "later", first_k=2))
    inbound.delivered(Delivered(13, "chat.h1.ann", {}, b"not chatd's"))
    assert members.applied == [] and inbound.cursor == 10, "skipped 13, but 11 and 12 are held"
    inbound.directory_read()
    assert members.deliveries() == [(1, From("bob", 1, "early")), (1, From("bob", 2, "later"))]
    assert inbound.cursor == 13


def test_a_full_receiver_has_its_messages_stashed_in_order_and_the_cursor_below_them(side):
    inbound, members, room = side
    members.full.add(1)
    inbound.delivered(message(11, "one"))
    inbound.delivered(message(12, "two", first_k=2))
    assert members.applied == [] and inbound.stashed == 2 and inbound.cursor == 10
    members.full.discard(1)
    inbound.delivered(message(13, "three", first_k=3))
    assert members.applied == [], "behind the stashed ones: not before them"
    inbound.wake("ann")
    assert [event.text for _, event in members.deliveries()] == ["one", "two", "three"]
    assert inbound.stashed == 0 and inbound.cursor == 13


def test_a_message_ahead_of_the_directory_waits_for_the_pairing(side):
    inbound, members, room = side
    members.connect(2, "carl", "dora")
    inbound.delivered(message(11, "soon", sender="dora", receiver="carl"))
    assert members.applied == [] and inbound.cursor == 10, "carl names dora, the pairing is not shown yet"
    room.remote_changed("dora", "h3", "carl")
    inbound.wake("carl")
    assert members.deliveries()[-1] == (2, From("dora", 1, "soon")) and inbound.cursor == 11


def test_a_stashed_message_no_one_takes_any_more_is_dropped(side):
    inbound, members, room = side
    members.full.add(1)
    inbound.delivered(message(11, "one"))
    room.handle(1, Pair("eve"))  # ann names someone else now
    members.full.discard(1)
    inbound.wake("ann")
    assert members.deliveries() == []
    assert inbound.stashed == 0 and inbound.cursor == 11


def test_a_receiver_that_takes_nothing_is_closed_past_the_stash_limit(side):
    inbound, members, room = side
    members.full.add(1)
    for seq in range(11, 30):
        inbound.delivered(message(seq, "x" * 100, first_k=seq))
        if members.closed:
            break
    [(member_id, reason)] = members.closed
    assert member_id == 1 and "from other hosts" in reason
    assert inbound.stashed == 0 and inbound.cursor == seq, "its messages are dropped: handled"


def test_a_stream_message_that_is_not_chatds_is_skipped(side):
    inbound, members, room = side
    inbound.delivered(Delivered(11, "chat.h1.ann", {}, b"garbage"))
    inbound.delivered(message(12, "after"))
    assert members.deliveries() == [(1, From("bob", 1, "after"))] and inbound.cursor == 12
