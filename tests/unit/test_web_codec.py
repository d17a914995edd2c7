"""The web codec, pure: HTTP requests and WebSocket frames in, commands and bytes out.

What every codec promises (splits, resuming, every event encoded) is in test_codec_contract.py."""

import json
import os
import subprocess
import sys

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, Request, TextMessage

from chatd.protocols import HEALTH_ASKED
from chatd.protocols.web import CLOSING, MAX_MESSAGE, OPEN, STRIDED_FROM, WebCodec, unmask
from chatd import room
from chatd.room import Bye, Invalid, Msg, Nick, Pair, Quit, Room, Who
from proptools import WS_HANDSHAKE, WS_KEY, take


def opened() -> tuple[WebCodec, Connection]:
    codec = WebCodec()
    assert take(codec, WS_HANDSHAKE) == []
    answer = codec.take_output()
    assert answer.startswith(b"HTTP/1.1 101 ") and b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer
    assert codec.phase == OPEN and codec.consumed == len(WS_HANDSHAKE)
    assert b"permessage-deflate" not in answer.lower(), "no extension: its state would not survive a crash"
    return codec, Connection(ConnectionType.CLIENT)  # frames as a browser masks them


def text(client: Connection, message, finished: bool = True) -> bytes:
    return client.send(TextMessage(data=message if isinstance(message, str) else json.dumps(message),
                                   message_finished=finished))


def server_events(data: bytes) -> list:
    browser = Connection(ConnectionType.CLIENT)
    browser.receive_data(data)
    return list(browser.events())


def test_a_browser_handshake_opens_a_websocket_built_by_wsproto():
    client = WSConnection(ConnectionType.CLIENT)
    codec = WebCodec()
    take(codec, client.send(Request(host="chat", target="/ws")))
    client.receive_data(codec.take_output())
    assert [type(event).__name__ for event in client.events()] == ["AcceptConnection"]


def test_on_the_websocket_an_empty_msg_and_a_self_pair_are_refused():
    """The decided answers, frames in and JSON out: the codec, the room, the codec."""
    codec, client = opened()
    room = Room()
    room.join(1, "websocket")
    sent = ({"type": "nick", "name": "ann"}, {"type": "pair", "peer": "ann"}, {"type": "pair", "peer": "bob"},
            {"type": "msg"}, {"type": "msg", "text": ""}, {"type": "msg", "text": 5})
    out = b""
    for command in take(codec, b"".join(text(client, message) for message in sent)):
        out += b"".join(codec.encode(event) for _, event in room.handle(1, command).deliveries)
    assert [json.loads(event.data) for event in server_events(out)] == [
        {"type": "ok", "command": "nick", "name": "ann"}, {"type": "error", "code": "self-pair"},
        {"type": "ok", "command": "pair", "name": "bob"}] + [{"type": "error", "code": "empty-message"}] * 3


