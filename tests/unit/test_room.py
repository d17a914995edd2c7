"""The room's rules, pure: commands in, an outcome of events out.

Most tests speak through the line codec, so that what they check reads as the
protocol does; the last ones look at the events and the outcome themselves.
"""

from chatd.protocols.line import encode_event, parse_line
from chatd.room import From, Invalid, Member, Msg, Nick, Outcome, Pair, Paired, Room, Users


def say(room, member_id, line):
    return room.handle(member_id, parse_line(line.encode()))


def texts(outcome: Outcome):
    lines = []
    for member_id, event in outcome.deliveries:
        lines += [(member_id, text) for text in encode_event(event).decode().splitlines()]
    return lines + [("close", member_id) for member_id in outcome.closes]


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
    assert texts(say(room, 2, "NICK \u00e9")) == [(2, "ERR bad-name")]
    assert texts(say(room, 2, "PAIR bad name")) == [(2, "ERR bad-name")]
    assert texts(say(room, 2, "PAIR")) == [(2, "ERR bad-name")]


def test_pairing_with_ones_own_nick_is_refused_and_changes_nothing():
    """It could never be mutual, and as a new target it would end the pairing one has."""
    room, _ = paired_room()
    say(room, 1, "MSG one")
    outcome = say(room, 1, "PAIR A")
    assert texts(outcome) == [(1, "ERR self-pair")] and outcome.changed == set()
    assert texts(say(room, 1, "MSG two")) == [(2, "FROM A 2 two")], "still paired, n goes on"
    room.join(3)
    assert texts(say(room, 3, "PAIR A")) == [(3, "OK PAIR A")], "a member without a nick names anyone"
    assert texts(say(room, 3, "NICK C")) == [(3, "OK NICK C")]
    assert texts(say(room, 3, "PAIR C")) == [(3, "ERR self-pair")]
    assert room.members[3].target == "A"


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


def test_ping_is_answered_pong_to_the_sender_alone_and_changes_nothing():
    room, _ = paired_room()
    outcome = say(room, 1, "PING")
    assert texts(outcome) == [(1, "PONG")]
    assert outcome.changed == set() and outcome.closes == [] and outcome.forwards == []


def test_errors():
    room = Room()
    room.join(1)
    assert texts(say(room, 1, "DANCE")) == [(1, "ERR unknown-command")]
    assert texts(say(room, 1, "")) == [(1, "ERR unknown-command")]
    assert texts(room.handle(1, Invalid("line-too-long"))) == [(1, "ERR line-too-long")]
    assert texts(room.handle(1, parse_line(b"MSG \xff"))) == [(1, "ERR bad-encoding")]


def test_command_words_are_ascii_only():
    """str.upper() maps Unicode: a long s (U+017F) made "m\u017fg" a MSG, a dotless i
    (U+0131) "qu\u0131t" a QUIT; a Kelvin sign (U+212A) lowers to "k"."""
    room = Room()
    room.join(1)
    assert texts(say(room, 1, "nick ann")) == [(1, "OK NICK ann")]
    for line in ("NIC\u212a bob", "nic\u212a bob", "m\u017fg hi", "qu\u0131t"):
        assert texts(say(room, 1, line)) == [(1, "ERR unknown-command")], repr(line)
    assert texts(say(room, 1, "\uff2d\uff33\uff27 hi")) == [(1, "ERR unknown-command")]  # fullwidth MSG


def test_message_text_with_control_characters_is_refused_and_the_peer_gets_nothing():
    """NUL, a lone CR, ESC (terminal escapes), DEL and C1 controls would reach the peer's
    screen raw; tab and every printable character, non-ASCII too, pass."""
    room, _ = paired_room()
    for text in ("a\x00b", "a\rb", "\x1b[2Jwiped", "a\x7fb", "a\x85b", "a\x08b"):
        assert texts(say(room, 1, "MSG " + text)) == [(1, "ERR bad-text")], repr(text)
    assert texts(say(room, 1, "MSG tab\there, caf\u00e9, \u212a")) == [(2, "FROM A 1 tab\there, caf\u00e9, \u212a")]


def test_the_fast_control_check_agrees_with_the_regex_on_every_character():
    """has_control checks ASCII text by its bytes: each character alone, at the start, middle
    and end of ASCII and of non-ASCII text, answers as CONTROL does."""
    from chatd.room import CONTROL, has_control

    for code in range(0x3000):
        char = chr(code)
        for text in (char, "ab" + char, char + "cd" * 100, "é" + char, char + "é"):
            assert has_control(text) == (CONTROL.search(text) is not None), (code, text)


def test_a_message_with_no_text_is_refused_and_the_peer_gets_nothing():
    room, _ = paired_room()
    for line in ("MSG", "MSG ", "msg"):
        outcome = say(room, 1, line)
        assert texts(outcome) == [(1, "ERR empty-message")] and outcome.changed == set(), repr(line)
    assert texts(say(room, 1, "MSG  ")) == [(2, "FROM A 1  ")], "white space alone is text: it goes as sent"
    assert texts(say(room, 1, "MSG x")) == [(2, "FROM A 2 x")]
    lone = Room()
    lone.join(1)
    assert texts(say(lone, 1, "MSG")) == [(1, "ERR empty-message")], "what is wrong with the line itself first"


def test_restore_rederives_pairs_and_keeps_counters_silently():
    room = Room()
    room.restore([Member(5, nick="A", target="B", received=3), Member(9, nick="B", target="A", received=7),
                  Member(2, nick="C", target="A")])
    assert room.members[5].peer is room.members[9]
    assert room.members[2].peer is None
    assert texts(say(room, 9, "MSG next")) == [(5, "FROM B 4 next")]


def test_the_outcome_says_what_must_be_saved():
    room, _ = paired_room()
    outcome = say(room, 1, "MSG x")
    assert outcome.changed == {2}, "the receiver's count"
    outcome = say(room, 2, "PAIR Z")
    assert outcome.changed == {1, 2}, "both lose their pairing and their counts"
    assert say(room, 1, "WHO").changed == set(), "a question changes nothing"


def test_events_are_protocol_free():
    room = Room()
    room.join(1)
    room.join(2)
    room.handle(1, Nick("A"))
    room.handle(1, Pair("B"))
    room.handle(2, Nick("B"))
    outcome = room.handle(2, Pair("A"))
    assert (1, Paired("B")) in outcome.deliveries and (2, Paired("A")) in outcome.deliveries
    assert room.handle(1, Msg("hello")).deliveries == [(2, From("A", 1, "hello"))]
    assert room.handle(2, parse_line(b"WHO")).deliveries == [(2, Users((("A", "B"), ("B", "A"))))]


def test_join_and_leave_say_what_changed():
    room = Room()
    assert room.join(4).changed == {4}
    assert room.leave(4).changed == set()
    assert room.leave(4) == Outcome(), "leaving twice changes nothing"


def test_who_lists_at_most_max_users_so_one_answer_stays_small():
    from chatd.protocols.line import encode_event
    from chatd.room import MAX_USERS
    from chatd.server import MAX_EVENT

    room = Room()
    for member_id in range(MAX_USERS + 5):
        room.join(member_id)
        room.handle(member_id, Nick(f"{member_id:032d}"))
    users = room.users()
    assert len(users.entries) == MAX_USERS
    assert len(encode_event(users)) <= MAX_EVENT
    assert len(encode_event(From("x" * 32, 2**63, "y" * 65532))) <= MAX_EVENT
