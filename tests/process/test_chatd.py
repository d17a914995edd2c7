"""Real holderd, chatd and clients on loopback: crashes by real signals, restores by a new chatd."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ctl.launch import SOURCE_ROOT, wait_until
from ctl.probe import LineClient
from holderd.client import HolderClient
from helpers import skip_or_fail


@pytest.fixture
def running(procs):
    procs.start_holderd()
    procs.start_chatd()
    return procs


def exchange(a, b, count_a, count_b, tag):
    """a and b each send one message; check the numbers the receivers see."""
    a.send(f"MSG {tag} from A")
    assert b.line() == f"FROM A {count_b} {tag} from A"
    b.send(f"MSG {tag} from B")
    assert a.line() == f"FROM B {count_a} {tag} from B"


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGKILL], ids=["SIGSEGV", "SIGKILL"])
def test_crash_after_backup_and_restore_keeps_connections_pairs_and_counters(running, sig):
    a, b = running.pair()
    silent = running.client()  # connected before the crash, said nothing
    exchange(a, b, 1, 1, "before")
    exchange(a, b, 2, 2, "before")
    backup = running.control("backup")
    # three clients; the two listeners (line, web), the journal, the last words, a bundle's two ends
    assert (backup["sockets"], backup["fds"], backup["kept_whole_by"]) == (3, 6, ["holderd"])
    running.kill_chatd(sig)
    a.send("MSG while down")  # waits in the kernel until a chatd reads it
    running.start_chatd("--restore")
    assert b.line() == "FROM A 3 while down"
    b.send("MSG after from B")
    assert a.line() == "FROM B 3 after from B"
    exchange(a, b, 4, 4, "later")
    silent.send("NICK S", "WHO")
    assert silent.lines(5) == ["OK NICK S", "USER A B", "USER B A", "USER S -", "END"]
    rows = running.control("clients")["clients"]
    assert {int(r["remote"].rsplit(":", 1)[1]) for r in rows} == {a.local_port, b.local_port, silent.local_port}
    assert all(r["held"] for r in rows)


def test_restore_mode_waits_for_chatctl_restore(running):
    a, b = running.pair()
    running.kill_chatd(signal.SIGSEGV)
    running.start_chatd("--restore", "--wait")
    assert running.control("status")["awaiting_restore"] is True
    a.send("MSG queued")
    assert b.silent_for(0.3), "nothing is relayed before the restore"
    reply = running.control("restore")
    assert (reply["clients"], reply["pairs"]) == (2, 1)
    assert b.line() == "FROM A 1 queued"


def test_chatctl_crash_is_a_real_sigsegv(running):
    out = subprocess.run(
        [sys.executable, "-m", "ctl.cli", "--control", running.control_socket, "crash", "--json"],
        capture_output=True, text=True, timeout=20, env=running.env,
    )
    assert out.returncode == 0, out.stderr
    assert running.chatd.wait(10) == -signal.SIGSEGV


def test_client_that_connects_while_chatd_is_dead_waits_in_the_backlog(running):
    a, b = running.pair()
    running.kill_chatd(signal.SIGKILL)
    late = LineClient(running.port)  # the kernel completes the handshake on the held listener
    running.clients.append(late)
    late.send("NICK late", "WHO")
    running.start_chatd("--restore")
    assert late.lines(4) == ["OK NICK late", "USER A B", "USER B A", "USER late -"]


def test_closing_on_purpose_removes_from_holderd_and_peer_hears(running):
    a, b = running.pair()
    a.send("QUIT")
    assert a.line() == "BYE"
    assert b.line() == "UNPAIRED A"
    from holderd.client import HolderClient
    names = {i["name"] for i in HolderClient(running.holder_socket).list()}
    assert names == {"chatd/listen", "chatd/listen-web", "chatd/state", "chatd/last-words", "chatd/bundle/0/1/w",
                     "chatd/bundle/0/1/r"}
    rows = running.control("clients")["clients"]
    assert [(row["nick"], row["held"]) for row in rows] == [("B", True)]


def test_protocol_errors_against_a_running_chatd(running):
    a, b = running.pair()
    c = running.client("C")
    c.send("NICK A", "MSG lonely", "BOGUS", "PAIR bad name")
    assert c.lines(4) == ["ERR nick-taken", "ERR not-paired", "ERR unknown-command", "ERR bad-name"]
    c.sock.sendall(b"MSG " + b"x" * 70000 + b"\nWHO\n")
    assert c.line() == "ERR line-too-long"
    assert c.lines(4) == ["USER A B", "USER B A", "USER C -", "END"]
    exchange(a, b, 1, 1, "unharmed")


def test_fresh_start_binds_even_with_time_wait_sockets(procs):
    procs.start_chatd("--no-holderd")
    a = procs.client("A")
    procs.kill_chatd(signal.SIGKILL)
    a.close()
    procs.start_chatd("--no-holderd")  # SO_REUSEADDR: no "address in use"
    procs.client("B")


def test_restore_without_anything_held_fails_clearly(procs):
    procs.start_holderd()
    chatd = procs.start_chatd("--restore", wait=False)
    assert chatd.wait(15) == 1
    assert "nothing to restore" in procs.logs()


def test_demo_exits_zero():
    out = subprocess.run([sys.executable, "-m", "ctl.cli", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="no system python3")
def test_the_readme_demo_command_runs_on_the_bare_system_python():
    """README's first command, exactly: Debian's python3 from the checkout, none of our
    dependencies installed (no venv, no user site): chatd serves the line protocol alone."""
    out = subprocess.run(["/usr/bin/python3", "-s", "-m", "ctl", "demo"], capture_output=True, text=True,
                         timeout=120, cwd=SOURCE_ROOT, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout


def test_a_slow_reader_slows_its_sender_down_instead_of_being_cut_off(running):
    """10 MB to a reader that does not read for a while: chatd stops reading the sender
    (TCP slows it down), and once the reader reads, every message arrives."""
    a, b = running.pair()
    texts = [f"{k}:" + "z" * 50000 for k in range(200)]
    a.sock.settimeout(60)
    writer = threading.Thread(target=a.send, args=[f"MSG {text}" for text in texts], daemon=True)
    writer.start()
    writer.join(2)
    assert writer.is_alive(), "the sender is held back while B does not read"
    b.sock.settimeout(30)
    for k, text in enumerate(texts):
        assert b.line() == f"FROM A {k + 1} {text}"
    writer.join(30)
    assert not writer.is_alive()


def test_a_reader_that_takes_nothing_for_the_stall_timeout_is_closed(procs):
    procs.start_holderd()
    procs.start_chatd("--stall-timeout", "1")
    a, b = procs.pair()
    a.sock.settimeout(30)

    def write():
        try:
            a.send(*[f"MSG {'q' * 60000}"] * 200)
        except OSError:
            pass  # the test is over and closed A

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    wait_until(lambda: "took none of its" in procs.logs(), 30, "B to be closed as stalled")
    lines = []
    wait_until(lambda: lines.append(a.line()) or lines[-1] == "UNPAIRED B", 30, "A to hear of it")
    procs.close()
    writer.join(10)


def test_out_of_fds_chatd_pauses_accepting_and_lives(procs):
    """chatd at its fd limit, by control connections that hold fds: its control socket's
    accept() fails with EMFILE. That took chatd down (only EAGAIN was caught); now both
    its listeners pause, it says so once, and its clients are unharmed."""
    procs.start_holderd()
    procs.start_chatd("--max-clients", "10", fd_limit=400)
    a, b = procs.pair()
    crowd = []
    while "accept failed" not in procs.logs():
        assert len(crowd) < 1000, "chatd never ran out of fds"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        crowd.append(sock)
        sock.settimeout(0.5)
        try:
            sock.connect(procs.control_socket)
        except (TimeoutError, BlockingIOError):
            pass  # the backlog is full: chatd stopped accepting
    late = LineClient(procs.port)  # waits in the backlog while chatd is out of fds
    exchange(a, b, 1, 1, "out of fds")
    assert procs.chatd.poll() is None
    for sock in crowd:
        sock.close()
    late.send("NICK late")
    assert late.line() == "OK NICK late"
    late.close()
    wait_until(lambda: "accepting again" in procs.logs(), 10, "chatd to say it accepts again")
    assert procs.logs().count("accept failed") <= 2, "said once per listener kind, not in a loop"
    exchange(a, b, 2, 2, "after")


def test_a_restarted_holderd_is_refilled_at_once_so_a_crash_right_after_loses_nothing(running):
    """Without systemd, holderd is the only holder: after it restarts empty, chatd must
    refill it the moment it answers (it hears its connection end), not at the next
    5-second audit, since a chatd crash in between would lose every connection. Twice,
    so that an audit that happens to come just in time cannot pass for it."""
    a, b = running.pair()
    exchange(a, b, 1, 1, "before")
    held_by_chatd = lambda: {item["name"] for item in HolderClient(running.holder_socket, timeout=1).list("chatd/")}
    kept = held_by_chatd()
    assert {"chatd/listen", "chatd/state"} <= kept
    for round_number in (2, 3):
        running.holderd.send_signal(signal.SIGKILL)
        running.holderd.wait(10)
        running.start_holderd()
        back = time.monotonic()
        wait_until(lambda: held_by_chatd() == kept, 10, "chatd to refill the new holderd")
        refilled_in = time.monotonic() - back
        assert refilled_in < 1.5, f"refilled {refilled_in:.1f} s after holderd answered: at the audit, not at once"
        exchange(a, b, round_number, round_number, f"holderd restarted {round_number - 1}x")
    running.kill_chatd(signal.SIGKILL)  # right after: holderd alone keeps everything
    running.start_chatd("--restore")
    exchange(a, b, 4, 4, "after chatd died")


def a_local_address_that_is_not_loopback() -> str | None:
    """This machine's address on its way out (no packet is sent), if it has one."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_one_address_cannot_take_every_slot(procs):
    address = a_local_address_that_is_not_loopback()
    if address is None:
        skip_or_fail("no non-loopback address to connect from", "this test")
    procs.start_holderd()
    procs.start_chatd("--host", "0.0.0.0", "--max-per-address", "3")
    first = [LineClient(procs.port, host=address) for _ in range(3)]
    for number, client in enumerate(first):
        client.send(f"NICK n{number}")
        assert client.line() == f"OK NICK n{number}"
    extra = LineClient(procs.port, host=address)
    assert extra.line() == "ERR too-many-connections"
    assert extra.sock.recv(10) == b"", "then closed"
    web = socket.create_connection((address, procs.http_port), timeout=5)
    assert web.recv(200).startswith(b"HTTP/1.1 503 "), "the web port counts the same address"
    web.close()
    local = procs.client("local")  # loopback is exempt
    first[0].close()
    wait_until(lambda: procs.control("status")["clients"] == 3, 10, "chatd to see a client go")
    again = LineClient(procs.port, host=address)
    again.send("NICK again")
    assert again.line() == "OK NICK again"
    assert procs.logs().count("refusing more clients from") == 1, "said once, not per attempt"
    for client in first[1:] + [extra, again, local]:
        client.close()


