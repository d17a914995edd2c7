"""Properties of the line codec (chatd.protocols.line.LineCodec): any bytes, any splits, any resume point.

The reference the codec is checked against is the protocol's rule written the
plain way: cut the whole stream at each ``\\n``; a line (one ``\\r`` before its
``\\n`` dropped) over the limit is ``Invalid("line-too-long")``, others are
parsed; a last, unfinished line already longer than the limit plus one byte (the
room for a ``\\r``) is reported too long at once.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatd.protocols.line import LineCodec, parse_line
from chatd.room import Command, Invalid
from proptools import cuts, examples, feed_in_pieces

MAX = 12

piece = st.one_of(
    st.sampled_from([b"NICK ann", b"PAIR bob", b"MSG hi there", b"WHO", b"QUIT", b"msg \xc3\xa9", b"\xff\xfe",
                     b"DANCE", b"\r", b"\n", b"\r\n", b"x" * MAX, b"y" * (MAX + 1), b"z" * (MAX + 2)]),
    st.binary(max_size=30),
    st.binary(max_size=4).map(lambda b: b.replace(b"\n", b"") + b"\n"),
)
streams = st.lists(piece, max_size=14).map(b"".join)


def reference(stream: bytes, max_line: int) -> list[Command]:
    *lines, tail = stream.split(b"\n")
    commands = []
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        commands.append(Invalid("line-too-long") if len(line) > max_line else parse_line(line))
    if len(tail) > max_line + 1:
        commands.append(Invalid("line-too-long"))
    return commands


@examples(300)
@given(stream=streams, data=st.data(), max_line=st.sampled_from([MAX, 1, 64 * 1024]))
def test_any_bytes_in_any_splits_give_the_commands_of_the_whole_stream(stream, data, max_line):
    codec = LineCodec(max_line=max_line)
    assert feed_in_pieces(codec, data.draw(cuts(stream))).commands == reference(stream, max_line)
    # everything up to the last newline is used up; after it, the unfinished line waits
    # (or, too long already, is thrown away as it comes)
    tail = stream.rsplit(b"\n", 1)[-1] if b"\n" in stream else stream
    if codec.discarding:
        assert codec.consumed == len(stream) and codec.buffered == b""
    else:
        assert codec.buffered == tail and codec.consumed == len(stream) - len(tail)


@examples(200)
@given(stream=streams, data=st.data())
def test_a_codec_resumed_from_consumed_and_state_anywhere_goes_on_the_same(stream, data):
    """What a new chatd does after a crash, from any point the dead one stood at,
    whatever pieces the bytes came in, before and after."""
    expected = feed_in_pieces(LineCodec(max_line=MAX), [stream]).commands
    whole = LineCodec(max_line=MAX)
    fed = feed_in_pieces(whole, data.draw(cuts(stream)))
    assert fed.commands == expected
    consumed, state, done = data.draw(st.sampled_from(fed.points))
    resumed = LineCodec(max_line=MAX, consumed=consumed, state=state)
    assert feed_in_pieces(resumed, data.draw(cuts(stream[consumed:]))).commands == expected[done:]
    assert (resumed.consumed, resumed.state, resumed.buffered) == (whole.consumed, whole.state, whole.buffered)


@examples(300)
@given(line=st.binary(max_size=40))
def test_any_line_parses_to_a_command(line):
    assert isinstance(parse_line(line), Command)
