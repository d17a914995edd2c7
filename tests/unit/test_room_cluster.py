"""The room across hosts, pure: the directory's members in, forwards and events out."""

from chatd.room import Forward, From, Member, Msg, Nick, Pair, Paired, Room, Unpaired, Users, Who


def room_with_ann_targeting(remote_nick="bob"):
    room = Room()
    room.join(1)
    room.handle(1, Nick("ann"))
    room.members[1].incarnation = 111
    room.handle(1, Pair(remote_nick))
    return room


def test_a_local_member_pairs_with_a_remote_one_and_forwards_numbered_messages():
    room = room_with_ann_targeting()
    assert room.remote_changed("bob", "h2", "ann").deliveries == [(1, Paired("bob"))]
    first = room.handle(1, Msg("hi"))
    assert first.forwards == [Forward(1, "h2", "bob", "ann", 111, 1, "hi")] and first.deliveries == []
    assert first.changed == {1}, "k is committed with the message"
    assert room.handle(1, Msg("again")).forwards[0].k == 2
    assert room.members[1].remote_paired


def test_forwarded_messages_are_numbered_once_each_and_repeats_dropped():
    room = room_with_ann_targeting()
    room.remote_changed("bob", "h2", "ann")
    assert room.receive("ann", "bob", 7, 1, "one").deliveries == [(1, From("bob", 1, "one"))]
    assert room.receive("ann", "bob", 7, 1, "one").deliveries == [], "seen: dropped"
    assert room.receive("ann", "bob", 7, 2, "two").deliveries == [(1, From("bob", 2, "two"))]
    assert room.receive("ann", "bob", 9, 1, "new life").deliveries == [(1, From("bob", 3, "new life"))], \
        "a new incarnation of bob counts from its own k"
    assert room.receive("nobody", "bob", 9, 2, "x").deliveries == []
    assert room.receive("ann", "carl", 1, 1, "x").deliveries == [], "ann does not name carl"


def test_a_message_that_outruns_the_directory_waits_for_it():
    room = room_with_ann_targeting()
    assert room.receive("ann", "bob", 7, 1, "early") is None, "ann names bob; the pairing is not seen yet"
    room.remote_changed("bob", "h2", "ann")
    assert room.receive("ann", "bob", 7, 1, "early").deliveries == [(1, From("bob", 1, "early"))]


def test_the_remote_side_leaving_or_pairing_elsewhere_unpairs():
    room = room_with_ann_targeting()
    room.remote_changed("bob", "h2", "ann")
    assert room.remote_changed("bob", "h2", "zed").deliveries == [(1, Unpaired("bob"))]
    assert room.remote_changed("bob", "h2", "ann").deliveries == [(1, Paired("bob"))]
    assert room.remote_gone("bob").deliveries == [(1, Unpaired("bob"))]
    assert room.handle(1, Msg("x")).deliveries[0][1].code == "not-paired"


def test_leaving_locally_tells_no_remote_member_directly():
    room = room_with_ann_targeting()
    room.remote_changed("bob", "h2", "ann")
    outcome = room.handle(1, Pair("zed"))
    assert [event for _, event in outcome.deliveries if isinstance(event, Unpaired)] == [], \
        "bob's host learns it from the directory"
    assert room.remote["bob"].peer is None


def test_nicks_held_elsewhere_are_taken_and_who_lists_everyone():
    room = room_with_ann_targeting()
    room.remote_changed("bob", "h2", "ann")
    room.remote_changed("cy", "h3", "di")
    room.remote_changed("di", "h2", "cy")
    room.join(2)
    assert not room.nick_free(2, "bob") and room.nick_free(2, "eve") and not room.nick_free(2, "bad name")
    assert room.handle(2, Nick("bob")).deliveries[0][1].code == "nick-taken"
    assert room.handle(2, Who()).deliveries == [(2, Users((("ann", "bob"), ("bob", "ann"), ("cy", "di"),
                                                           ("di", "cy"))))]


def test_the_directory_echoing_our_own_members_changes_nothing():
    room = room_with_ann_targeting()
    assert room.remote_changed("ann", "h1", "bob").deliveries == []
    assert "ann" not in room.remote


def test_a_restore_re_pairs_with_a_remote_member_silently_and_keeps_the_counts():
    room = Room()
    room.restore([Member(4, nick="ann", target="bob", received=5, remote_paired=True,
                         peer_incarnation=7, last_k=5)])
    assert room.remote_changed("bob", "h2", "ann").deliveries == [], "paired before the crash: no PAIRED"
    assert room.receive("ann", "bob", 7, 5, "seen").deliveries == []
    assert room.receive("ann", "bob", 7, 6, "next").deliveries == [(4, From("bob", 6, "next"))]
    assert room.directory_complete().deliveries == []


def test_a_restore_whose_remote_peer_is_gone_says_so_once_the_directory_is_complete():
    room = Room()
    room.restore([Member(4, nick="ann", target="bob", received=5, remote_paired=True)])
    outcome = room.directory_complete()
    assert outcome.deliveries == [(4, Unpaired("bob"))] and outcome.changed == {4}
    assert room.members[4].received == 0
    assert room.remote_changed("bob", "h2", "ann").deliveries == [(4, Paired("bob"))], "a new pairing"


def test_self_pair_and_an_empty_message_change_nothing_across_hosts():
    """Refused as on one host: the remote pairing stays (the directory is not touched) and
    no k is spent on a message that is not sent."""
    room = room_with_ann_targeting()
    room.remote_changed("bob", "h2", "ann")
    refused = room.handle(1, Pair("ann"))
    assert refused.deliveries[0][1].code == "self-pair" and refused.changed == set()
    empty = room.handle(1, Msg(""))
    assert empty.deliveries[0][1].code == "empty-message" and empty.forwards == [] and empty.changed == set()
    assert room.members[1].target == "bob" and room.remote["bob"].peer is room.members[1]
    assert room.handle(1, Msg("hi")).forwards == [Forward(1, "h2", "bob", "ann", 111, 1, "hi")]


def test_with_a_durable_host_a_message_to_a_member_of_this_host_goes_through_the_stream():
    room = room_with_ann_targeting("cid")
    room.durable_host = "h1"
    room.join(2)
    room.handle(2, Nick("cid"))
    room.members[2].incarnation = 222
    assert room.handle(2, Pair("ann")).deliveries[-2:] == [(2, Paired("ann")), (1, Paired("cid"))]
    sent = room.handle(1, Msg("hi"))
    assert sent.deliveries == [] and sent.forwards == [Forward(1, "h1", "cid", "ann", 111, 1, "hi")], \
        "told only once the stream has it: as a forward to this very host"
    assert room.receive("cid", "ann", 111, 1, "hi").deliveries == [(2, From("ann", 1, "hi"))]
    assert room.receive("cid", "ann", 111, 1, "hi").deliveries == [], "a repeat from the stream: dropped"
    room.handle(1, Pair("zed"))
    assert room.receive("cid", "ann", 111, 2, "late") is None, \
        "ann paired elsewhere while cid still names her: it waits, as a message across hosts does"
    room.handle(2, Pair("dee"))
    assert room.receive("cid", "ann", 111, 2, "late").deliveries == [], "cid names ann no longer: dropped"
