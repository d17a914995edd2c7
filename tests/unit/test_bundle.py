"""Bundles: descriptors in flight in a socketpair, read back without being consumed."""

import os
import socket

from fdkeep.bundle import Bundle, Shard


def inode(fd):
    return os.fstat(fd).st_ino


def test_entries_come_back_again_and_again_and_outlive_their_sender(sockets):
    pairs = sockets.pairs(600)  # three messages of 253, 253 and 94
    bundle = Bundle.create()
    bundle.append([(key, a.fileno()) for key, (a, _) in enumerate(pairs)])
    expected = [(key, inode(a.fileno())) for key, (a, _) in enumerate(pairs)]
    for a, _ in pairs:
        a.close()  # only the bundle keeps them now
    for _ in range(2):  # reading does not consume
        back = bundle.read()
        assert [(key, inode(fd)) for key, fd in back] == expected
        for key, fd in back:
            os.close(fd)
    first = bundle.read()
    with socket.socket(fileno=first[7][1]) as seven:
        seven.sendall(b"still open")
    assert pairs[7][1].recv(100) == b"still open"
    for _, fd in first[:7] + first[8:]:
        os.close(fd)
    bundle.close()


def test_a_bundle_kept_by_its_two_ends_alone_goes_on_appending(sockets):
    (a, b), (c, d) = sockets.pairs(2)
    bundle = Bundle.create()
    bundle.append([(1, a.fileno())])
    kept = Bundle.from_fds(*map(os.dup, bundle.fds()))
    bundle.close()
    kept.append([(2, c.fileno())])
    back = kept.read()
    assert [(key, inode(fd)) for key, fd in back] == [(1, inode(a.fileno())), (2, inode(c.fileno()))]
    for _, fd in back:
        os.close(fd)
    kept.close()


def test_a_full_queue_says_so_and_a_rebuilt_shard_packs_the_live(sockets):
    pairs = sockets.pairs(400)
    shard = Shard(0, Bundle.create(), generation=1)
    shard.bundle.writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # room for a few messages
    added = 0
    for key, (a, _) in enumerate(pairs):
        if not shard.add([(key, a.fileno())]):
            break
        added += 1
    assert 0 < added < 400, "one-entry messages fill a small send buffer"
    for key in range(added - 1):
        shard.forget(key)
    fresh = shard.rebuilt()
    assert fresh.generation == 2 and list(fresh.live) == [added - 1]
    back = fresh.bundle.read()
    assert [(key, inode(fd)) for key, fd in back] == [(added - 1, inode(pairs[added - 1][0].fileno()))]
    for _, fd in back:
        os.close(fd)
    shard.bundle.close(), fresh.bundle.close()


def test_the_dead_make_a_shard_worth_rebuilding_once_many_and_a_quarter_of_the_live(sockets):
    pairs = sockets.pairs(200)
    shard = Shard(0, Bundle.create(), generation=1)
    assert shard.add([(key, a.fileno()) for key, (a, _) in enumerate(pairs)])
    for key in range(39):
        shard.forget(key)
    assert not shard.worth_rebuilding(), "39 dead, 161 live"
    shard.forget(39)
    shard.forget(40)
    assert shard.worth_rebuilding(), "41 dead, 159 live"
    shard.bundle.close()


def test_a_drained_bundle_keeps_nothing_in_flight_whoever_keeps_a_copy_of_it(sockets):
    (a, b), = sockets.pairs(1)
    bundle = Bundle.create()
    bundle.append([(1, a.fileno())])
    copy = Bundle.from_fds(*map(os.dup, bundle.fds()))  # as a holder keeps one
    a.close()
    assert bundle.drain() == 1
    b.settimeout(2)
    assert b.recv(10) == b"", "its last reference was in the queue: gone, though a copy of the pair lives"
    assert copy.read() == []
    copy.close(), bundle.close()


def test_closing_both_ends_releases_what_was_in_flight(sockets):
    (a, b), = sockets.pairs(1)
    bundle = Bundle.create()
    bundle.append([(1, a.fileno())])
    a.close()
    b.settimeout(2)
    bundle.close()
    assert b.recv(10) == b"", "the last reference went with the bundle: the peer sees the end"


def test_a_reader_that_keeps_its_offset_reads_only_what_was_appended_since(sockets):
    pairs = sockets.pairs(300)
    bundle = Bundle.create()
    bundle.append([(key, a.fileno()) for key, (a, _) in enumerate(pairs[:260])])  # two messages
    first, offset = bundle.read_from(0)
    assert [key for key, _ in first] == list(range(260))
    assert bundle.read_from(offset) == ([], offset), "nothing new"
    for key in range(260, 300):  # one message each, as accepts append them
        bundle.append([(key, pairs[key][0].fileno())])
    more, end = bundle.read_from(offset)
    assert [(key, inode(fd)) for key, fd in more] == [(key, inode(pairs[key][0].fileno())) for key in range(260, 300)]
    assert end > offset
    again = bundle.read()  # and from the start, everything, still: peeking consumed nothing
    assert [key for key, _ in again] == list(range(300))
    for _, fd in first + more + again:
        os.close(fd)
    bundle.close()
