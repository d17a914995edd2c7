"""The journal's rings: stream offsets over a circular view, both ways, wrapping."""

import random

import pytest

from chatd.rings import InRing, OutRing, RingFull
from helpers import tcp_pair


def test_input_wraps_and_only_committed_room_is_free():
    client, server = tcp_pair()
    ring = InRing(memoryview(bytearray(16)), handled=10, received=10)
    client.sendall(b"abcdefghij")
    assert ring.receive(server) == 10  # positions 10..15 and 0..3: two pieces
    assert ring.bytes(10, 20) == b"abcdefghij"
    assert ring.free == 6
    ring.consume(15)
    assert ring.free == 6, "handled but not committed: those bytes may be needed after a crash"
    ring.committed = 15
    assert ring.free == 11
    with pytest.raises(ValueError):
        ring.bytes(12, 20)  # before what is handled: no longer in the window
    client.close(), server.close()


def test_a_full_input_ring_refuses_to_read():
    client, server = tcp_pair()
    ring = InRing(memoryview(bytearray(8)))
    client.sendall(b"0123456789")
    assert ring.receive(server) == 8
    with pytest.raises(ValueError):
        ring.receive(server)
    client.close(), server.close()


def test_output_is_sent_only_once_committed_and_from_where_it_stopped():
    client, server = tcp_pair()
    ring = OutRing(memoryview(bytearray(32)), sent=25, end=25)
    ring.append(b"hello ")
    assert not ring, "nothing committed yet: nothing to send"
    assert ring.flush(server) and ring.sent == 25
    assert ring.commit()
    ring.append(b"world")  # wraps: positions 31 and 0..3
    assert ring.flush(server)
    assert ring.sent == 31 and ring.pending == 5
    ring.commit()
    assert ring.flush(server)
    client.settimeout(1)
    assert client.recv(100) == b"hello world"
    with pytest.raises(RingFull):
        ring.append(b"x" * 33)
    client.close(), server.close()


def test_random_appends_and_flushes_deliver_the_stream_intact():
    client, server = tcp_pair()
    rng = random.Random(3)
    ring = OutRing(memoryview(bytearray(4096)))
    sent = bytearray()
    for _ in range(500):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
        if len(data) <= ring.free:
            ring.append(data)
            sent += data
        if rng.random() < 0.5:
            ring.commit()
            ring.flush(server)
    ring.commit()
    assert ring.flush(server)
    client.settimeout(2)
    got = bytearray()
    while len(got) < len(sent):
        got += client.recv(65536)
    assert got == sent
    client.close(), server.close()


def test_the_outbox_keeps_committed_entries_until_published_across_the_wrap():
    from chatd.rings import Outbox

    box = Outbox(memoryview(bytearray(64)))
    first = box.append(b"a" * 20)
    second = box.append(b"b" * 20)
    assert box.entries() == [], "nothing committed yet"
    box.commit()
    assert [payload for _, _, payload in box.entries()] == [b"a" * 20, b"b" * 20]
    box.published_to(box.entries()[0][1])
    third = box.append(b"c" * 30)  # wraps around the ring's end
    box.commit()
    assert [payload for _, _, payload in box.entries()] == [b"b" * 20, b"c" * 30]
    restored = Outbox(box.view, published=second, end=box.end)
    assert [start for start, _, _ in restored.entries()] == [second, third] and first == 0
    try:
        box.append(b"d" * 40)
    except RingFull as exc:
        assert "do not fit" in str(exc)
    else:
        raise AssertionError("an entry that does not fit must be refused")


def test_a_full_ring_is_no_value_error():
    """A full ring means "the reader takes too little"; no other error (an encoder's bug
    raising ValueError) may be caught as that and close an innocent reader."""
    assert not issubclass(RingFull, ValueError)
