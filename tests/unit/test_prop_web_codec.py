"""Properties of the web codec (chatd.protocols.web.WebCodec): any bytes instead of a request,
any bytes after the handshake, valid frames split anywhere, resuming anywhere.

Frames are built here, byte by byte, with masks hypothesis draws (wsproto's
client would pick random masks, and a derandomized run must see the same bytes
every time); so frames may be as broken as we like: any opcode, reserved bits,
no mask, lengths in the wrong form.
"""

from __future__ import annotations

import json
import struct

from hypothesis import given
from hypothesis import strategies as st

from chatd.protocols.web import HTTP, OPEN, WebCodec, parse_command
from chatd.room import Command
from testkit.fuzz import ws_frame
from proptools import WS_HANDSHAKE, cuts, examples, feed_in_pieces

TEXT, BINARY, CONTINUATION, CLOSE, PING, PONG = 1, 2, 0, 8, 9, 10


def run_pieces(codec: WebCodec, chunks) -> tuple[list[Command], bytes]:
    """The commands and the output: what a client sees of the codec, whatever the pieces."""
    fed = feed_in_pieces(codec, chunks)
    return fed.commands, fed.output


def same_place(codec: WebCodec, other: WebCodec) -> bool:
    """Both in the same phase and, unless finished, at the same offset. (Once finished, a codec
    takes no more input: what arrived after counts as consumed or not depending on the pieces,
    and nothing depends on it: the connection is closed once its output is sent.)"""
    return (codec.state, codec.finished) == (other.state, other.finished) and (
        codec.finished or codec.consumed == other.consumed)


masks = st.binary(min_size=4, max_size=4)
commands_json = st.one_of(
    st.builds(lambda n: json.dumps({"type": "nick", "name": n}), st.text(max_size=8)),
    st.builds(lambda t: json.dumps({"type": "msg", "text": t}), st.text(max_size=30)),
    st.sampled_from(['{"type":"who"}', '{"type":"pair","peer":"bob"}', "not json", "[1]", '{"type":"dance"}']),
    st.text(max_size=20),
)


@st.composite
def valid_messages(draw):
    """(stream of frames, the texts of its messages, its ping payloads): text messages, some
    in fragments cut anywhere (mid-character too), pings between fragments, pongs."""
    frames, texts, pings = b"", [], []
    for _ in range(draw(st.integers(0, 5))):
        text = draw(commands_json)
        payload = text.encode()
        points = sorted(draw(st.lists(st.integers(0, len(payload)), max_size=3)))
        parts = [payload[a:b] for a, b in zip([0, *points], [*points, len(payload)])]
        for index, part in enumerate(parts):
            opcode = TEXT if index == 0 else CONTINUATION
            frames += ws_frame(opcode, part, fin=index == len(parts) - 1, mask=draw(masks))
            if draw(st.integers(0, 4)) == 0:
                ping = draw(st.binary(max_size=10))
                pings.append(ping)
                frames += ws_frame(PING, ping, mask=draw(masks))
            if draw(st.integers(0, 6)) == 0:
                frames += ws_frame(PONG, draw(st.binary(max_size=5)), mask=draw(masks))
        texts.append(text)
    return frames, texts, pings


any_frame = st.builds(
    lambda op, payload, fin, mask, rsv, form: ws_frame(op, payload, fin, mask, rsv, form),
    st.integers(0, 15), st.binary(max_size=140), st.booleans(), st.none() | masks, st.integers(0, 7),
    st.sampled_from([0, 1, 2]),
)
# a header that announces a length that is not there, up to 2**64 - 1
lying_header = st.builds(lambda first, n, mask: bytes([first, 0xFF if mask else 0x7F]) + struct.pack(">Q", n) + (
    b"mask" if mask else b""), st.integers(0, 255), st.integers(0, 2 ** 64 - 1), st.booleans())
junk_after_handshake = st.lists(any_frame | lying_header | st.binary(max_size=30)
                                | valid_messages().map(lambda v: v[0]), max_size=6).map(b"".join)


