"""The server's one interface to other hosts (chatd.across): the single-host one and the
cluster both carry every hook, and the cluster hands the bus's results to their owners."""

import json
from types import SimpleNamespace

import pytest

from chatd.across import AcrossHosts, SingleHost
from chatd.bus import Delivered, DirectoryComplete, HostChanged, NickChanged
from chatd.cluster import Cluster
from chatd.forwards import encode_forward
from chatd.room import Forward, From, Member, Nick, Room
from fdkeep.errors import Error

from cluster_fakes import FakeBus, FakeMembers

HOOKS = [name for name in vars(AcrossHosts) if not name.startswith("_")]


def test_every_hook_is_declared_and_carried_by_both_sides():
    assert {"cursor", "start", "holds_back", "parks", "has_room", "forward", "committed", "nick_left", "closed",
            "wake", "status", "close"} <= set(HOOKS)
    for name in HOOKS:
        assert hasattr(SingleHost, name) and hasattr(Cluster, name), name


def test_a_single_host_parks_nothing_and_commits_no_cursor():
    single = SingleHost()
    connection = SimpleNamespace(member_id=1)
    assert not single.parks(connection, 3, Nick("ann")) and not single.holds_back(connection)
    assert single.has_room(connection, Member(1)) and single.cursor is None and single.status() is None


class FakeLoop:
    def __init__(self):
        self.watched = {}

    def add(self, fd, mask, callback):
        self.watched[fd] = callback


class Parkable(SimpleNamespace):
    def park(self):
        self.parked = True


@pytest.fixture
def cluster():
    room, bus, loop = Room(), FakeBus(), FakeLoop()
    members = FakeMembers(room)
    return Cluster(bus, "h1", room, members, loop), bus, members, room, loop


def test_a_journal_without_outboxes_cannot_join(cluster):
    made, *_ = cluster
    with pytest.raises(Error) as raised:
        made.start(SimpleNamespace(box_size=0, cursor=0))
    assert raised.value.code == "single-host-journal"


def test_a_member_restored_paired_across_hosts_waits_for_the_directory_then_goes_on(cluster):
    made, bus, members, room, loop = cluster
    room.restore([Member(1, nick="ann", target="bob", remote_paired=True)])
    members.connected.add(1)
    members.outboxes[1] = None
    connection = Parkable(member_id=1, parked=False, forwards=None)
    made.start(SimpleNamespace(box_size=4096, cursor=5))
    assert bus.started_at == 5 and made.cursor == 5
    assert made.holds_back(connection) and connection.parked
    forward = Forward(0, "h1", "ann", "bob", 7, 1, "while you were away")
    bus.waiting = [Delivered(6, "chat.h1.ann", {}, encode_forward(forward)),
                   HostChanged("h2", True),
                   NickChanged("bob", json.dumps({"host": "h2", "target": "ann"}).encode(), 2)]
    loop.watched[-1](None)
    assert members.resumed == [] and members.deliveries() == [] and made.cursor == 5, "the directory is not read"
    bus.waiting = [DirectoryComplete()]
    loop.watched[-1](None)
    assert members.resumed == [1]
    assert (1, From("bob", 1, "while you were away")) in members.deliveries() and made.cursor == 6
    assert not made.holds_back(connection), "read: nothing waits any more"
    assert made.status()["members_elsewhere"] == 1 and made.status()["hosts_alive"] == ["h2"]


def test_messages_waiting_for_a_pairing_made_on_this_host_go_once_it_is_committed(cluster):
    """bob was on h2 and was cut off; his last messages for ann (here) came after ann had heard
    he was gone, so they wait for the pairing. bob comes back *here*: the pairing is made by this
    host's room, not shown by the directory, and its commit must let them go (they waited for good)."""
    made, bus, members, room, loop = cluster
    members.connect(1, "ann", "bob")
    made.start(SimpleNamespace(box_size=4096, cursor=0))
    forward = Forward(0, "h1", "ann", "bob", 7, 1, "sent before the cut")
    bus.waiting = [DirectoryComplete(), Delivered(6, "chat.h1.ann", {}, encode_forward(forward))]
    loop.watched[-1](None)
    assert members.deliveries() == [] and made.inbound.stashed == 1, "ann is paired with no bob: it waits"
    members.connect(2, "bob", "ann")  # bob, back on this host: paired with ann by the room
    assert room.members[1].peer is room.members[2]
    made.committed([SimpleNamespace(member_id=1, forwards=None), SimpleNamespace(member_id=2, forwards=None)])
    assert members.deliveries()[-1] == (1, From("bob", 1, "sent before the cut")) and made.inbound.stashed == 0
    assert made.cursor == 6
