"""`chatctl cluster` run as an operator runs it: a real subprocess, crashed into, Ctrl-C'd.

The command runs in a session of its own, as in a terminal, so that Ctrl-C
(SIGINT to its process group) reaches it and everything it started. The test
learns ports and the chatctl to use from the command's own output, crashes a
host's chatd with that chatctl, and reads what the command says about it.
Whatever the outcome, the whole process group is ended and checked gone.
"""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading

import pytest

from ctl.launch import SOURCE_ROOT, wait_until
import urllib.request

from helpers import free_port, line_client, require_haproxy, require_nats

#: Longer than a NATS leader election after a node dies (4-9 s on 2.9): no live host is taken for dead.
LEASE = "20"
#: Generous: a cross-host message waits for a NATS leader election after a node dies.
CLIENT_TIMEOUT = 30
RESTARTED = re.compile(r"^h0: chatd \(pid (\d+)\) killed by SIGSEGV; restarted as pid (\d+), restoring from "
                       r"h0's holderd and journal: serving again in \d+ ms$")


class ClusterCommand:
    """``python -m ctl cluster ARGS`` in a session of its own, its output (stdout and stderr) read line by line."""

    def __init__(self, tmp_path, *args: str):
        self.scratch = tmp_path / "scratch"
        self.scratch.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctl", "cluster", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=tmp_path, start_new_session=True,
            env={**os.environ, "PYTHONPATH": SOURCE_ROOT, "TMPDIR": str(self.scratch)})
        self.output: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def expect(self, pattern: str | re.Pattern, timeout: float = 60) -> re.Match:
        """The first line from now on that matches ``pattern``; fails on timeout or the command's end."""
        pattern = re.compile(pattern)
        try:
            while True:
                line = self._lines.get(timeout=timeout)
                if line is None:
                    raise AssertionError(f"chatctl cluster ended (status {self.proc.wait()}) before a line "
                                         f"matching {pattern.pattern!r}")
                self.output.append(line)
                match = pattern.search(line)
                if match:
                    return match
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern.pattern!r} within {timeout} s") from None

    def rest(self, timeout: float = 60) -> list[str]:
        """Every line until the command's output ends."""
        lines = []
        while (line := self._lines.get(timeout=timeout)) is not None:
            lines.append(line)
        self.output.extend(lines)
        return lines

    def processes(self) -> list[str]:
        """What still runs in the command's process group (zombies too): ``pid command`` each."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    command = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if int(fields[2]) == self.proc.pid:  # the process group is the command's pid (its own session)
                found.append(f"{pid} {fields[0]} {command}")
        return found

    def interrupt(self) -> None:
        """Ctrl-C in its terminal: SIGINT to the whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        if self.processes():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def cluster_command(tmp_path, request):
    require_nats()
    made: list[ClusterCommand] = []

    def run(*args: str) -> ClusterCommand:
        made.append(ClusterCommand(tmp_path, *args))
        return made[-1]

    yield run
    for command in made:
        command.close()
        if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
            print("\n".join(command.output))


def started(command: ClusterCommand, hosts: int) -> list[dict]:
    """Each host's line port and chatctl, as the command prints them."""
    found = []
    for index in range(hosts):
        match = command.expect(rf"^h{index}: line port (\d+), web port \S+; chatctl for it: (.+)$")
        found.append({"port": int(match[1]), "chatctl": shlex.split(match[2])})
    return found


def run_chatctl(argv: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)


def no_process_left(command: ClusterCommand) -> None:
    wait_until(lambda: not command.processes(), 30, "every process of chatctl cluster to end")


