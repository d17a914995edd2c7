"""The room's rules, pure: lines in, actions out."""

from chatd.lines import LINE_TOO_LONG
from chatd.room import Member, Room, Send


def say(room, member_id, line):
    return room.handle(member_id, line.encode())


def texts(actions):
    return [(a.member_id, a.text) if isinstance(a, Send) else ("close", a.member_id) for a in actions]


def paired_room():
    room = Room()
    room.join(1)
    room.join(2)
    say(room, 1, "NICK A")
    say(room, 1, "PAIR B")
    say(room, 2, "NICK B")
    return room, texts(say(room, 2, "PAIR A"))


def test_pairing_is_announced_to_both_after_the_ok():
    _, actions = paired_room()
    assert actions == [(2, "OK PAIR A"), (2, "PAIRED A"), (1, "PAIRED B")]


def test_messages_are_numbered_per_receiver():
    room, _ = paired_room()
    assert texts(say(room, 1, "MSG hi there")) == [(2, "FROM A 1 hi there")]
    assert texts(say(room, 1, "MSG again")) == [(2, "FROM A 2 again")]
    assert texts(say(room, 2, "MSG back")) == [(1, "FROM B 1 back")]


def test_unpaired_message_is_refused():
    room = Room()
    room.join(1)
    assert texts(say(room, 1, "MSG x")) == [(1, "ERR not-paired")]
    say(room, 1, "NICK A")
    say(room, 1, "PAIR B")
    assert texts(say(room, 1, "MSG x")) == [(1, "ERR not-paired")]


def test_nick_rules():
    room = Room()
    room.join(1)
    room.join(2)
    assert texts(say(room, 1, "NICK alice")) == [(1, "OK NICK alice")]
    assert texts(say(room, 2, "NICK alice")) == [(2, "ERR nick-taken")]
    assert texts(say(room, 2, "NICK bad name")) == [(2, "ERR bad-name")]
    assert texts(say(room, 2, "NICK " + "x" * 33)) == [(2, "ERR bad-name")]
    assert texts(say(room, 2, "NICK")) == [(2, "ERR bad-name")]


def test_a_new_pair_replaces_the_old_and_the_old_peer_is_told():
    room, _ = paired_room()
    room.join(3)
    say(room, 3, "NICK C")
    say(room, 3, "PAIR A")
    say(room, 1, "MSG one")
    actions = texts(say(room, 1, "PAIR C"))
    assert actions == [(2, "UNPAIRED A"), (1, "OK PAIR C"), (1, "PAIRED C"), (3, "PAIRED A")]
    assert texts(say(room, 1, "MSG hi")) == [(3, "FROM A 1 hi")]
    assert texts(say(room, 2, "MSG x")) == [(2, "ERR not-paired")]


def test_quit_says_bye_closes_and_tells_the_peer():
    room, _ = paired_room()
    assert texts(say(room, 1, "QUIT")) == [(1, "BYE"), ("close", 1)]
    assert texts(room.leave(1)) == [(2, "UNPAIRED A")]
    assert 1 not in room.members


def test_who_lists_named_members_and_their_peers():
    room, _ = paired_room()
    room.join(3)
    say(room, 3, "NICK C")
    assert texts(say(room, 3, "WHO")) == [(3, "USER A B"), (3, "USER B A"), (3, "USER C -"), (3, "END")]


def test_errors():
    room = Room()
    room.join(1)
    assert texts(say(room, 1, "DANCE")) == [(1, "ERR unknown-command")]
    assert texts(say(room, 1, "")) == [(1, "ERR unknown-command")]
    assert texts(room.handle(1, LINE_TOO_LONG)) == [(1, "ERR line-too-long")]
    assert texts(room.handle(1, b"MSG \xff")) == [(1, "ERR bad-encoding")]


def test_restore_rederives_pairs_and_keeps_counters_silently():
    room = Room()
    room.restore([Member(5, nick="A", target="B", received=3), Member(9, nick="B", target="A", received=7),
                  Member(2, nick="C", target="A")])
    assert room.members[5].peer is room.members[9]
    assert room.members[2].peer is None
    assert texts(say(room, 9, "MSG next")) == [(5, "FROM B 4 next")]


def test_changed_and_repaired_mark_what_must_be_saved():
    room, _ = paired_room()
    room.changed.clear()
    room.repaired.clear()
    say(room, 1, "MSG x")
    assert room.changed == {2} and room.repaired == set()
    say(room, 2, "PAIR Z")
    assert room.repaired == {1, 2}
