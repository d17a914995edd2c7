"""The directory across hosts (chatd.directory) as a state machine: the bus's results in,
calls to the bucket and the room's outcomes out."""

import json

import pytest

from chatd.bus import Claimed, HostChanged, NickChanged, Released, Updated
from chatd.directory import DirectoryView
from chatd.room import Failed, Ok, Paired, Room, Unpaired

from cluster_fakes import FakeBus, FakeMembers


@pytest.fixture
def side():
    room = Room()
    bus, members = FakeBus(), FakeMembers(room)
    incarnations = iter(range(1000, 2000))
    directory = DirectoryView(bus, "h1", room, members, incarnation=lambda: next(incarnations))
    return directory, bus, members, room


def entry(host, target=None):
    return json.dumps({"host": host, "target": target}).encode()


def read_empty(directory, bus):
    assert directory.read()
    bus.take()


def test_a_nick_is_the_members_only_once_the_bucket_says_so(side):
    directory, bus, members, room = side
    read_empty(directory, bus)
    members.connect(1)
    assert directory.claim(room.members[1], 42, "ann")
    assert bus.take() == [("claim", 1, "ann", {"host": "h1", "target": None})]
    assert room.members[1].nick is None, "parked: the room has not taken it yet"
    directory.claimed(Claimed(1, "ann", True, 5, None))
    [(member_id, end, outcome)] = members.parked_answers
    assert (member_id, end) == (1, 42) and outcome.deliveries == [(1, Ok("NICK", "ann"))]
    member = room.members[1]
    assert (member.nick, member.incarnation, member.sent) == ("ann", 1000, 0)
    assert 1 in outcome.changed
    assert directory.own == {"ann": (None, 5)}


def test_a_nick_another_host_won_is_refused_and_the_room_unchanged(side):
    directory, bus, members, room = side
    members.connect(1)
    directory.claim(room.members[1], 7, "ann")
    directory.claimed(Claimed(1, "ann", False, 3, "h2"))
    [(_, end, outcome)] = members.parked_answers
    assert end == 7 and outcome.deliveries == [(1, Failed("nick-taken"))]
    assert room.members[1].nick is None and directory.own == {}


def test_what_the_room_answers_itself_is_not_claimed(side):
    directory, bus, members, room = side
    members.connect(1, "ann")
    members.connect(2)
    room.remote_changed("bob", "h2", None)
    assert not directory.claim(room.members[2], 1, "ann"), "held here"
    assert not directory.claim(room.members[2], 1, "bob"), "held on another host, as far as shown"
    assert not directory.claim(room.members[2], 1, "no good"), "bad-name"
    assert not directory.claim(room.members[1], 1, "ann"), "its own: OK again"
    members.connect(3)
    assert directory.claim(room.members[2], 1, "carl")
    assert not directory.claim(room.members[3], 1, "carl"), "being claimed: the second is told nick-taken"
    assert [call[0] for call in bus.take()] == ["claim"]


def test_taking_a_new_nick_releases_the_old_one_at_its_revision(side):
    directory, bus, members, room = side
    read_empty(directory, bus)
    members.connect(1)
    directory.claim(room.members[1], 1, "ann")
    directory.claimed(Claimed(1, "ann", True, 5, None))
    directory.claim(room.members[1], 2, "anna")
    directory.claimed(Claimed(1, "anna", True, 6, None))
    assert room.members[1].nick == "anna" and room.members[1].incarnation == 1001
    assert ("release", "ann", 5) in bus.take()


def test_a_claim_answered_after_its_member_left_is_given_back(side):
    directory, bus, members, room = side
    members.connect(1)
    directory.claim(room.members[1], 1, "ann")
    members.connected.discard(1)
    directory.forget_claim(1)
    bus.take()
    directory.claimed(Claimed(1, "ann", True, 9, None))
    assert bus.take() == [("release", "ann", 9)] and members.parked_answers == []


def test_one_call_per_nick_what_changes_meanwhile_goes_after_the_answer(side):
    directory, bus, members, room = side
    read_empty(directory, bus)
    members.connect(1)
    directory.claim(room.members[1], 1, "ann")
    bus.take()
    directory.claimed(Claimed(1, "ann", True, 5, None))
    room.members[1].target = "bob"
    directory.sync(room.members[1])
    assert bus.take() == [("update", 1, "ann", {"host": "h1", "target": "bob"}, 5)]
    room.members[1].target = "carl"
    directory.sync(room.members[1])
    assert bus.take() == [], "the update for bob is in flight"
    directory.updated(Updated(1, "ann", True, 6))
    assert bus.take() == [("update", 1, "ann", {"host": "h1", "target": "carl"}, 6)], "then carl"
    directory.release("ann")
    assert bus.take() == [], "still in flight"
    members.connected.discard(1)
    directory.updated(Updated(1, "ann", True, 7))
    assert bus.take() == [("release", "ann", 7)]
    directory.released(Released("ann", True))
    assert directory.own == {}


def test_an_update_that_lost_claims_the_nick_again(side):
    directory, bus, members, room = side
    read_empty(directory, bus)
    members.connect(1)
    directory.claim(room.members[1], 1, "ann")
    directory.claimed(Claimed(1, "ann", True, 5, None))
    room.members[1].target = "bob"
    directory.sync(room.members[1])
    bus.take()
    directory.updated(Updated(1, "ann", False, None))
    assert bus.take() == [("claim", ("sync", 1), "ann", {"host": "h1", "target": "bob"})]
    directory.claimed(Claimed(("sync", 1), "ann", True, 8, None))
    assert directory.own == {"ann": ("bob", 8)} and members.parked_answers[1:] == []


