"""What every codec promises (chatd.protocols.Codec), checked on each, as chatd makes them: codec_for.

The contract, in the shape of h11: ``feed`` bytes, take ``next_command`` until
it says None; bytes may come in any pieces; ``take_output`` gives what the
codec must send on its own, once; ``encode`` turns every event the room sends
into bytes the client reads; ``opening`` holds until the protocol's opening is
done, ``finished`` once the protocol ends the connection; and ``consumed`` and
``state``, read after any call of ``next_command`` (where chatd commits its
journal), make a codec that goes on exactly as this one would, fed the bytes
from ``consumed`` on: that is how a new chatd handles what a dead one read.

Each protocol is a :class:`Speaker` here: its opening, a sample in which a client
says every command there is, a long stretch (a line over the limit; a message
of many fragments with a ping between them), and how a client reads events.
What only one protocol does is in test_line_codec.py and test_web_codec.py.
"""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass
from typing import Callable

import pytest
from wsproto import ConnectionType
from wsproto.connection import Connection
from wsproto.events import CloseConnection, TextMessage

from chatd.protocols import codec_for
from chatd.protocols.line import MAX_LINE
from chatd.protocols.web import MAX_MESSAGE
from chatd.room import (Ack, Bye, Command, Event, Failed, From, Invalid, Msg, Nick, Ok, Pair, Paired, Ping, Pong, Quit,
                        Busy, Handled, Moved, Resume, Resumed, SessionStarted, StartSession, Unpaired, Users, Who)
from testkit.fuzz import ws_frame
from proptools import WS_HANDSHAKE, feed_in_pieces, take

TEXT, CONTINUATION, CLOSE, PING, PONG = 1, 0, 8, 9, 10
MASK = b"\x5a\x3c\xa5\x0f"  # a browser masks every frame; a fixed mask keeps the bytes the same each run


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return ws_frame(opcode, payload, fin, MASK)


def message(body) -> bytes:
    return frame(TEXT, json.dumps(body).encode())


@dataclass
class Speaker:
    """A client of one protocol, as the contract tests need it."""

    protocol: str
    #: What a client sends before its first command (nothing, or an HTTP upgrade request).
    opening: bytes
    #: Commands as this protocol's clients send them, every kind of command among them.
    sample: bytes
    sample_commands: list[Command]
    #: What the codec sends on its own in answer to the sample (pongs).
    sample_replies: bytes
    #: Longer than a read: stretches a codec must keep state across.
    long: bytes
    long_commands: list[Command]
    #: What ends the connection in this protocol, if anything but the client's going does.
    ending: bytes | None
    #: The events in ``encoded`` as the client reads them.
    read: Callable[[bytes], list]


def read_lines(encoded: bytes) -> list:
    return encoded.decode().splitlines()


def read_messages(encoded: bytes) -> list:
    browser = Connection(ConnectionType.CLIENT)
    browser.receive_data(encoded)
    return [json.loads(event.data) for event in browser.events() if isinstance(event, TextMessage)]


FRAGMENTED = json.dumps({"type": "msg", "text": "hé, in \"three\" parts"}).encode()
BIG = "b" * (MAX_MESSAGE - 64)
BIG_BODY = json.dumps({"type": "msg", "text": BIG}).encode()

SPEAKERS = [
    Speaker(
        protocol="line",
        opening=b"",
        sample=(b"NICK ann\npair bob\r\nMSG h\xc3\xa9 there\nWHO\nPING\nDANCE\n\nSESSION\nACK 7\n"
                b"RESUME 00ff 12\nRESUME 00ff\nQUIT\n"),
        sample_commands=[Nick("ann"), Pair("bob"), Msg("hé there"), Who(), Ping(), Invalid("unknown-command"),
                         Invalid("unknown-command"), StartSession(), Ack(7), Resume("00ff", 12), Resume("", 0),
                         Quit()],
        sample_replies=b"",
        long=b"MSG " + b"x" * (MAX_LINE + 4096) + b"\nWHO\n" + b"MSG " + b"y" * (MAX_LINE - 4) + b"\r\n",
        long_commands=[Invalid("line-too-long"), Who(), Msg("y" * (MAX_LINE - 4))],
        ending=None,
        read=read_lines,
    ),
    Speaker(
        protocol="websocket",
        opening=WS_HANDSHAKE,
        sample=(message({"type": "nick", "name": "ann"}) + message({"type": "pair", "peer": "bob"})
                + frame(TEXT, FRAGMENTED[:9], fin=False) + frame(PING, b"there?") + frame(CONTINUATION, FRAGMENTED[9:20], fin=False)
                + frame(CONTINUATION, FRAGMENTED[20:]) + message({"type": "who"}) + frame(PONG, b"")
                + message({"type": "ping"}) + message({"type": "dance"}) + frame(TEXT, b"not json")
                + message({"type": "session"}) + message({"type": "ack", "n": 7})
                + message({"type": "resume", "token": "00ff", "n": 12}) + message({"type": "resume", "n": "12"})
                + message({"type": "quit"})),
        sample_commands=[Nick("ann"), Pair("bob"), Msg('hé, in "three" parts'), Who(), Ping(),
                         Invalid("unknown-command"), Invalid("unknown-command"), StartSession(), Ack(7),
                         Resume("00ff", 12), Resume("", 0), Quit()],
        sample_replies=ws_frame(PONG, b"there?", mask=None),
        long=(frame(TEXT, BIG_BODY[:30000], fin=False) + frame(PING, b"") + frame(CONTINUATION, BIG_BODY[30000:])
              + message({"type": "who"})),
        long_commands=[Msg(BIG), Who()],
        ending=frame(CLOSE, b"\x03\xe8bye"),
        read=read_messages,
    ),
]


