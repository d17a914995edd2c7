"""Properties of the frame decoder (fdkeep.frames): any bytes, any splits, any fds.

Descriptors are real (pipes' read ends), so a descriptor lost, closed twice or
handed out twice shows: every one the decoder hands out is closed here with
``os.close`` (which fails on one the decoder closed already), and the process's
open descriptors must be the same after a run as before.
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fdkeep.errors import Error
from fdkeep.frames import DEFAULT_MAX_FRAME, HEADER, MAX_FDS_PER_FRAME, FrameDecoder, encode_frame
from proptools import cuts, examples, json_objects, open_fds


def pipe_ends(count: int) -> list[int]:
    fds = []
    for _ in range(count):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    return fds


# -- what goes on the wire: honest frames, liars and noise -----------------------------------
def honest(body: dict, fd_count: int) -> bytes:
    return encode_frame(body, fd_count)


wire_piece = st.one_of(
    st.builds(honest, json_objects(), st.integers(0, 3)),
    # a header that lies about the length or the fd count, or announces too many fds
    st.builds(lambda body, delta, count: HEADER.pack(max(len(body) + delta, 0), count) + body,
              st.binary(max_size=40) | st.builds(lambda o: json.dumps(o).encode(), json_objects()),
              st.integers(-5, 5), st.integers(0, 300)),
    # any header at all, some bytes after it
    st.builds(lambda length, count, tail: HEADER.pack(length, count) + tail,
              st.integers(0, 2 ** 32 - 1), st.integers(0, 2 ** 16 - 1), st.binary(max_size=20)),
    st.binary(max_size=60),  # noise
)


def drain(decoder: FrameDecoder, budget: int, handed: list[int], errors: list[Error]) -> bool:
    """next_frame until it needs more; False after a fatal error. Every frame's fds go to
    ``handed``. Fails if the decoder neither waits nor makes progress within ``budget`` calls."""
    for _ in range(budget):
        try:
            frame = decoder.next_frame()
        except Error as exc:  # the only exception allowed
            errors.append(exc)
            assert exc.code in ("bad-frame", "frame-too-large", "fd-count-mismatch"), exc
            if exc.fatal:
                return False
            continue
        if frame is None:
            return True
        assert isinstance(frame.body, dict) and len(frame.fds) <= MAX_FDS_PER_FRAME
        handed.extend(frame.fds)
    pytest.fail(f"the decoder made no progress in {budget} calls (it hangs)")


@examples(300)
@given(pieces=st.lists(wire_piece, max_size=6), data=st.data(), max_frame=st.sampled_from([8, 300, DEFAULT_MAX_FRAME]))
def test_any_bytes_in_any_splits_with_any_fds_raise_only_error_and_lose_no_fd(pieces, data, max_frame):
    stream = b"".join(pieces)
    chunks = data.draw(cuts(stream))
    fd_counts = data.draw(st.lists(st.integers(0, 4), min_size=len(chunks), max_size=len(chunks)))
    before = open_fds()
    sent = pipe_ends(sum(fd_counts))
    arrival = {fd: index for index, fd in enumerate(sent)}
    decoder = FrameDecoder(max_frame)
    handed: list[int] = []
    errors: list[Error] = []
    given_fds = iter(sent)
    for chunk, count in zip(chunks, fd_counts):
        decoder.feed(chunk, [next(given_fds) for _ in range(count)])
        if not drain(decoder, len(stream) + len(sent) + 8, handed, errors):
            for fd in given_fds:  # after a fatal error the connection ends: these never arrive
                os.close(fd)
            break
    assert len(set(handed)) == len(handed), "a descriptor handed out twice"
    assert [arrival[fd] for fd in handed] == sorted(arrival[fd] for fd in handed), "fds out of arrival order"
    for fd in handed:
        os.close(fd)  # raises if the decoder had closed it too
    decoder.close()
    assert open_fds() == before, "descriptors leaked (or were closed that were not the decoder's)"


@st.composite
def frames_with_fds(draw):
    return draw(st.lists(st.tuples(json_objects(max_leaves=8), st.integers(0, 3)), min_size=1, max_size=4))


@examples(120)
@given(frames=frames_with_fds(), data=st.data())
def test_encoded_frames_come_back_whole_with_their_own_fds_at_any_split(frames, data):
    """The kernel delivers a frame's fds with its first byte: they go with the piece holding it."""
    encoded = [encode_frame(body, count) for body, count in frames]
    stream = b"".join(encoded)
    chunks = data.draw(cuts(stream))
    before = open_fds()
    fds_of = [pipe_ends(count) for _, count in frames]
    starts, offset = [], 0
    for frame in encoded:
        starts.append(offset)
        offset += len(frame)
    decoder = FrameDecoder()
    got, position = [], 0
    for chunk in chunks:
        riding = [fd for start, fds in zip(starts, fds_of) if position <= start < position + len(chunk) for fd in fds]
        position += len(chunk)
        decoder.feed(chunk, riding)
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    assert [frame.body for frame in got] == [body for body, _ in frames]
    assert [frame.fds for frame in got] == fds_of
    assert decoder.pending_bytes == 0
    for fds in fds_of:
        for fd in fds:
            os.close(fd)
    decoder.close()
    assert open_fds() == before


@examples(150)
@given(body=json_objects(), announced=st.integers(0, 6), sent=st.integers(0, 6), data=st.data(),
       after=json_objects())
def test_an_fd_count_lie_is_a_non_fatal_mismatch_and_the_next_frame_is_whole(body, announced, sent, data, after):
    frame = encode_frame(body, announced)
    chunks = data.draw(cuts(frame, 4))
    before = open_fds()
    fds = pipe_ends(sent)
    decoder = FrameDecoder()
    errors, handed = [], []
    for index, chunk in enumerate(chunks):
        decoder.feed(chunk, fds if index == 0 else [])
        assert drain(decoder, 20, handed, errors), "an fd count lie is not fatal"
    if announced == sent:
        assert errors == [] and handed == fds
    else:
        assert [e.code for e in errors] == ["fd-count-mismatch"] and handed == []
    decoder.feed(encode_frame(after))
    assert decoder.next_frame().body == after, "the stream stays in sync after the lie"
    for fd in handed:
        os.close(fd)
    decoder.close()
    assert open_fds() == before


@examples(150)
@given(body=json_objects(), max_frame=st.integers(2, 200), data=st.data())
def test_the_size_limit_is_decided_from_the_header_alone(body, max_frame, data):
    frame = encode_frame(body)
    decoder = FrameDecoder(max_frame)
    too_large = len(frame) - HEADER.size > max_frame
    cut = data.draw(st.integers(HEADER.size, len(frame)))
    decoder.feed(frame[:cut])
    if too_large:
        with pytest.raises(Error) as caught:
            decoder.next_frame()
        assert caught.value.code == "frame-too-large" and caught.value.fatal
    else:
        result = decoder.next_frame()
        assert (result is None) == (cut < len(frame))
        if result is not None:
            assert result.body == body
