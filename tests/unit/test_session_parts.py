"""Sessions' pure parts: tokens, the resume gate, and what the room keeps of a session."""

from chatd.room import From, Msg, Nick, Pair, Resumed, Room, SessionStarted, Unpaired
from chatd.sessions import ResumeGate, digest, new_token, shown


def test_a_token_is_128_random_bits_kept_only_as_its_hash():
    token, hashed = new_token()
    assert len(token) == 32 and int(token, 16) >= 0
    assert hashed == digest(token) and len(hashed) == 16 and token.encode() not in hashed
    assert new_token()[0] != token
    assert shown(token) == token[:4] + "…" and token not in shown(token)


def test_the_gate_admits_a_burst_then_a_rate_and_names_the_wait():
    now = [0.0]
    gate = ResumeGate(rate=10, burst=5, clock=lambda: now[0])
    assert [gate.admit() for _ in range(5)] == [0] * 5
    wait = gate.admit()
    assert wait >= 1, "past the burst: told when to come back"
    now[0] += 0.1
    assert gate.admit() == 0, "a tenth of a second brings one more at 10 a second"
    assert gate.admit() >= 1


def pair_with_session(room: Room):
    room.join(1), room.join(2)
    room.handle(1, Nick("a")), room.handle(1, Pair("b"))
    room.handle(2, Nick("b")), room.handle(2, Pair("a"))
    token, hashed = new_token()
    outcome = room.start_session(1, token, hashed)
    assert outcome.deliveries == [(1, SessionStarted(token, 0))] and outcome.changed == {1}
    return hashed


def test_a_session_counts_its_chat_commands_and_its_n_over_pairings():
    room = Room()
    hashed = pair_with_session(room)
    room.handle(1, Msg("hi"))
    assert room.members[1].handled == 1
    room.handle(2, Msg("one"))
    room.handle(2, Pair("c"))  # the pairing ends
    room.handle(2, Pair("a"))  # and begins again
    outcome = room.handle(2, Msg("two"))
    assert outcome.deliveries == [(1, From("b", 2, "two"))], "n goes on over a new pairing in a session"
    assert room.handle(1, Msg("again")).deliveries == [(2, From("a", 1, "again"))], \
        "b, without a session, got 'hi' as 1 before: its n starts again"
    assert room.session(hashed) is room.members[1]


def test_a_resume_moves_the_session_and_its_peer_sees_nothing():
    room = Room()
    hashed = pair_with_session(room)
    room.join(3)
    outcome = room.resume(3, 1)
    assert outcome.deliveries == [(3, Resumed("a", "b", 0))]
    assert 1 not in room.members and room.members[3].nick == "a" and room.members[2].peer is room.members[3]
    assert room.session(hashed) is room.members[3]
    assert room.handle(2, Msg("x")).deliveries == [(3, From("b", 1, "x"))]
    left = room.leave(3)
    assert left.deliveries == [(2, Unpaired("a"))] and room.session(hashed) is None


def test_a_new_connection_that_had_a_nick_gives_it_up_to_the_session_it_resumes():
    room = Room()
    pair_with_session(room)
    room.join(3)
    room.handle(3, Nick("c"))
    room.handle(3, Pair("b"))
    room.resume(3, 1)
    assert room.member_by_nick("c") is None and room.members[3].nick == "a"
    assert room.members[2].peer is room.members[3], "b stays paired with a"