@pytest.fixture(params=SPEAKERS, ids=lambda speaker: speaker.protocol)
def speaker(request) -> Speaker:
    return request.param


def opened(speaker: Speaker):
    """A codec past its opening, and what it sent for it."""
    codec = codec_for(speaker.protocol)
    assert take(codec, speaker.opening) == []
    return codec, codec.take_output()


def test_the_samples_say_every_command_there_is(speaker):
    kinds = {type(command) for command in speaker.sample_commands}
    assert kinds == set(typing.get_args(Command)), "a command kind no sample says is not checked here"


def test_a_new_codec_stands_at_the_start_and_a_resumed_one_where_it_is_told(speaker):
    codec = codec_for(speaker.protocol)
    assert (codec.protocol, codec.consumed, codec.state, codec.finished) == (speaker.protocol, 0, b"", False)
    assert codec.opening == bool(speaker.opening)
    assert codec.next_command() is None and codec.take_output() == b""
    ahead, _ = opened(speaker)
    take(ahead, speaker.sample)
    resumed = codec_for(speaker.protocol, ahead.consumed, ahead.state)
    assert (resumed.protocol, resumed.consumed, resumed.state) == (speaker.protocol, ahead.consumed, ahead.state)
    assert not resumed.opening and not resumed.finished


def test_the_opening_holds_until_it_is_whole_and_gives_no_command(speaker):
    codec = codec_for(speaker.protocol)
    assert take(codec, speaker.opening[:-1]) == []
    assert codec.opening == bool(speaker.opening) and codec.consumed == 0 and codec.take_output() == b""
    assert take(codec, speaker.opening[-1:]) == []
    assert not codec.opening and not codec.finished and codec.consumed == len(speaker.opening)
    answer = codec.take_output()
    assert answer.startswith(b"HTTP/1.1 101 ") if speaker.opening else answer == b""
    assert codec.take_output() == b"", "what the codec sends is given once"


def test_commands_come_out_in_order_and_everything_whole_is_used_up(speaker):
    codec, _ = opened(speaker)
    assert take(codec, speaker.sample) == speaker.sample_commands
    assert codec.take_output() == speaker.sample_replies
    assert codec.consumed == len(speaker.opening) + len(speaker.sample)
    assert codec.next_command() is None and take(codec, b"") == [], "it said it needs more: it needs more"
    assert not codec.finished and not codec.opening


def test_a_stream_cut_at_every_byte_gives_the_same_commands_and_output(speaker):
    stream = speaker.opening + speaker.sample
    whole = feed_in_pieces(codec_for(speaker.protocol), [stream])
    assert whole.commands == speaker.sample_commands
    for cut in range(len(stream) + 1):
        codec = codec_for(speaker.protocol)
        split = feed_in_pieces(codec, [stream[:cut], stream[cut:]])
        assert (split.commands, split.output, codec.consumed) == (whole.commands, whole.output, len(stream)), \
            f"cut at {cut}"
    byte_by_byte = feed_in_pieces(codec_for(speaker.protocol), [stream[i:i + 1] for i in range(len(stream))])
    assert (byte_by_byte.commands, byte_by_byte.output) == (whole.commands, whole.output)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[start:start + size] for start in range(0, len(data), size)]


@pytest.mark.parametrize("part, size", [("sample", 1), ("sample", 7), ("long", 1021), ("long", 16500)])
def test_a_codec_resumed_from_any_commit_point_goes_on_exactly_as_it_would(speaker, part, size):
    """What a new chatd does after a crash: a codec from (consumed, state) as the dead one
    last committed them, fed the bytes from consumed on (in pieces as reads bring them)."""
    body = getattr(speaker, part)
    stream = speaker.opening + body + (speaker.ending or b"")
    whole = codec_for(speaker.protocol)
    fed = feed_in_pieces(whole, pieces(stream, size))
    assert fed.commands == getattr(speaker, f"{part}_commands")
    if part == "long":
        assert len({state for _, state, _ in fed.points}) > 1, "the long part passes through a parse state"
    for consumed, state, done in sorted(set(fed.points)):
        resumed = codec_for(speaker.protocol, consumed, state)
        assert feed_in_pieces(resumed, pieces(stream[consumed:], size)).commands == fed.commands[done:], \
            f"resumed at {consumed} {state!r}"
        assert (resumed.consumed, resumed.state, resumed.finished) == (whole.consumed, whole.state, whole.finished)