@examples(150)
@given(data=st.data(), frames=valid_messages())
def test_valid_masked_frames_split_anywhere_decode_to_their_messages(data, frames):
    stream, texts, pings = frames
    codec = WebCodec()
    commands, output = run_pieces(codec, data.draw(cuts(WS_HANDSHAKE + stream, focus=len(WS_HANDSHAKE))))
    assert commands == [parse_command(text) for text in texts]
    assert codec.phase == OPEN and not codec.finished
    assert codec.consumed == len(WS_HANDSHAKE) + len(stream), "everything was used up"
    assert output.startswith(b"HTTP/1.1 101 ")
    pongs = output[output.index(b"\r\n\r\n") + 4:]
    assert pongs == b"".join(ws_frame(PONG, ping, mask=None) for ping in pings), "each ping answered, in order"


@examples(200)
@given(data=st.data(), stream=junk_after_handshake)
def test_any_bytes_after_the_handshake_never_raise_and_splits_do_not_matter(data, stream):
    whole = WebCodec()
    expected = run_pieces(whole, [WS_HANDSHAKE + stream])
    split = WebCodec()
    assert run_pieces(split, data.draw(cuts(WS_HANDSHAKE + stream, focus=len(WS_HANDSHAKE)))) == expected
    assert same_place(split, whole)


HEADS = st.sampled_from([
    WS_HANDSHAKE, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /healthz HTTP/1.0\r\n\r\n", b"POST /ws HTTP/1.1\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n", b"GET /ws HTTP/2\r\n\r\n", b"\r\n\r\n",
    b"GET /ws?x=\xff HTTP/1.1\r\nHost: \xfe\r\n\r\n", b"GET " + b"/" * 20000 + b" HTTP/1.1\r\n\r\n",
])


@st.composite
def mutated_heads(draw):
    head = bytearray(draw(HEADS))
    for _ in range(draw(st.integers(0, 4))):
        where = draw(st.integers(0, len(head)))
        how = draw(st.sampled_from(["flip", "insert", "delete"]))
        if how == "flip" and where < len(head):
            head[where] = draw(st.integers(0, 255))
        elif how == "insert":
            head[where:where] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from([b"\r\n", b"\r\n\r\n", b":"]))
        elif where < len(head):
            del head[where:where + draw(st.integers(1, 8))]
    return bytes(head)


@examples(250)
@given(data=st.data(), head=mutated_heads() | st.binary(max_size=200), after=st.binary(max_size=40))
def test_any_bytes_instead_of_a_request_never_raise_and_get_an_http_answer_or_wait(data, head, after):
    stream = head + after
    whole = WebCodec()
    commands, output = run_pieces(whole, [stream])
    split = WebCodec()
    assert run_pieces(split, data.draw(cuts(stream))) == (commands, output), "splits do not matter"
    if whole.phase == HTTP:
        assert commands == []
        if whole.finished:
            assert output.startswith(b"HTTP/1.1 ") and b"connection: close" in output.lower()
        else:
            assert output == b"" and b"\r\n\r\n" not in stream[:16 * 1024 + 4], "a whole head gets an answer"
    else:
        assert output.startswith(b"HTTP/1.1 101 ")


@examples(150)
@given(data=st.data(), frames=valid_messages() | junk_after_handshake.map(lambda s: (s, None, None)))
def test_a_codec_resumed_from_the_journal_state_anywhere_goes_on_the_same(data, frames):
    """What a new chatd does: (consumed, state) from wherever the dead one stood when it last
    committed (after any call of next_command, a command or None, whatever pieces the bytes had
    come in), and the bytes from consumed on, in any pieces."""
    stream = WS_HANDSHAKE + frames[0]
    whole = WebCodec()
    fed = feed_in_pieces(whole, data.draw(cuts(stream, focus=len(WS_HANDSHAKE))))
    expected = fed.commands
    assert expected == run_pieces(WebCodec(), [stream])[0]
    consumed, state, done = data.draw(st.sampled_from(fed.points))
    resumed = WebCodec(consumed, state)
    commands, _ = run_pieces(resumed, data.draw(cuts(stream[consumed:], focus=len(WS_HANDSHAKE) - consumed)))
    assert commands == expected[done:]
    assert same_place(resumed, whole)
