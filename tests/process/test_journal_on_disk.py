"""The journal on disk (``--state-dir``): chatd and holderd both killed, everything they kept
gone with them, and a new chatd starts from the file."""

import os
import signal
import subprocess
import sys

import pytest


def kill(proc) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL


def chatctl(procs, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl.cli", "--control", procs.control_socket,
                           "--holder", procs.holder_socket, *args],
                          capture_output=True, text=True, timeout=30, env=procs.env)


@pytest.fixture
def state_dir(tmp_path):
    return str(tmp_path / "state")


def test_chatd_and_holderd_killed_with_clients_paired_a_new_chatd_starts_from_the_journal_file(procs, state_dir):
    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    assert oct(os.stat(state_dir).st_mode & 0o777) == "0o700"
    assert oct(os.stat(os.path.join(state_dir, "journal")).st_mode & 0o777) == "0o600"
    a, b = procs.pair()
    for n in range(1, 6):  # numbered messages both ways
        a.send(f"MSG a{n}")
        assert b.line() == f"FROM A {n} a{n}"
        b.send(f"MSG b{n}")
        assert a.line() == f"FROM B {n} b{n}"
    kill(procs.chatd)
    kill(procs.holderd)  # and with it everything it kept: no fd store outside systemd
    for client in (a, b):
        with pytest.raises((EOFError, ConnectionResetError)):
            client.line()  # the connections end with the last process that held them

    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    log = procs.logs()
    assert f"starting from {state_dir}/journal, written in this boot" in log
    assert "the connections of its 2 clients are gone" in log
    status = procs.control("status")
    assert (status["restore"]["journal"], status["restore"]["clients"]) == ("state-dir", 0)
    assert status["journal"] == f"{state_dir}/journal"
    text = chatctl(procs, "status")
    assert text.returncode == 0 and f"started from {state_dir}/journal, the holders having kept nothing" in text.stdout
    # A and B asked for no session: their records went as those whose sockets did not come
    # back, freed: the nicks can be taken again, the pairing is gone, the count starts over.
    c, d = procs.pair("A", "B")
    c.send("MSG again")
    assert d.line() == "FROM A 1 again"
    # The holders keep the file itself: a crash of chatd alone restores the pair from it.
    kill(procs.chatd)
    procs.start_chatd("--state-dir", state_dir)
    assert procs.control("status")["restore"]["journal"] == "held"
    d.send("MSG after")
    assert c.line() == "FROM B 1 after"


def test_a_stop_seals_the_journal_and_chatd_seal_refuses_a_journal_served_from(procs, state_dir):
    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    refused = subprocess.run([sys.executable, "-m", "chatd", "--state-dir", state_dir, "--seal"],
                             capture_output=True, text=True, timeout=30, env=procs.env)
    assert refused.returncode == 1 and f"chatd pid {procs.chatd.pid} serves from" in refused.stderr
    procs.chatd.send_signal(signal.SIGTERM)
    assert procs.chatd.wait(10) == 0
    assert "journal sealed at commit" in procs.logs()
    sealed = subprocess.run([sys.executable, "-m", "chatd", "--state-dir", state_dir, "--seal"],
                            capture_output=True, text=True, timeout=30, env=procs.env)
    assert sealed.returncode == 0 and "sealed" in sealed.stderr


def test_a_journal_file_of_another_version_is_refused_and_left_as_it_is(procs, state_dir):
    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    kill(procs.chatd)
    kill(procs.holderd)
    path = os.path.join(state_dir, "journal")
    with open(path, "r+b") as journal:
        journal.write(b"CHATDJ04" + (4).to_bytes(4, "little"))
    before = head(path)
    procs.start_holderd()
    chatd = procs.start_chatd("--state-dir", state_dir, wait=False)
    assert chatd.wait(15) == 1
    assert f"the journal {path} is a chatd journal of version 4" in procs.logs()
    assert head(path) == before and os.listdir(state_dir) == ["journal"]


def head(path: str) -> bytes:
    """The header and every record of a journal (its rings are gigabytes of holes)."""
    with open(path, "rb") as journal:
        return journal.read(16 << 20)


def test_everything_killed_keeps_every_session_and_its_clients_resume_exactly_once(procs, state_dir):
    """Sessions survive what the journal on disk survives: chatd and holderd SIGKILLed (the
    connections end with them); the new chatd starts from the file with every session
    detached, and each client resumes: its pairing, the messages it lacked, its count."""
    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    a, b = procs.pair()
    tokens = {}
    for name, client in (("A", a), ("B", b)):
        client.send("SESSION")
        word, tokens[name], _ = client.line().split()
    a.send("MSG seen")
    assert b.line() == "FROM A 1 seen"
    b.sock.sendall(b"ACK 1\n")
    assert b.line() == "HANDLED 0"
    a.send("MSG never read", "ACK 0")  # sent to B's socket, which B never reads: it dies with the host
    assert a.line() == "HANDLED 2"
    b.send("MSG to A")
    assert a.line() == "FROM B 1 to A"
    kill(procs.chatd)
    kill(procs.holderd)
    procs.start_holderd()
    procs.start_chatd("--state-dir", state_dir)
    assert procs.control("status")["detached"] == 2, "every session waits for its client"
    b2 = procs.client()
    b2.send(f"RESUME {tokens['B']} 1")
    assert b2.lines(2) == ["RESUMED B A 1", "FROM A 2 never read"]
    a2 = procs.client()
    a2.send(f"RESUME {tokens['A']} 1")
    assert a2.line() == "RESUMED A B 2"
    a2.send("MSG after the host came back")
    assert b2.line() == "FROM A 3 after the host came back"