def test_only_the_protocol_ending_finishes_a_codec_and_then_it_takes_no_more(speaker):
    codec, _ = opened(speaker)
    commands = take(codec, speaker.sample + (speaker.ending or b"") + speaker.sample)
    if speaker.ending is None:
        assert commands == speaker.sample_commands * 2 and not codec.finished
    else:
        assert commands == speaker.sample_commands and codec.finished
        assert take(codec, speaker.sample) == [] and codec.next_command() is None
        browser = Connection(ConnectionType.CLIENT)
        browser.receive_data(codec.take_output())
        *_, close = browser.events()
        assert isinstance(close, CloseConnection) and close.code == 1000, "the close is answered"


#: Every event the room sends, and what a client of each protocol reads of it.
EVENTS = [
    (Ok("NICK", "a"), ["OK NICK a"], [{"type": "ok", "command": "nick", "name": "a"}]),
    (Ok("PAIR", "b"), ["OK PAIR b"], [{"type": "ok", "command": "pair", "name": "b"}]),
    (Paired("b"), ["PAIRED b"], [{"type": "paired", "peer": "b"}]),
    (Unpaired("b"), ["UNPAIRED b"], [{"type": "unpaired", "peer": "b"}]),
    (From("a", 7, "hé llo"), ["FROM a 7 hé llo"], [{"type": "from", "from": "a", "n": 7, "text": "hé llo"}]),
    (Users((("a", "b"), ("c", None))), ["USER a b", "USER c -", "END"],
     [{"type": "users", "users": [{"nick": "a", "peer": "b"}, {"nick": "c", "peer": None}]}]),
    (Users(()), ["END"], [{"type": "users", "users": []}]),
    (Pong(), ["PONG"], [{"type": "pong"}]),
    (Failed("not-paired"), ["ERR not-paired"], [{"type": "error", "code": "not-paired"}]),
    (SessionStarted("0a" * 16, 0), ["SESSION " + "0a" * 16 + " 0"],
     [{"type": "session", "token": "0a" * 16, "handled": 0}]),
    (Resumed("a", "b", 12), ["RESUMED a b 12"], [{"type": "resumed", "nick": "a", "peer": "b", "handled": 12}]),
    (Resumed(None, None, 0), ["RESUMED - - 0"], [{"type": "resumed", "nick": None, "peer": None, "handled": 0}]),
    (Handled(3), ["HANDLED 3"], [{"type": "handled", "count": 3}]),
    (Busy(2), ["ERR busy 2"], [{"type": "error", "code": "busy", "retry_after": 2}]),
    (Moved(5), ["ERR moved 5"], [{"type": "error", "code": "moved", "sent": 5}]),
    (Bye(), ["BYE"], [{"type": "bye"}]),  # last: on the WebSocket, a close follows it
]


def test_the_table_has_every_event_the_room_sends():
    assert {type(event) for event, _, _ in EVENTS} == set(typing.get_args(Event))


def test_every_event_encodes_to_what_the_client_reads(speaker):
    codec, _ = opened(speaker)
    column = 1 if speaker.protocol == "line" else 2
    for row in EVENTS:
        encoded = codec.encode(row[0])
        assert speaker.read(encoded) == row[column], row[0]
    if speaker.protocol == "line":  # each event is whole lines: a client reads it with readline
        assert all(codec.encode(row[0]).endswith(b"\n") for row in EVENTS)


def test_the_messages_a_codec_wrote_are_found_again_in_its_output(speaker):
    """A resume sends again what a client lacks: chatd finds each FROM in the output its codec
    wrote (chatd.protocols.froms_in), among every other event, where it begins and ends."""
    from chatd.protocols import froms_in

    codec, opening_output = opened(speaker)
    events = [row[0] for row in EVENTS if not isinstance(row[0], Bye)]
    output, expected = bytearray(opening_output), []
    for number, event in enumerate(events + [From("b", 8, "FROM x 9 not a line of its own"), From("c", 9, "")]):
        encoded = codec.encode(event)
        if isinstance(event, From):
            expected.append((len(output), len(output) + len(encoded), event))
        output += encoded
    assert froms_in(speaker.protocol, bytes(output)) == expected
    assert froms_in(speaker.protocol, bytes(output[:expected[-1][1] - 1])) == expected[:-1], "only whole ones"


def test_what_is_not_an_event_is_not_encoded(speaker):
    codec, _ = opened(speaker)
    with pytest.raises(TypeError):
        codec.encode(Msg("a command, not an event"))
