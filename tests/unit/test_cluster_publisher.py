"""Publishing forwards (chatd.forwards.Publisher) as a state machine: outboxes in, publishes
out, one in flight per sender; acknowledgments in, outboxes emptied."""

import pytest

from chatd.bus import Published
from chatd.forwards import MAX_BATCH, Publisher, decode_forwards
from chatd.room import Forward, Room

from cluster_fakes import FakeBus, FakeMembers


@pytest.fixture
def side():
    bus, members = FakeBus(), FakeMembers(Room(), box_size=1 << 20)
    members.connect(1, "ann")
    return Publisher(bus, members), bus, members


def forward(k, text="hi", sender=1):
    return Forward(sender, "h2", "bob", "ann", 0xAB, k, text)


def sent(publisher, members, *forwards):
    """Forwards of a handled command, then its commit (what the server does)."""
    for each in forwards:
        publisher.forward(each)
    members.outboxes[forwards[0].sender].commit()


def test_forwards_wait_in_the_outbox_until_committed_then_go_in_one_batch(side):
    publisher, bus, members = side
    publisher.forward(forward(1, "one"))
    publisher.forward(forward(2, "two"))
    publisher.publish_next(1)
    assert bus.take() == [], "not committed: nothing leaves"
    members.outboxes[1].commit()
    publisher.publish_next(1)
    [(_, token, host, receiver, msg_id, payload)] = bus.take()
    assert (host, receiver, msg_id) == ("h2", "bob", "ann>bob:ab:1-2")
    assert [(i.k, i.text) for i in decode_forwards(1, payload)] == [(1, "one"), (2, "two")]
    assert token == (1, members.outboxes[1].committed)


def test_one_publish_in_flight_per_sender_the_next_after_the_ack(side):
    publisher, bus, members = side
    sent(publisher, members, forward(1))
    publisher.publish_next(1)
    [first] = bus.take()
    sent(publisher, members, forward(2), forward(3))
    publisher.publish_next(1)
    assert bus.take() == [], "the first is in flight"
    publisher.published(Published(first[1], 50, False))
    assert members.freed == [1] and members.outboxes[1].published == first[1][1]
    [second] = bus.take()
    assert second[4] == "ann>bob:ab:2-3"
    publisher.published(Published(second[1], 51, False))
    assert not members.outboxes[1] and publisher.in_flight == {} and bus.take() == []


def test_an_ack_of_a_publish_no_longer_in_flight_changes_nothing(side):
    publisher, bus, members = side
    sent(publisher, members, forward(1))
    publisher.publish_next(1)
    [(_, token, *_)] = bus.take()
    publisher.published(Published((1, token[1] + 999), 50, False))
    assert publisher.in_flight == {1: (token[1], 1)} and members.freed == []


def test_a_batch_stops_at_max_batch(side):
    publisher, bus, members = side
    text = "x" * (60 * 1024)
    count = MAX_BATCH // len(text) + 2
    sent(publisher, members, *[forward(k, text) for k in range(1, count + 1)])
    publisher.publish_next(1)
    [(_, token, _, _, msg_id, payload)] = bus.take()
    assert len(payload) <= MAX_BATCH and msg_id == f"ann>bob:ab:1-{len(decode_forwards(1, payload))}"
    publisher.published(Published(token, 1, False))
    [(_, _, _, _, rest_id, _)] = bus.take()
    assert rest_id.startswith(f"ann>bob:ab:{len(decode_forwards(1, payload)) + 1}-")


def test_a_member_closed_with_forwards_unacknowledged_has_them_published_from_memory(side):
    publisher, bus, members = side
    sent(publisher, members, forward(1))
    publisher.publish_next(1)
    [(_, first_token, *_)] = bus.take()
    sent(publisher, members, forward(2))
    outbox = members.outboxes[1]
    members.connected.discard(1)
    publisher.closed(1, outbox)
    assert bus.take() == [], "the batch in flight first"
    publisher.published(Published(first_token, 60, False))
    [(_, second_token, _, _, msg_id, _)] = bus.take()
    assert msg_id == "ann>bob:ab:2-2" and members.freed == [], "the outbox is the closed member's no more"
    publisher.published(Published(second_token, 61, False))
    assert bus.take() == [] and publisher.in_flight == {}


def test_without_the_outbox_a_forward_is_published_at_once(side):
    _, bus, members = side
    publisher = Publisher(bus, members, use_outbox=False)
    publisher.forward(forward(4, "bare"))
    [(_, token, host, receiver, msg_id, payload)] = bus.take()
    assert (token, host, receiver, msg_id) == (("bare", 1), "h2", "bob", "ann>bob:ab:4-4")
    assert not members.outboxes[1]
    publisher.published(Published(token, 9, False))
    assert publisher.in_flight == {} and members.freed == []


def test_a_closed_members_last_ack_lets_the_next_member_of_its_slot_publish_at_once(side):
    """A session resumed in a slot whose last client's forwards were still publishing from memory:
    the ack of the last of those publishes the new member's outbox then, not at its next commit
    (its client may be parked on an ACK that waits for exactly those forwards)."""
    publisher, bus, members = side
    sent(publisher, members, forward(1))
    publisher.publish_next(1)
    [orphan] = bus.take()
    publisher.closed(1, members.outboxes.pop(1))  # its client closed: published from memory
    members.connected.discard(1)
    members.connect(1, None)  # a new client in the same slot, with a forward of its own
    drained = []
    publisher.drained = drained.append
    sent(publisher, members, Forward(1, "h2", "dan", "cat", 0xCD, 1, "mine"))
    publisher.publish_next(1)
    assert bus.take() == [], "the orphan is in flight: the slot waits"
    publisher.published(Published(orphan[1], 60, False))
    [mine] = bus.take()
    assert mine[4] == "cat>dan:cd:1-1", "published at the orphan's ack, with no commit between"
    publisher.published(Published(mine[1], 61, False))
    assert drained == [1] and not publisher.pending(1)
