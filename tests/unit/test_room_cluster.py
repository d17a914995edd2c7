"""The room across hosts, pure: the directory's members in, forwards and events out."""

from chatd.room import Forward, From, Member, Msg, Nick, Pair, Paired, Resumed, Room, Unpaired, Users, Who


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


# -- sessions kept in the cluster (chatd.keeper) ---------------------------------------------
def test_a_session_takes_what_the_stream_holds_for_it_whatever_its_target_so_n_follows_the_stream():
    room = room_with_ann_targeting()
    room.start_session(1, "token", b"digest")
    assert room.receive("ann", "bob", 7, 1, "early").deliveries == [(1, From("bob", 1, "early"))], \
        "not waiting for the directory: the sender's host forwarded it paired"
    room.handle(1, Pair("carl"))
    assert room.receive("ann", "bob", 7, 2, "late").deliveries == [(1, From("bob", 2, "late"))], \
        "sent while paired, taken after ann named carl: a host reading the stream again gives the same n"
    assert room.receive("ann", "bob", 7, 2, "late").deliveries == [], "a repeat is still dropped"


def test_a_session_adopted_from_another_host_goes_on_with_its_counts_and_its_peer_here_silently():
    room = Room()
    room.durable_host = "h1"  # as in a cluster: a message to bob goes through the stream
    room.join(5)
    room.handle(5, Nick("bob"))
    room.handle(5, Pair("ann"))
    room.remote_changed("ann", "h0", "bob")  # ann on the lost host h0, paired with bob here
    assert room.members[5].peer.nick == "ann"
    room.join(9)  # ann's client, reconnected here
    outcome = room.adopt_session(9, b"digest", "ann", "bob", handled=12, received=30, incarnation=111, sent=10,
                                 peer_incarnation=7, last_k=30)
    ann = room.members[9]
    assert outcome.deliveries == [(9, Resumed("ann", "bob", 12))], "bob hears nothing: he was paired with ann"
    assert ann.peer is room.members[5] and room.members[5].peer is ann and "ann" not in room.remote
    assert (ann.received, ann.sent, ann.incarnation, ann.last_k) == (30, 10, 111, 30)
    assert room.handle(9, Msg("back")).forwards[0].k == 11, "its next message gets the next k of its incarnation"
    assert room.receive("ann", "bob", 7, 30, "seen").deliveries == [] and room.session(b"digest") is ann


def test_a_member_whose_session_moved_away_becomes_remote_and_its_peer_here_stays_paired():
    room = Room()
    for member_id, nick, peer in ((1, "ann", "bob"), (2, "bob", "ann")):
        room.join(member_id)
        room.handle(member_id, Nick(nick))
        room.handle(member_id, Pair(peer))
    room.start_session(1, "token", b"digest")
    outcome = room.move_away(1, "h2")
    assert outcome.deliveries == [], "bob is not told: ann chats on from h2"
    bob = room.members[2]
    assert 1 not in room.members and room.session(b"digest") is None and room.remote["ann"].host == "h2"
    assert bob.peer is room.remote["ann"] and bob.remote_paired
    assert room.handle(2, Msg("still here")).forwards[0].host == "h2"
