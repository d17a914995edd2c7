"""The line codec, pure: bytes in, commands out; events in, lines out.

What every codec promises (splits, resuming, every event encoded) is in test_codec_contract.py."""

from chatd.protocols.line import LineCodec, encode_event, parse_line
from chatd.room import Invalid, Msg, Nick, Pair, Ping, Quit, Room, Who
from proptools import take


def test_a_line_of_exactly_the_limit_passes():
    codec = LineCodec(max_line=10)
    assert take(codec, b"MSG " + b"x" * 6 + b"\r\n") == [Msg("x" * 6)]
    assert take(codec, b"MSG " + b"y" * 6 + b"\n") == [Msg("y" * 6)]


def test_an_overlong_line_is_reported_once_and_dropped_and_the_next_line_works():
    codec = LineCodec(max_line=10)
    events = []
    for chunk in [b"x" * 7, b"x" * 7, b"x" * 100, b"xx\nWHO\n"]:
        events += take(codec, chunk)
    assert events == [Invalid("line-too-long"), Who()]
    assert codec.buffered == b""


def test_overlong_line_ending_in_the_same_chunk():
    codec = LineCodec(max_line=4)
    assert take(codec, b"12345\nWHO\n") == [Invalid("line-too-long"), Who()]


def test_default_limit_is_64_kib():
    codec = LineCodec()
    assert take(codec, b"MSG " + b"M" * 65532 + b"\n") == [Msg("M" * 65532)]
    assert take(codec, b"MSG " + b"M" * 65533 + b"\n") == [Invalid("line-too-long")]


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


def test_on_the_wire_an_empty_msg_and_a_self_pair_are_refused():
    """The decided answers, bytes in and bytes out: the codec, the room, the codec."""
    room = Room()
    room.join(1)
    room.join(2)
    out = b""
    for command in take(LineCodec(), b"NICK ann\nPAIR ann\nPAIR bob\nMSG\nMSG \r\n"):
        out += b"".join(encode_event(event) for _, event in room.handle(1, command).deliveries)
    assert out == b"OK NICK ann\nERR self-pair\nOK PAIR bob\nERR empty-message\nERR empty-message\n"
