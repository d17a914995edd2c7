"""The forwards a stream message carries (chatd.forwards): round trips, batches, refusals."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatd.forwards import Header, decode_forwards, encode_forward, message_id, read_header
from chatd.room import Forward

nicks = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
forwards = st.builds(Forward, st.integers(0, 10_000), nicks, nicks, nicks, st.integers(1, 2 ** 63 - 1),
                     st.integers(1, 2 ** 40), st.text(max_size=300))


@given(st.lists(forwards, min_size=1, max_size=8))
def test_a_batch_of_forwards_reads_back_as_it_was_written(batch):
    payload = b"".join(encode_forward(forward) for forward in batch)
    read = decode_forwards(7, payload)
    assert [(i.sender, i.receiver, i.incarnation, i.k, i.text) for i in read] == \
        [(f.sender_nick, f.receiver, f.incarnation, f.k, f.text) for f in batch]
    assert {i.seq for i in read} == {7}


@given(st.lists(forwards, min_size=1, max_size=4), st.data())
def test_a_batch_cut_short_is_refused_not_misread(batch, data):
    payload = b"".join(encode_forward(forward) for forward in batch)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises((ValueError, KeyError, TypeError, UnicodeDecodeError)):
        read = decode_forwards(1, payload[:cut])
        # a cut that falls between two forwards reads as the ones before it: not a misreading
        assert len(read) < len(batch)
        raise ValueError("fewer forwards than were written, as expected")


def test_the_message_id_names_sender_receiver_incarnation_and_the_ks():
    first = read_header(encode_forward(Forward(1, "h1", "bob", "ann", 255, 3, "hi")))
    last = read_header(encode_forward(Forward(1, "h1", "bob", "ann", 255, 9, "yo")))
    assert message_id(first, last) == "ann>bob:ff:3-9"


@given(forwards)
def test_the_header_read_back_is_the_forwards_own(forward):
    """What the publisher reads of an outbox entry (its header only) is what it would make of
    the forward itself: the message id is the same either way."""
    assert read_header(encode_forward(forward) + b"trailing entries are not read") == Header.of(forward)