def test_other_hosts_members_pair_with_ours_while_their_host_lives(side):
    directory, bus, members, room = side
    members.connect(1, "ann", "bob")
    assert directory.nick_changed(NickChanged("bob", entry("h2", "ann"), 3)) is None, "h2 not known alive yet"
    assert "bob" not in room.remote
    directory.host_changed(HostChanged("h2", True))
    assert members.deliveries() == [(1, Paired("bob"))]
    assert directory.nick_changed(NickChanged("bob", entry("h2", "ann"), 4)) == "ann", \
        "ann's messages from bob may go now"
    directory.host_changed(HostChanged("h2", False))
    assert members.deliveries()[-1] == (1, Unpaired("bob")) and room.members[1].peer is None
    directory.host_changed(HostChanged("h2", True))
    assert members.deliveries()[-1] == (1, Paired("bob"))
    directory.nick_changed(NickChanged("bob", None, 5))
    assert members.deliveries()[-1] == (1, Unpaired("bob")) and "bob" not in directory.entries


def test_an_entry_that_is_not_chatds_is_ignored(side):
    directory, bus, members, room = side
    for value in (b"not json", b"[1, 2]", b'"a string"', b'{"target": "x"}'):
        assert directory.nick_changed(NickChanged("eve", value, 1)) is None
    assert directory.entries == {} and room.remote == {}


def test_reading_the_directory_releases_our_entries_no_one_holds_and_puts_back_the_held(side):
    directory, bus, members, room = side
    members.connect(1, "ann")  # restored: its entry must be there
    directory.nick_changed(NickChanged("ghost", entry("h1"), 4))  # an earlier life's
    directory.nick_changed(NickChanged("carl", entry("h2", "ann"), 2))
    assert bus.take() == [], "nothing is released before the directory is read whole"
    assert directory.read()
    assert sorted(bus.take()) == [("claim", ("sync", 1), "ann", {"host": "h1", "target": None}),
                                  ("release", "ghost", 4)]
    assert directory.entries == {"carl": ("h2", "ann")}
    assert not directory.read(), "once"


def test_our_own_entry_seen_with_no_one_holding_it_is_released(side):
    directory, bus, members, room = side
    read_empty(directory, bus)
    directory.nick_changed(NickChanged("old", entry("h1"), 3))
    assert bus.take() == [("release", "old", 3)]
    members.connect(1, "ann")
    directory.nick_changed(NickChanged("ann", entry("h1"), 4))
    assert bus.take() == [] and directory.own["ann"] == (None, 4)


def test_a_nick_taken_over_by_another_host_is_a_new_member_to_its_peer_here(side):
    """bob's host was cut off and fenced (its lease lapsed); bob connected to h3 and took his nick
    back there. ann, paired with the old bob, hears UNPAIRED then PAIRED: what she sent the old
    one went to h2."""
    directory, bus, members, room = side
    members.connect(1, "ann", "bob")
    directory.host_changed(HostChanged("h2", True))
    directory.host_changed(HostChanged("h3", True))
    directory.nick_changed(NickChanged("bob", entry("h2", "ann"), 3))
    assert members.deliveries() == [(1, Paired("bob"))]
    directory.host_changed(HostChanged("h2", False))
    assert members.deliveries()[1:] == [(1, Unpaired("bob"))], "h2's members leave with its lease"
    members.applied.clear()
    directory.nick_changed(NickChanged("bob", entry("h3", "ann"), 7))
    assert members.deliveries() == [(1, Paired("bob"))]
    assert room.members[1].peer.host == "h3"
    directory.nick_changed(NickChanged("bob", entry("h3", "ann"), 8))
    assert members.deliveries()[1:] == [], "the same holder again: nothing to tell"


def test_a_session_taken_over_from_a_live_host_goes_on_paired_silently(side):
    """bob's session was resumed on h3 while h2 lives (his connection was cut, the load balancer
    sent him to h3): the same member, so ann hears nothing and her messages go to h3."""
    directory, bus, members, room = side
    members.connect(1, "ann", "bob")
    directory.host_changed(HostChanged("h2", True))
    directory.host_changed(HostChanged("h3", True))
    directory.nick_changed(NickChanged("bob", entry("h2", "ann"), 3))
    directory.nick_changed(NickChanged("bob", entry("h3", "ann"), 7))
    assert members.deliveries() == [(1, Paired("bob"))]
    assert room.members[1].peer.host == "h3"



def test_a_nick_taken_from_a_host_whose_lease_is_lapsing_is_a_new_member_though_the_host_seems_alive(side):
    """The race the partition test found: h2 was cut off and fenced, its lease expired in NATS,
    and bob took his nick back on h3 before this host's own look at h2's lease said it was gone.
    The change itself says h2 had not renewed for a lease (``lapsing``): ann hears UNPAIRED
    then PAIRED, and knows what she sent the old bob may be lost, as when h2 is seen gone first."""
    directory, bus, members, room = side
    members.connect(1, "ann", "bob")
    directory.host_changed(HostChanged("h2", True))
    directory.host_changed(HostChanged("h3", True))
    directory.nick_changed(NickChanged("bob", entry("h2", "ann"), 3))
    members.applied.clear()
    directory.nick_changed(NickChanged("bob", entry("h3", "ann"), 7, lapsing=frozenset({"h2"})))
    assert members.deliveries() == [(1, Unpaired("bob")), (1, Paired("bob"))]
    assert room.members[1].peer.host == "h3"