def test_a_web_client_that_never_finishes_its_request_is_closed(procs):
    procs.start_holderd()
    procs.start_chatd()
    slow = socket.create_connection(("127.0.0.1", procs.http_port), timeout=30)
    slow.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    started = time.monotonic()
    assert slow.recv(100) == b"", "closed"
    assert 9 < time.monotonic() - started < 25
    assert "sent no complete request in 10 s" in procs.logs()
    slow.close()


def chatctl(procs, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctl.cli", "--control", procs.control_socket, *argv],
                          capture_output=True, text=True, timeout=30, env=procs.env)


def held_names(procs) -> set[str]:
    """What holderd itself answers it keeps for chatd (its LIST)."""
    with HolderClient(procs.holder_socket) as holder:
        return {item["name"] for item in holder.list("chatd/")}


def test_backup_with_no_holderd_says_so_and_a_holderd_started_later_gets_everything_at_once(procs):
    procs.start_chatd()  # --holder names a socket nothing listens on, and there is no systemd
    a, b = procs.pair()
    out = chatctl(procs, "backup")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "holderd: keeps NOTHING, it did not answer: cannot reach holderd" in out.stdout
    assert "NOT backed up" in out.stdout
    out = chatctl(procs, "backup", "--json")
    assert out.returncode == 1
    reply = json.loads(out.stdout)
    assert (reply["sockets"], reply["fds"], reply["kept_whole_by"]) == (2, 6, [])
    [holderd] = reply["holders"]
    assert (holderd["holder"], holderd["answered"], holderd["keeps"], len(holderd["missing"])) == ("holderd", False, 0, 6)
    assert "holderd unavailable, retrieving skipped (asked every 0.1 s until it answers)" in procs.logs()

    procs.start_holderd()
    started = time.monotonic()
    wait_until(lambda: len(held_names(procs)) == 6, 3, "chatd to store everything in the new holderd")
    print(f"holderd started -> chatd's 6 fds stored in it: {(time.monotonic() - started) * 1000:.0f} ms")

    out = chatctl(procs, "backup", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    reply = json.loads(out.stdout)
    names = held_names(procs)
    assert reply["holders"] == [{"holder": "holderd", "answered": True, "listed": True, "keeps": len(names),
                                 "missing": [], "error": None}]
    assert len(names) == reply["fds"] == 6 and reply["kept_whole_by"] == ["holderd"]
    assert "holderd: keeps all 6 (by its own list)" in chatctl(procs, "backup").stdout
    procs.kill_chatd(signal.SIGSEGV)  # what holderd keeps is real: the pair lives on
    a.send("MSG after")
    procs.start_chatd("--restore")
    assert b.line() == "FROM A 1 after"


def test_backup_names_the_copies_a_holder_refused(procs):
    procs.start_holderd("--max-fds-per-uid", "4")  # the listeners, the journal and the last words fit, a bundle does not
    procs.start_chatd()
    procs.pair()
    out = chatctl(procs, "backup", "--json")
    assert out.returncode == 1, out.stdout + out.stderr
    reply = json.loads(out.stdout)
    [holderd] = reply["holders"]
    names = held_names(procs)
    assert names == {"chatd/listen", "chatd/listen-web", "chatd/state", "chatd/last-words"}
    assert holderd["answered"] and holderd["keeps"] == len(names) == 4 and reply["kept_whole_by"] == []
    assert len(holderd["missing"]) == 2 and not set(holderd["missing"]) & names
    assert all(name.startswith("chatd/bundle/0/") for name in holderd["missing"])
    assert "may hold at most 4 fds" in holderd["error"]
    text = chatctl(procs, "backup").stdout
    assert "holderd: keeps 4 of 6 (by its own list); no copy of chatd/bundle/0/" in text and "NOT backed up" in text


def refuses(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` any more (every copy of the listener is closed)."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED


def test_a_restore_with_another_port_listens_there_and_the_clients_connected_stay(running):
    from helpers import free_port

    a, b = running.pair()
    exchange(a, b, 1, 1, "before")
    old_port, new_port = running.port, free_port()
    running.kill_chatd(signal.SIGKILL)
    running.port = new_port
    status = running.start_chatd("--restore") and running.wait_chatd()
    assert status["port"] == new_port and status["clients"] == 2
    assert (f"listening on 127.0.0.1:{new_port} instead of 127.0.0.1:{old_port} (--host/--port changed); "
            "the 2 clients connected keep their connections") in running.logs()
    exchange(a, b, 2, 2, "on the old port's connections")
    c = LineClient(new_port)
    c.send("NICK C")
    assert c.line() == "OK NICK C"
    # holderd let go of the old listener when it was given the new one under its name.
    wait_until(lambda: refuses(old_port), 5, f"port {old_port} to be closed")
    # Port 0 ("any") keeps the listener kept, which is the new one now.
    running.kill_chatd(signal.SIGKILL)
    running.port = None
    assert running.start_chatd("--restore") and running.wait_chatd()["port"] == new_port
    exchange(a, b, 3, 3, "after a second crash")
    c.close()


def test_a_restore_with_another_address_of_the_same_port_takes_it(running):
    """127.0.0.1:P to 0.0.0.0:P: the kept listener holds the port, so it goes first."""
    a, b = running.pair()
    port = running.port
    running.kill_chatd(signal.SIGKILL)
    running.start_chatd("--restore", "--host", "0.0.0.0")
    assert (f"listening on 0.0.0.0:{port} instead of 127.0.0.1:{port} (--host/--port changed)"
            in running.logs())
    exchange(a, b, 1, 1, "after")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
        assert probe.getpeername()[1] == port
    # A restart with the same options keeps the listener it kept, and says nothing of it.
    running.kill_chatd(signal.SIGKILL)
    running.start_chatd("--restore", "--host", "0.0.0.0")
    assert running.logs().count("instead of") == 2  # the line port's and the web port's, once
    exchange(a, b, 2, 2, "again")


def test_a_restore_with_http_port_minus_one_closes_the_web_port(running):
    a, b = running.pair()
    web_port = running.http_port
    running.kill_chatd(signal.SIGKILL)
    status = running.start_chatd("--restore", "--http-port", "-1") and running.wait_chatd()
    # The line listener, the journal, the last words and a bundle's two ends: the web listener is gone
    # from holderd too.
    assert status["http_port"] is None and status["held"]["holderd"] == 5
    assert f"no longer listening for the web on 127.0.0.1:{web_port} (--http-port -1)" in running.logs()
    wait_until(lambda: refuses(web_port), 5, f"web port {web_port} to be closed")
    exchange(a, b, 1, 1, "on the line port")


def held_by_holderd(procs) -> dict[str, int]:
    """What holderd keeps for chatd: name -> inode."""
    with HolderClient(procs.holder_socket) as holder:
        return {item["name"]: item["ino"] for item in holder.list("chatd/")}


def rewrite_held_journal_header(procs, header: bytes) -> None:
    """Write over the first bytes of the journal holderd keeps (the memfd itself, shared)."""
    with HolderClient(procs.holder_socket) as holder:
        items = holder.retrieve("chatd/state")
    try:
        assert [item.name for item in items] == ["chatd/state"]
        os.pwrite(items[0].fd, header, 0)
    finally:
        for item in items:
            os.close(item.fd)


def test_a_journal_of_a_newer_version_is_refused_and_everything_held_stays(running):
    """A journal a newer release wrote (version 4) is not served from and not replaced: chatd
    exits non-zero naming the fix, holderd keeps every name and inode, the connections stay
    open, and the release that reads the journal serves them on, counts and pairing kept."""
    from chatd.journal import MAGIC, VERSION

    a, b = running.pair()
    exchange(a, b, 1, 1, "before")
    running.kill_chatd(signal.SIGKILL)
    held = held_by_holderd(running)
    assert {"chatd/listen", "chatd/state"} <= held.keys()
    rewrite_held_journal_header(running, b"CHATDJ04" + (4).to_bytes(4, "little"))

    chatd = running.start_chatd(wait=False)
    assert chatd.wait(15) == 1, "refused: exits non-zero"
    logs = running.logs()
    assert "journal of version 4" in logs and f"reads journal version {VERSION} only" in logs
    assert "`chatd --fresh`" in logs and "starting a new one" not in logs
    assert held_by_holderd(running) == held, "holderd keeps the same names and inodes"
    assert a.silent_for(0.2) and b.silent_for(0.2), "the connections are open, nothing said on them"
    a.send("MSG while refused")  # waits in the kernel for a chatd that reads the journal

    rewrite_held_journal_header(running, MAGIC + VERSION.to_bytes(4, "little"))  # as if that release ran
    running.start_chatd("--restore")
    assert b.line() == "FROM A 2 while refused", "the pairing and count kept"
    exchange(a, b, 2, 3, "after")
