"""Sessions outlive connections (chatd.sessions): real holderd, chatd and clients on loopback.

A client with a session whose connection ends, in any way, resumes it on a new one: every
message after the last it saw comes again with its own ``n``, exactly once; it resends only
the commands chatd did not handle; its peer sees nothing. The streaming test cuts connections
at random (reset, closed, gone silent) among chatd crashes while pairs stream numbered
messages both ways, and counts every message (testkit.soak).
"""

from __future__ import annotations

import signal
import socket
import time

from ctl.launch import wait_until
from testkit import soak


def session(client) -> str:
    client.send("SESSION")
    word, token, handled = client.line().split()
    assert (word, len(token), handled) == ("SESSION", 32, "0")
    return token


def paired_with_a_session(procs, *extra):
    """holderd and chatd (with ``extra``), and a pair A-B, A with a session: (A, B, A's token)."""
    started(procs, *extra)
    a, b = procs.pair()
    return a, b, session(a)


def started(procs, *extra):
    procs.start_holderd()
    procs.start_chatd(*extra)
    return procs


def test_a_cut_session_resumes_with_every_message_after_its_n_exactly_once(procs):
    a, b, token = paired_with_a_session(procs)
    b.send("MSG one", "MSG two", "MSG three")
    assert a.lines(3) == ["FROM B 1 one", "FROM B 2 two", "FROM B 3 three"]
    a.send("ACK 1")
    assert a.line() == "HANDLED 0"
    a.send("MSG hello")
    assert b.line() == "FROM A 1 hello"
    a.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    a.sock.close()  # a reset: "two" and "three" were written, but say the client never read them
    b.send("MSG four")  # for A, while it is away: it waits in A's session
    again = procs.client()
    again.send(f"RESUME {token} 1")
    assert again.lines(4) == ["RESUMED A B 1", "FROM B 2 two", "FROM B 3 three", "FROM B 4 four"]
    again.send("MSG back")
    assert b.line() == "FROM A 2 back", "the peer saw nothing of the cut: n goes on"
    b.send("MSG five")
    assert again.line() == "FROM B 5 five"
    assert b.silent_for(0.2) and again.silent_for(0.1)
    b.send("WHO")
    assert sorted(b.lines(3)) == ["END", "USER A B", "USER B A"], "one A, paired"


def test_the_handled_count_says_which_commands_to_send_again(procs):
    a, b, token = paired_with_a_session(procs)
    a.send("MSG 1", "MSG 2", "PING")
    assert b.lines(2) == ["FROM A 1 1", "FROM A 2 2"]
    assert a.line() == "PONG"
    a.send("ACK 0")
    assert a.line() == "HANDLED 3", "two messages and a PING; not SESSION nor ACK"
    a.sock.sendall(b"MSG 3\nMSG 4 half a li")  # the last line never ends: not handled
    assert b.line() == "FROM A 3 3"
    a.sock.close()
    again = procs.client()
    again.send(f"RESUME {token} 0")
    assert again.line() == "RESUMED A B 4"
    again.send("MSG 4 whole")
    assert b.line() == "FROM A 4 4 whole"
    again.send("ACK 0")
    assert again.line() == "HANDLED 5"


def test_a_wrong_token_is_refused_and_the_connection_goes_on_as_a_new_client(procs):
    a, b, token = paired_with_a_session(procs, "--log-level", "DEBUG")  # every line that may name a token
    stranger = procs.client()
    for attempt in (f"RESUME {token[:-1]}0 0" if token[-1] != "0" else f"RESUME {token[:-1]}1 0",
                    "RESUME nothing 0", "RESUME", f"RESUME {token} x", f"RESUME {token.upper()} 0"):
        stranger.send(attempt)
        assert stranger.line() == "ERR unknown-session", attempt
    stranger.send("ACK 3")
    assert stranger.line() == "ERR no-session"
    stranger.send("NICK C")
    assert stranger.line() == "OK NICK C", "it goes on as a new client"
    a.send("MSG still here")
    assert b.line() == "FROM A 1 still here", "the session's own connection was not touched"
    log = open(procs.log_path(procs.chatd)).read()
    assert token not in log and f"session {token[:4]}… begins" in log, "a token is never logged whole"


