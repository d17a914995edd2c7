"""The line codec, pure: bytes in, commands out; events in, lines out."""

from chatd.protocols.line import LineCodec, encode_event, parse_line
from chatd.room import Bye, Failed, From, Invalid, Msg, Nick, Ok, Pair, Paired, Ping, Pong, Quit, Room, Unpaired, Users, Who


def commands(codec, data: bytes) -> list:
    codec.feed(data)
    out = []
    while (command := codec.next_command()) is not None:
        out.append(command)
    return out


def test_lines_split_across_chunks_and_crlf():
    codec = LineCodec()
    assert commands(codec, b"NICK a") == []
    assert commands(codec, b"lice\r\nWHO\nMS") == [Nick("alice"), Who()]
    assert commands(codec, b"G hi\n") == [Msg("hi")]


def test_a_line_of_exactly_the_limit_passes():
    codec = LineCodec(max_line=10)
    assert commands(codec, b"MSG " + b"x" * 6 + b"\r\n") == [Msg("x" * 6)]
    assert commands(codec, b"MSG " + b"y" * 6 + b"\n") == [Msg("y" * 6)]


def test_an_overlong_line_is_reported_once_and_dropped_and_the_next_line_works():
    codec = LineCodec(max_line=10)
    events = []
    for chunk in [b"x" * 7, b"x" * 7, b"x" * 100, b"xx\nWHO\n"]:
        events += commands(codec, chunk)
    assert events == [Invalid("line-too-long"), Who()]
    assert codec.buffered == b""


def test_overlong_line_ending_in_the_same_chunk():
    codec = LineCodec(max_line=4)
    assert commands(codec, b"12345\nWHO\n") == [Invalid("line-too-long"), Who()]


def test_default_limit_is_64_kib():
    codec = LineCodec()
    assert commands(codec, b"MSG " + b"M" * 65532 + b"\n") == [Msg("M" * 65532)]
    assert commands(codec, b"MSG " + b"M" * 65533 + b"\n") == [Invalid("line-too-long")]


def test_parse():
    assert parse_line(b"nick bob") == Nick("bob")
    assert parse_line(b"MSG  two  spaces ") == Msg(" two  spaces ")
    assert parse_line(b"MSG") == Msg("")
    assert parse_line(b"WHO") == Who()
    assert parse_line(b"ping") == Ping()
    assert parse_line(b"PAIR") == Pair(None)
    assert parse_line(b"quit now") == Quit()
    assert parse_line(b"DANCE") == Invalid("unknown-command")
    assert parse_line(b"") == Invalid("unknown-command")
    assert parse_line(b"MSG \xff") == Invalid("bad-encoding")


def test_every_event_is_one_line_but_users():
    assert encode_event(Ok("NICK", "a")) == b"OK NICK a\n"
    assert encode_event(Ok("PAIR", "b")) == b"OK PAIR b\n"
    assert encode_event(Paired("b")) == b"PAIRED b\n"
    assert encode_event(Unpaired("b")) == b"UNPAIRED b\n"
    assert encode_event(From("a", 7, "hé llo")) == "FROM a 7 hé llo\n".encode()
    assert encode_event(Bye()) == b"BYE\n"
    assert encode_event(Pong()) == b"PONG\n"
    assert encode_event(Failed("not-paired")) == b"ERR not-paired\n"
    assert encode_event(Users((("a", "b"), ("c", None)))) == b"USER a b\nUSER c -\nEND\n"
    assert encode_event(Users(())) == b"END\n"


def test_a_codec_made_from_where_another_stood_goes_on_exactly_as_it_would():
    """What a new chatd does: a codec from (consumed, state) and the bytes from consumed on."""
    import random

    rng = random.Random(11)
    pieces = [b"MSG hi\n", b"WHO\r\n", b"x" * 40, b"\n", b"NICK ann\n", b"y" * 25, b"z\nQUIT\n", b"MSG tail"]
    stream = b"".join(rng.choice(pieces) for _ in range(300))
    whole = LineCodec(max_line=30)
    whole.feed(stream)
    expected, checkpoints = [], []
    while True:
        checkpoints.append((whole.consumed, whole.state, len(expected)))
        command = whole.next_command()
        if command is None:
            break
        expected.append(command)
    for consumed, state, done in checkpoints:
        resumed = LineCodec(max_line=30, consumed=consumed, state=state)
        for start in range(consumed, len(stream), 17):  # fed in pieces, as reads come
            resumed.feed(stream[start:start + 17])
        assert commands(resumed, b"") == expected[done:]
        assert resumed.consumed == whole.consumed


def test_on_the_wire_an_empty_msg_and_a_self_pair_are_refused():
    """The decided answers, bytes in and bytes out: the codec, the room, the codec."""
    room = Room()
    room.join(1)
    room.join(2)
    out = b""
    for command in commands(LineCodec(), b"NICK ann\nPAIR ann\nPAIR bob\nMSG\nMSG \r\n"):
        out += b"".join(encode_event(event) for _, event in room.handle(1, command).deliveries)
    assert out == b"OK NICK ann\nERR self-pair\nOK PAIR bob\nERR empty-message\nERR empty-message\n"
