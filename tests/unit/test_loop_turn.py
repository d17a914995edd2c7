"""One turn of chatd's loop, in-process: take input, apply the room's outcome, commit, then flush.

The rule it checks is the one a crash relies on (chatd/server.py): no byte of an effect leaves
chatd before the journal has committed it, and every commit covers a command's input, its change
to the room and its output together."""

from __future__ import annotations

import select
import socket

from chatd.holders import Holders
from chatd.server import ChatServer


def readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def turn_until(server: ChatServer, done, turns: int = 200) -> None:
    for _ in range(turns):
        server.loop.run_once(0.01)
        if done():
            return
    raise AssertionError("the loop never got there")


class Client:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.buffer = b""

    def send(self, *lines: str) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def lines(self) -> list[str]:
        while readable(self.sock):
            data = self.sock.recv(65536)
            if not data:
                break
            self.buffer += data
        *whole, self.buffer = self.buffer.split(b"\n")
        return [line.decode() for line in whole]


def test_nothing_is_sent_before_the_commit_that_covers_it_and_the_commit_covers_input_room_and_output():
    server = ChatServer(Holders([]), 8)
    server.bind("127.0.0.1", 0)
    commits = []
    real_commit = server.journal.commit

    def watched_commit(changes, cursor=None):
        # At this moment nothing of what the commit covers may have reached a client.
        commits.append({slot: (record.nick, record.target, record.received, record.in_handled,
                               record.out_start, record.out_end, readable(clients[slot].sock))
                        for slot, record in changes.items() if record is not None and slot in clients})
        real_commit(changes, cursor)

    server.journal.commit = watched_commit
    a = Client(server.port)
    b = Client(server.port)
    clients: dict[int, Client] = {}
    turn_until(server, lambda: len(server.connections) == 2)
    by_port = {c.sock.getsockname()[1]: c for c in (a, b)}
    for slot, connection in server.connections.items():
        clients[slot] = by_port[connection.sock.getpeername()[1]]
    slot_of = {id(client): slot for slot, client in clients.items()}
    a.send("NICK ann", "PAIR bob")
    b.send("NICK bob", "PAIR ann")
    got = {id(a): [], id(b): []}
    turn_until(server, lambda: [got[id(c)].extend(c.lines()) for c in (a, b)] and
               "PAIRED bob" in got[id(a)] and "PAIRED ann" in got[id(b)])
    commits.clear()
    a.send("MSG hello")
    turn_until(server, lambda: got[id(b)].extend(b.lines()) or "FROM ann 1 hello" in got[id(b)])
    covering = [commit for commit in commits if slot_of[id(b)] in commit and commit[slot_of[id(b)]][2] == 1]
    assert covering, "a commit carries bob's count"
    first = covering[0]
    nick, target, received, _, out_start, out_end, had_data = first[slot_of[id(b)]]
    assert (nick, target, received) == ("bob", "ann", 1) and out_end > out_start, \
        "bob's record: the count and the FROM to send, in one commit"
    assert not had_data, "the FROM was committed before a byte of it reached bob"
    assert slot_of[id(a)] in first and first[slot_of[id(a)]][3] == server.connections[slot_of[id(a)]].inbox.handled, \
        "ann's input handled to past the MSG, in the same commit"
    a.sock.close(), b.sock.close()
    server.journal.commit = real_commit
    server.loop.close()


def test_a_receivers_ring_draining_wakes_what_waits_in_the_stream_for_it_whatever_host_its_peer_is_on():
    """Across hosts a message from a peer of this very host comes through the stream too
    (chatd.room.Room.durable_host), and may wait there for the receiver's ring: the ring's
    progress must wake it, not only the local peer's commands."""
    from chatd.across import SingleHost

    class Woken(SingleHost):
        def __init__(self):
            self.nicks = []

        def wake(self, nick):
            self.nicks.append(nick)

    server = ChatServer(Holders([]), 8)
    server.bind("127.0.0.1", 0)
    server.cluster = woken = Woken()
    ann, bob = Client(server.port), Client(server.port)
    ann.send("NICK ann", "PAIR bob")
    bob.send("NICK bob", "PAIR ann")
    turn_until(server, lambda: "PAIRED ann" in bob.lines())
    woken.nicks.clear()
    ann.send("MSG hello")
    turn_until(server, lambda: "bob" in woken.nicks)
    ann.sock.close(), bob.sock.close()
    server.loop.close()


def test_a_sender_held_back_by_its_peers_ring_goes_on_once_the_peers_session_moved_to_another_host():
    """bob reads nothing: ann's messages fill his output ring and chatd holds her back (a peer of
    this host holds its sender back by its ring). Then bob's session moves to another host
    (chatd.keeper, through the directory): his ring holds ann back no more, and she is taken
    again at once; nothing she is sent wakes her, since the move tells her nothing."""
    server = ChatServer(Holders([]), 8)
    server.bind("127.0.0.1", 0)
    a, b = Client(server.port), Client(server.port)
    turn_until(server, lambda: len(server.connections) == 2)
    ids = {connection.sock.getpeername()[1]: slot for slot, connection in server.connections.items()}
    ann, bob = ids[a.sock.getsockname()[1]], ids[b.sock.getsockname()[1]]
    a.send("NICK ann", "PAIR bob")
    b.send("NICK bob", "PAIR ann")
    turn_until(server, lambda: server.room.members[ann].peer is server.room.members[bob])
    b.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.sock.setblocking(False)
    message = ("MSG " + "x" * 30000 + "\n").encode()
    unsent = message * 400  # far more than bob's ring and socket buffers hold
    connection = server.connections[ann]

    def send_some() -> None:
        nonlocal unsent
        try:
            unsent = unsent[a.sock.send(unsent):]
        except BlockingIOError:
            pass

    turn_until(server, lambda: send_some() or connection.blocked, turns=5000)
    handled = connection.inbox.handled
    for _ in range(20):
        send_some()
        server.loop.run_once(0.01)
    assert connection.blocked and connection.inbox.handled == handled, "held back while bob's ring is full"
    server.session_moved_away(bob, "a test moved it", host="h9")
    turn_until(server, lambda: send_some() or connection.inbox.handled > handled)
    a.sock.close(), b.sock.close()
    for connection in list(server.connections.values()):
        connection.close()
    server.loop.close()