def test_a_token_resumed_on_two_connections_ends_with_the_last_one_holding_it(procs):
    a, b, token = paired_with_a_session(procs)
    first, second = procs.client(), procs.client()
    first.send(f"RESUME {token} 0")
    assert first.line() == "RESUMED A B 0"
    assert a.sock.recv(100) == b"", "the connection that held the session is closed"
    second.send(f"RESUME {token} 0")
    assert second.line() == "RESUMED A B 0"
    assert first.sock.recv(100) == b""
    b.send("MSG to whoever holds A")
    assert second.line() == "FROM B 1 to whoever holds A"
    second.send("MSG from the last")
    assert b.line() == "FROM A 1 from the last"


def test_a_session_that_never_comes_back_ends_after_its_grace(procs):
    a, b, token = paired_with_a_session(procs, "--session-grace", "1")
    a.sock.close()
    time.sleep(0.5)
    b.send("MSG are you there")
    assert b.silent_for(0.3), "held for A, not refused: A's session waits"
    assert b.line() == "UNPAIRED A", "the grace ran out: A is gone, as if it said QUIT"
    late = procs.client()
    late.send(f"RESUME {token} 0")
    assert late.line() == "ERR unknown-session"
    late.send("NICK A")
    assert late.line() == "OK NICK A", "its nick is free again"


def test_quit_ends_a_session_at_once(procs):
    a, b, token = paired_with_a_session(procs)
    a.send("QUIT")
    assert a.line() == "BYE"
    assert b.line() == "UNPAIRED A"
    late = procs.client()
    late.send(f"RESUME {token} 0")
    assert late.line() == "ERR unknown-session"


def test_a_detached_session_survives_a_chatd_crash_with_what_waits_for_it(procs):
    a, b, token = paired_with_a_session(procs)
    b.send("MSG before")
    assert a.line() == "FROM B 1 before"
    a.sock.close()
    b.send("MSG while away")
    wait_until(lambda: procs.control("status")["clients"] == 1, 10, "A's connection to end")
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore")
    b.send("MSG after the crash")
    again = procs.client()
    again.send(f"RESUME {token} 1")
    assert again.lines(3) == ["RESUMED A B 0", "FROM B 2 while away", "FROM B 3 after the crash"]


def test_a_session_s_connection_comes_back_from_a_crash_still_holding_it(procs):
    a, b, token = paired_with_a_session(procs)
    b.send("MSG one")
    assert a.line() == "FROM B 1 one"
    procs.kill_chatd(signal.SIGKILL)
    procs.start_chatd("--restore")
    b.send("MSG two")
    assert a.line() == "FROM B 2 two"
    a.send("ACK 0")
    assert a.line() == "HANDLED 0"
    again = procs.client()
    again.send(f"RESUME {token} 0")
    assert again.lines(3) == ["RESUMED A B 0", "FROM B 1 one", "FROM B 2 two"], "kept until ACKed, across the crash"
    again.send("ACK 1")
    assert again.line() == "HANDLED 0"
    again.sock.close()
    last = procs.client()
    last.send(f"RESUME {token} 0")
    assert last.lines(2) == ["RESUMED A B 0", "FROM B 2 two"], "what the client ACKed is given up"


def test_pairs_streaming_through_random_cuts_and_crashes_lose_nothing(procs):
    started(procs)

    def crash(rng):
        procs.chatd.send_signal(rng.choice((signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)))
        procs.chatd.wait(20)
        procs.start_chatd("--restore", wait=False)

    tally = soak.run(procs.port, pairs=8, crashes=10, crash=crash, sessions=True, cuts=40, seed=28)
    print("cuts and crashes:", tally.row())
    assert tally.crashes == 10 and tally.cuts >= 40 and tally.resumes >= tally.cuts
    assert tally.sent > 1000
    assert tally.problems() == 0, (tally.row(), tally.notes)
    assert tally.received == tally.sent


