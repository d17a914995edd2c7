"""A client's connection on its own: its one state, the legal changes, and what it tells its owner.

No server here: the connection is driven over a real TCP pair on a real loop, with callbacks
that record what the owner would hear (chatd.server is the owner in chatd)."""

import pytest

from chatd.connection import BLOCKED, CLOSED, FINISHING, OPEN, PARKED, TRANSITIONS, Connection, StateError
from chatd.protocols import codec_for
from chatd.rings import InRing, OutRing
from fdkeep.loop import Loop
from helpers import tcp_pair


class Owner:
    def __init__(self):
        self.inputs = 0
        self.moved = 0
        self.lost: list[str] = []

    def input(self, connection):
        self.inputs += 1

    def output_moved(self, connection):
        self.moved += 1

    def on_lost(self, connection, reason):
        self.lost.append(reason)
        connection.close()


@pytest.fixture
def wired():
    loop = Loop()
    client, server = tcp_pair()
    owner = Owner()
    connection = Connection(loop, server, 7, codec_for("line"), InRing(memoryview(bytearray(64))),
                            OutRing(memoryview(bytearray(64))), on_input=owner.input,
                            on_output_moved=owner.output_moved, on_lost=owner.on_lost)
    yield loop, client, connection, owner
    connection.close()
    client.close()
    loop.close()


def turns(loop, count=3):
    for _ in range(count):
        loop.run_once(0.05)


def test_every_change_outside_the_table_is_refused(wired):
    _, _, connection, _ = wired
    moves = {OPEN: connection.open, BLOCKED: connection.block, PARKED: connection.park, FINISHING: connection.finish}
    for start in (OPEN, BLOCKED, PARKED):
        for target, move in moves.items():
            connection._state = start
            if target is start or target in TRANSITIONS[start]:
                move()
                assert connection.state is target
            else:
                with pytest.raises(StateError):
                    move()
                assert connection.state is start
    connection._state = FINISHING
    for move in (connection.open, connection.block, connection.park):
        with pytest.raises(StateError):
            move()
    connection.close()
    assert connection.state is CLOSED
    with pytest.raises(StateError):
        connection.open()


def test_only_an_open_connection_with_room_reads(wired):
    loop, client, connection, owner = wired
    client.sendall(b"WHO\n")
    turns(loop)
    assert owner.inputs >= 1 and connection.codec.next_command() is not None
    for state, move in ((BLOCKED, connection.block), (PARKED, connection.park)):
        move()
        assert not connection.reading, f"{state.value}: its commands wait, so TCP holds the client back"
        before = owner.inputs
        client.sendall(b"WHO\n")
        turns(loop)
        assert owner.inputs == before
        connection.open()
        assert connection.reading
        turns(loop)
        assert owner.inputs > before, "reading again once open: what waited in the kernel comes"
    connection.finish()
    assert not connection.reading and not connection.takes_commands


def test_eof_is_told_and_closes_only_once_no_command_waits_for_room(wired):
    loop, client, connection, owner = wired
    connection.block()
    connection.open()
    client.shutdown(2)
    turns(loop)
    assert connection.input_ended and owner.inputs == 1
    assert not connection.reading, "nothing more to read after EOF"
    connection.block()
    assert not connection.input_done(), "blocked: what it sent before its EOF is still to handle"
    connection.open()
    assert connection.input_done()


def test_sent_output_is_told_and_a_lost_socket_is_told_once(wired):
    loop, client, connection, owner = wired
    connection.outbox.append(b"BYE\n")
    connection.outbox.commit()
    assert connection.flush() and owner.moved == 1
    client.settimeout(1)
    assert client.recv(10) == b"BYE\n"
    client.close()
    for _ in range(5):
        connection.outbox.append(b"x" * 10)
        connection.outbox.commit()
        connection.flush()
        turns(loop, 1)
        if owner.lost:
            break
    assert len(owner.lost) == 1 and connection.state is CLOSED


def test_a_web_client_that_does_not_finish_its_opening_is_lost_on_its_own_deadline():
    loop = Loop()
    client, server = tcp_pair()
    owner = Owner()
    connection = Connection(loop, server, 3, codec_for("websocket"), InRing(memoryview(bytearray(4096))),
                            OutRing(memoryview(bytearray(64))), on_input=owner.input,
                            on_output_moved=owner.output_moved, on_lost=owner.on_lost, opening_timeout=0.2)
    client.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    for _ in range(20):
        loop.run_once(0.05)
    assert owner.lost == ["sent no complete request in 0.2 s"] and connection.state is CLOSED
    client.close()
    loop.close()
