"""The frame decoder, pure: bytes and fds in, frames out."""

import os

import pytest

from helpers import is_open
from fdkeep.errors import Error
from fdkeep.frames import HEADER, FrameDecoder, encode_frame


@pytest.fixture
def pipe_fds():
    made = []

    def make(count):
        fds = []
        for _ in range(count):
            r, w = os.pipe()
            os.close(w)
            fds.append(r)
        made.extend(fds)
        return fds

    yield make
    for fd in made:
        try:
            os.close(fd)
        except OSError:
            pass


def test_frames_reassemble_from_single_bytes():
    data = encode_frame({"op": "PING", "id": 1}) + encode_frame({"op": "LIST"})
    decoder = FrameDecoder()
    frames = []
    for i in range(len(data)):
        decoder.feed(data[i:i + 1])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame.body)
    assert frames == [{"op": "PING", "id": 1}, {"op": "LIST"}]


def test_fds_go_to_the_frame_that_announced_them(pipe_fds):
    a, b, c = pipe_fds(3)
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"n": 1}, 2), [a, b])
    decoder.feed(encode_frame({"n": 2}, 0) + encode_frame({"n": 3}, 1), [c])
    assert decoder.next_frame().fds == [a, b]
    assert decoder.next_frame().fds == []
    assert decoder.next_frame().fds == [c]


def test_missing_fds_are_an_error_and_the_stream_goes_on(pipe_fds):
    (a,) = pipe_fds(1)
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"n": 1}, 2) + encode_frame({"n": 2}), [a])
    with pytest.raises(Error) as caught:
        decoder.next_frame()
    assert caught.value.code == "fd-count-mismatch" and not caught.value.fatal
    assert not is_open(a), "the fds of a refused frame are closed"
    assert decoder.next_frame().body == {"n": 2}


def test_fds_no_frame_claims_are_closed(pipe_fds):
    a, b = pipe_fds(2)
    decoder = FrameDecoder()
    decoder.feed(encode_frame({"n": 1}, 1), [a, b])
    with pytest.raises(Error) as caught:
        decoder.next_frame()
    assert caught.value.code == "fd-count-mismatch"
    assert not is_open(a) and not is_open(b)


def test_oversized_frame_is_fatal_before_its_body_arrives():
    decoder = FrameDecoder(max_frame=100)
    decoder.feed(HEADER.pack(101, 0))
    with pytest.raises(Error) as caught:
        decoder.next_frame()
    assert caught.value.code == "frame-too-large" and caught.value.fatal


@pytest.mark.parametrize("body", [b"\xff\xfe", b"[1,2]", b"not json", b""])
def test_bad_bodies_are_reported_and_skipped(body):
    decoder = FrameDecoder()
    decoder.feed(HEADER.pack(len(body), 0) + body + encode_frame({"ok": True}))
    with pytest.raises(Error) as caught:
        decoder.next_frame()
    assert caught.value.code == "bad-frame"
    assert decoder.next_frame().body == {"ok": True}


def test_more_than_253_fds_cannot_be_encoded():
    with pytest.raises(ValueError):
        encode_frame({}, 254)


def test_close_releases_undelivered_fds(pipe_fds):
    (a,) = pipe_fds(1)
    decoder = FrameDecoder()
    decoder.feed(encode_frame({}, 1)[:3], [a])
    decoder.close()
    assert not is_open(a)