def test_chatctl_cluster_restarts_a_crashed_chatd_and_pairs_across_hosts_chat_on(cluster_command):
    command = cluster_command("--hosts", "2", "--lease", LEASE)
    h0, h1 = started(command, 2)
    hint = command.expect(r"^see one host: (.+)$")[1]
    command.expect(r"Ctrl-C stops everything")
    shown = subprocess.run(hint, shell=True, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "holderd: protocol" in shown.stdout, "the printed hint must work as printed"
    assert "unreachable" not in shown.stdout and "holderd ok" in shown.stdout, shown.stdout
    assert run_chatctl(h1["chatctl"], "status").stdout.count("holderd ok") == 1, "h1's own chatctl line works"

    # Two cross-host pairs: one client of each on the host that crashes.
    ann, dee = (line_client(h0["port"], nick, pair, CLIENT_TIMEOUT) for nick, pair in (("ann", "bob"), ("dee", "cal")))
    bob, cal = (line_client(h1["port"], nick, pair, CLIENT_TIMEOUT) for nick, pair in (("bob", "ann"), ("cal", "dee")))
    for member, peer in ((ann, "bob"), (bob, "ann"), (dee, "cal"), (cal, "dee")):
        assert member.line() == f"PAIRED {peer}"
    sent = {"ann": 0, "bob": 0, "dee": 0, "cal": 0}

    def chat(round_name: str) -> None:
        for sender, name, receiver in ((ann, "ann", bob), (bob, "bob", ann), (dee, "dee", cal), (cal, "cal", dee)):
            sender.send(f"MSG {round_name}")
            sent[name] += 1
            assert receiver.line() == f"FROM {name} {sent[name]} {round_name}", "n counts on across crashes"

    chat("before")
    pids = set()
    for crash in (1, 2):
        reply = run_chatctl(h0["chatctl"], "crash")
        assert reply.returncode == 0 and "dying of SIGSEGV" in reply.stdout, reply
        for sender, name in ((ann, "ann"), (cal, "cal")):  # sent while h0 has no chatd: nothing may be lost
            sender.send(f"MSG while h0 is down {crash}")
            sent[name] += 1
        restarted = command.expect(RESTARTED)
        pids.update(restarted.groups())
        assert bob.line() == f"FROM ann {sent['ann']} while h0 is down {crash}"
        assert dee.line() == f"FROM cal {sent['cal']} while h0 is down {crash}"
        chat(f"after crash {crash}")
    assert len(pids) == 3, "two crashes, three chatds on h0"

    # A NATS node dies too: said, restarted, and the pairs chat on.
    nats = next(line for line in command.processes() if "nats-server" in line)
    os.kill(int(nats.split()[0]), signal.SIGKILL)
    command.expect(r"^NATS node n\d: nats-server \(pid \d+\) killed by SIGKILL; restarted as pid \d+")
    chat("after a NATS node died")
    for client in (ann, bob, dee, cal):
        assert client.silent_for(0.5), "nothing else came: no UNPAIRED, no BYE"

    command.interrupt()
    assert command.proc.wait(60) == 0
    assert "SIGINT: stopping every host and NATS" in command.rest()
    no_process_left(command)
    assert not os.listdir(command.scratch), "the scratch directory is removed"


def test_chatctl_cluster_stops_on_a_crash_loop_with_the_log_tail(cluster_command):
    command = cluster_command("--hosts", "2", "--lease", LEASE)
    h0, _ = started(command, 2)
    command.expect(r"Ctrl-C stops everything")
    # Without its holderd, h0's chatd has nothing to restore: each new one dies at once.
    holderd = next(line for line in command.processes()
                   if "holderd.daemon" in line and "/h0/holderd.sock" in line.split("--socket", 1)[1])
    os.kill(int(holderd.split()[0]), signal.SIGKILL)
    command.expect(r"^h0: holderd \(pid \d+\) killed by SIGKILL; the connections it kept are gone")
    assert run_chatctl(h0["chatctl"], "crash").returncode == 0
    command.expect(r"^h0: chatd \(pid \d+\) killed by SIGSEGV; restarted as pid \d+, .*FAILED: chatd exited with "
                   r"status 1$")
    command.expect(r"^chatctl cluster: h0's chatd \(pid \d+\) exited with status 1, its 5th death within 10 s: "
                   r"a crash loop, not restarted again")
    rest = command.rest()
    assert any("nothing to restore" in line for line in rest), "the log's tail tells why"
    assert command.proc.wait(60) == 1
    no_process_left(command)
    assert not os.listdir(command.scratch)


def test_kill_pid_of_chatctl_cluster_stops_everything_it_started(cluster_command):
    command = cluster_command("--hosts", "1", "--nats-nodes", "1")
    started(command, 1)
    command.expect(r"Ctrl-C stops everything")
    running = command.processes()
    assert any("-m chatd" in line for line in running) and any("nats-server" in line for line in running), \
        "the leftover check sees the processes the command runs"
    command.proc.send_signal(signal.SIGTERM)  # to chatctl cluster alone, not its group
    assert command.proc.wait(60) == 0
    assert "SIGTERM: stopping every host and NATS" in command.rest()
    no_process_left(command)
    assert not os.listdir(command.scratch)


def test_chatctl_cluster_with_haproxy_gives_every_client_one_address(cluster_command):
    require_haproxy()
    line_port = free_port()
    web_port = free_port()
    while web_port == line_port:
        web_port = free_port()
    command = cluster_command("--hosts", "2", "--nats-nodes", "1", "--haproxy", f"{line_port},{web_port}")
    started(command, 2)
    said = command.expect(r"^HAProxy in front of every host: line port (\d+), web port (\d+) "
                          r"\(http://127.0.0.1:\d+/\); its config (\S+), its log (\S+)$")
    assert (int(said[1]), int(said[2])) == (line_port, web_port)
    with open(said[3]) as f:
        config = f.read()
    assert "balance leastconn" in config and "check port" in config and "timeout tunnel" in config
    command.expect(rf"^through HAProxy: .* client --port {line_port} --nick ann --pair bob")
    command.expect(r"Ctrl-C stops everything")

    ann = line_client(line_port, "ann", "bob", CLIENT_TIMEOUT)
    bob = line_client(line_port, "bob", "ann", CLIENT_TIMEOUT)
    assert ann.line() == "PAIRED bob" and bob.line() == "PAIRED ann"
    ann.send("MSG through HAProxy")
    assert bob.line() == "FROM ann 1 through HAProxy"
    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=CLIENT_TIMEOUT) as response:
        assert response.read() == b"ok\n"

    # HAProxy dies: said, restarted on the same ports; its clients' connections died with it.
    haproxy = next(line for line in command.processes() if "haproxy -db" in line)
    os.kill(int(haproxy.split()[0]), signal.SIGKILL)
    command.expect(r"^haproxy \(pid \d+\) killed by SIGKILL; restarted as pid \d+")
    with pytest.raises((EOFError, ConnectionError)):
        ann.line()
    cal = line_client(line_port, "cal", None, CLIENT_TIMEOUT)
    cal.close()

    command.interrupt()
    assert command.proc.wait(60) == 0
    assert "SIGINT: stopping every host and NATS" in command.rest()
    no_process_left(command)
    assert not os.listdir(command.scratch), "the scratch directory is removed, HAProxy's files too"