def test_a_crowd_resuming_at_once_is_admitted_at_a_rate_and_told_when_to_come_back(procs):
    """300 sessions come back at once past --resume-rate: the ones over the burst hear ERR busy
    with a wait, and come back then; every one resumes; a pair chats on meanwhile."""
    import random
    import selectors

    started(procs, "--resume-rate", "40")
    a, b = procs.pair()
    crowd, tokens = [], []
    for _ in range(300):
        client = procs.client()
        tokens.append(session(client))
        crowd.append(client)
    for client in crowd:
        client.sock.close()
    selector = selectors.DefaultSelector()
    waiting = {}
    for index, token in enumerate(tokens):
        sock = socket.create_connection(("127.0.0.1", procs.port), timeout=10)
        sock.sendall(f"RESUME {token} 0\n".encode())
        selector.register(sock, selectors.EVENT_READ, index)
        waiting[index] = sock
    rng, retry_at, buffers, busy, resumed = random.Random(1), {}, {}, 0, set()
    sent_by_a = 0
    deadline = time.monotonic() + 120
    while len(resumed) < len(tokens) and time.monotonic() < deadline:
        for key, _ in selector.select(0.05):
            index = key.data
            data = key.fileobj.recv(4096)
            assert data, f"session {index}'s connection ended"
            buffers[index] = buffers.get(index, b"") + data
            while b"\n" in buffers[index]:
                line, _, buffers[index] = buffers[index].partition(b"\n")
                if line.startswith(b"ERR busy "):
                    busy += 1
                    retry_at[index] = time.monotonic() + rng.uniform(0, int(line.split()[2]))
                else:
                    assert line == b"RESUMED - - 0", line
                    resumed.add(index)
        now = time.monotonic()
        for index, when in list(retry_at.items()):
            if now >= when:
                del retry_at[index]
                waiting[index].sendall(f"RESUME {tokens[index]} 0\n".encode())
        sent_by_a += 1
        a.send(f"MSG {sent_by_a}")
        assert b.line() == f"FROM A {sent_by_a} {sent_by_a}", "the pair chats on while the crowd comes back"
    assert len(resumed) == len(tokens), f"{len(resumed)} of {len(tokens)} resumed"
    assert busy > 0, "past the burst, some were told to come back"
    for sock in waiting.values():
        sock.close()


def test_a_resume_racing_the_old_connection_s_last_commands_handles_each_once(procs):
    """The old connection's last commands are still on their way (unread, half read, or read and
    not handled) when the resume comes on a new one: RESUMED's count says exactly which were
    handled, and the client sends the rest again. Every message once, in order."""
    started(procs)
    holder, b = procs.pair()
    token = session(holder)
    sent = 0
    for race in range(20):
        burst = [f"MSG {sent + k + 1}" for k in range(race % 5 + 1)]
        holder.sock.sendall("".join(line + "\n" for line in burst).encode()[:-(race % 3)] if race % 3 else
                            "".join(line + "\n" for line in burst).encode())
        old = holder
        holder = procs.client()
        holder.send(f"RESUME {token} 0")
        word, nick, peer, handled = holder.line().split()
        assert (word, nick, peer) == ("RESUMED", "A", "B")
        handled = int(handled)
        assert sent <= handled <= sent + len(burst), (sent, handled, burst)
        holder.send(*(f"MSG {k}" for k in range(handled + 1, sent + len(burst) + 1)))
        sent += len(burst)
        old.sock.close()
    assert b.lines(sent) == [f"FROM A {k} {k}" for k in range(1, sent + 1)]
    assert b.silent_for(0.3)
