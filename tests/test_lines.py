"""The line framer and command parser, pure."""

import pytest

from chatd.lines import LINE_TOO_LONG, LineFramer, parse_command, BadEncoding, Command


def test_lines_split_across_chunks_and_crlf():
    framer = LineFramer()
    assert framer.feed(b"NICK a") == []
    assert framer.feed(b"lice\r\nWHO\nMS") == [b"NICK alice", b"WHO"]
    assert framer.feed(b"G hi\n") == [b"MSG hi"]


def test_a_line_of_exactly_the_limit_passes():
    framer = LineFramer(max_line=10)
    assert framer.feed(b"x" * 10 + b"\r\n") == [b"x" * 10]
    assert framer.feed(b"y" * 10 + b"\n") == [b"y" * 10]


def test_an_overlong_line_is_reported_once_and_dropped_and_the_next_line_works():
    framer = LineFramer(max_line=10)
    events = []
    for chunk in [b"x" * 7, b"x" * 7, b"x" * 100, b"xx\nWHO\n"]:
        events += framer.feed(chunk)
    assert events == [LINE_TOO_LONG, b"WHO"]
    assert framer.buffered == b""


def test_overlong_line_ending_in_the_same_chunk():
    framer = LineFramer(max_line=4)
    assert framer.feed(b"12345\nok\n") == [LINE_TOO_LONG, b"ok"]


def test_default_limit_is_64_kib():
    framer = LineFramer()
    assert framer.feed(b"M" * 65536 + b"\n") == [b"M" * 65536]
    assert framer.feed(b"M" * 65537 + b"\n") == [LINE_TOO_LONG]


def test_parse():
    assert parse_command(b"nick bob") == Command("NICK", "bob")
    assert parse_command(b"MSG  two  spaces ") == Command("MSG", " two  spaces ")
    assert parse_command(b"WHO") == Command("WHO", None)
    with pytest.raises(BadEncoding):
        parse_command(b"MSG \xff")