@pytest.mark.parametrize("request_bytes, status", [
    (WS_HANDSHAKE.replace(b"Version: 13", b"Version: 8"), b"400"),
    (WS_HANDSHAKE.replace(b"Sec-WebSocket-Key: " + WS_KEY + b"\r\n", b""), b"400"),
    # Found by the long fuzz run: wsproto decodes Host as IDNA, and a byte over 127 raised
    # UnicodeDecodeError out of the codec, which took chatd down.
    (WS_HANDSHAKE.replace(b"Host: chat", b"Host: \xebchat"), b"400"),
    (WS_HANDSHAKE.replace(b"GET", b"POST"), b"405"),
    (WS_HANDSHAKE.replace(b"Upgrade: websocket\r\n", b""), b"426"),
    (b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", b"404"),
    (b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n", b"405"),
    (b"this is not http\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
], ids=["version", "no-key", "non-ascii-host", "post", "no-upgrade", "not-found", "delete", "garbage", "huge-head"])
def test_bad_requests_get_a_proper_http_error_and_the_end(request_bytes, status):
    codec = WebCodec()
    assert take(codec, request_bytes) == []
    answer = codec.take_output()
    assert answer.split(b" ")[1] == status, answer[:200]
    assert b"connection: close" in answer.lower() and codec.finished


def test_the_page_and_the_health_probe():
    for target, status, kind in ((b"/", b"200", b"text/html"), (b"/app.js", b"200", b"javascript"),
                                 (b"/style.css", b"200", b"text/css"), (b"/healthz", b"200", b"text/plain")):
        codec = WebCodec()
        take(codec, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = codec.take_output()
        assert answer.split(b" ")[1] == status and kind in answer.lower(), answer[:200]


def test_the_health_probe_is_asked_of_chatd_and_answered_503_with_the_reason_while_the_host_is_unhealthy():
    codec, probe = WebCodec(), b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    codec.feed(probe)
    assert codec.next_command() is HEALTH_ASKED and codec.take_output() == b""
    assert codec.next_command() is HEALTH_ASKED, "asked until answered: the request is not consumed before"
    codec.answer_health("fenced for 3 s: its clients go to other hosts")
    answer = codec.take_output()
    assert answer.startswith(b"HTTP/1.1 503 ") and answer.endswith(b"\r\n\r\nfenced for 3 s: its clients go to other hosts\n")
    assert codec.finished and codec.next_command() is None and codec.consumed == len(probe)


def test_messages_become_commands():
    codec, client = opened()
    frames = b"".join(text(client, m) for m in ({"type": "nick", "name": "ann"}, {"type": "pair", "peer": "bob"},
                                                {"type": "msg", "text": "hé \"there\""}, {"type": "who"},
                                                {"type": "ping"}, {"type": "quit"}, {"type": "dance"}, "not json",
                                                [1, 2]))
    assert take(codec, frames) == [Nick("ann"), Pair("bob"), Msg('hé "there"'), Who(), room.Ping(), Quit(),
                                   Invalid("unknown-command"), Invalid("unknown-command"), Invalid("unknown-command")]
    assert codec.consumed == len(WS_HANDSHAKE) + len(frames)


def test_whole_text_frames_of_every_length_encoding_parse_as_wsproto_would():
    """A whole masked text frame is parsed without wsproto (the fast path): at each length
    encoding's edges, the text comes out exactly; a frame whose length is not in its shortest
    encoding still goes to wsproto, which closes it with 1002 as before."""
    codec, client = opened()
    texts = ["", "é" * 50, "x" * (125 - 28), "x" * (126 - 28), "x" * (65535 - 28), "x" * (MAX_MESSAGE - 28)]
    frames = b"".join(text(client, {"type": "msg", "text": body}) for body in texts)
    assert take(codec, frames) == [Msg(body) for body in texts]
    assert codec.consumed == len(WS_HANDSHAKE) + len(frames)
    codec, _ = opened()
    payload = b'{"type":"who"}'
    long_form = bytes((0x81, 0x80 | 126)) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload
    assert take(codec, long_form) == []
    [close] = server_events(codec.take_output())
    assert close.code == 1002 and codec.finished


def test_a_from_is_framed_as_wsproto_would_frame_it():
    codec, _ = opened()
    for text_sent in ("hi", 'hé "there" \\ \u2028', "x" * 200, "x" * 70000):
        event = room.From("ann", 7, text_sent)
        expected = Connection(ConnectionType.SERVER).send(TextMessage(data=json.dumps(
            {"type": "from", "from": "ann", "n": 7, "text": text_sent}, ensure_ascii=False, separators=(",", ":"))))
        assert codec.encode(event) == expected
        [message] = server_events(expected)
        assert json.loads(message.data)["text"] == text_sent


def test_bye_is_a_message_then_a_close():
    codec, _ = opened()
    events = server_events(codec.encode(Bye()))
    assert json.loads(events[0].data) == {"type": "bye"} and isinstance(events[1], CloseConnection)
    assert events[1].code == 1000 and codec.phase == CLOSING


def test_a_fragmented_message_is_one_command_and_consumed_stays_at_its_start():
    codec, client = opened()
    start = codec.consumed
    body = json.dumps({"type": "msg", "text": "in three parts"})
    pieces = [text(client, body[:10], False), text(client, body[10:20], False), text(client, body[20:])]
    assert take(codec, pieces[0] + pieces[1]) == []
    assert codec.consumed == start, "half a message is not used up: a crash now must read it again"
    assert take(codec, pieces[2]) == [Msg("in three parts")]
    assert codec.consumed == start + sum(map(len, pieces))


def test_frames_from_the_browser_must_be_masked():
    codec, _ = opened()
    unmasked = Connection(ConnectionType.SERVER).send(TextMessage(data='{"type":"who"}'))
    assert take(codec, unmasked) == []
    [event] = server_events(codec.take_output())
    assert isinstance(event, CloseConnection) and event.code == 1002 and codec.finished


def test_a_ping_is_answered_and_a_close_is_answered_and_ends():
    codec, client = opened()
    assert take(codec, client.send(Ping(payload=b"are you there"))) == []
    [pong] = server_events(codec.take_output())
    assert isinstance(pong, Pong) and pong.payload == b"are you there"
    assert take(codec, client.send(CloseConnection(code=1001, reason="going away"))) == []
    [close] = server_events(codec.take_output())
    assert isinstance(close, CloseConnection) and close.code == 1001 and codec.finished


def test_an_oversize_frame_is_closed_with_1009_before_its_payload_comes():
    codec, client = opened()
    frame = text(client, "x" * (MAX_MESSAGE + 1))
    assert take(codec, frame[:14]) == []  # the header alone
    [close] = server_events(codec.take_output())
    assert isinstance(close, CloseConnection) and close.code == 1009 and codec.finished


def test_a_message_grown_over_the_limit_in_fragments_is_closed_with_1009():
    codec, client = opened()
    part = "y" * (MAX_MESSAGE // 2)
    take(codec, text(client, part, False) + text(client, part, False) + text(client, part))
    [close] = server_events(codec.take_output())
    assert close.code == 1009


def test_invalid_utf8_is_closed_with_1007_and_binary_with_1003():
    codec, client = opened()
    frame = bytearray(text(client, "ab"))
    mask = frame[2:6]
    frame[6] = 0xFF ^ mask[0]  # the first payload byte, unmasked, is 0xff: not UTF-8
    take(codec, bytes(frame))
    [close] = server_events(codec.take_output())
    assert close.code == 1007
    codec, client = opened()
    take(codec, client.send(BytesMessage(data=b"\x00\x01")))
    [close] = server_events(codec.take_output())
    assert close.code == 1003


def test_a_chatd_starts_without_importing_the_web_libraries_until_asked():
    # A cold restart waits for every import of chatd's start: h11 and wsproto are looked for
    # there, and imported by the web codec (or import_web_codec, for a chatd that waits).
    script = ("import sys; import chatd.main; from chatd.protocols import web_unavailable, import_web_codec; "
              "assert web_unavailable() is None; print(sorted({'h11', 'wsproto'} & set(sys.modules))); "
              "import_web_codec(); print(sorted({'h11', 'wsproto', 'chatd.protocols.web'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))).stdout
    assert out.splitlines() == ["[]", "['chatd.protocols.web', 'h11', 'wsproto']"]


def test_a_missing_web_library_is_named(monkeypatch):
    import importlib.util

    from chatd.protocols import web_unavailable

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wsproto" else found(name))
    problem = web_unavailable()
    assert problem.startswith("the web chat needs wsproto, which") and "--http-port -1" in problem


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 125, STRIDED_FROM - 1, STRIDED_FROM, STRIDED_FROM + 3, 16384 + 1,
                                    MAX_MESSAGE])
def test_unmasking_is_the_xor_with_the_mask_repeated_on_both_paths(length):
    """Short payloads are unmasked as one big integer, long ones 4 strided passes: both the XOR."""
    masked, mask = os.urandom(length), os.urandom(4)
    expected = bytes(byte ^ mask[index % 4] for index, byte in enumerate(masked))
    assert bytes(unmask(masked, mask)) == expected
    assert bytes(unmask(bytearray(masked), mask)) == expected
