"""``chatctl shell`` driven as a person types it: a real ``python -m ctl shell`` process, its
stdin a pipe, the instructions typed all at once or one at a time after each prompt.

Every instruction must answer with what is true (a backup with what holderd itself lists,
a message with where it went), and none may end the console: failures are printed and
the prompt comes back.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from ctl.launch import SOURCE_ROOT, wait_until
from holderd.client import HolderClient

PROMPT = "master> "
#: The seed's story, in SHELL_HELP's order.
SEED_STORY = ["1to2", "2to1", "create", "backup", "1to2", "crash", "1to2", "restart", "restore", "1to2", "2to1",
              "status", "exit"]


class Console:
    """One ``python -m ctl shell``, in a session of its own so that everything it started
    can be ended with it, whatever happens; its scratch directory is under the test's."""

    def __init__(self, tmp_path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ctl", "shell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, cwd=SOURCE_ROOT, start_new_session=True,
            env={**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1"},
        )
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: os.read(self.proc.stdout.fileno(), 65536), b""):
            with self._lock:
                self._chunks.append(chunk)

    @property
    def output(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    def type_all(self, lines: list[str]) -> str:
        """Everything at once, as pasted; then the end of input. The whole output."""
        self.proc.stdin.write("".join(line + "\n" for line in lines).encode())
        self.proc.stdin.close()
        return self.wait()

    def type_one_by_one(self, lines: list[str], pause: float, after_prompt=lambda done: None) -> str:
        """Each line once the prompt is back and ``pause`` seconds more; ``after_prompt(i)``
        runs when the answer to the first ``i`` lines is complete."""
        for done, line in enumerate(lines):
            wait_until(lambda: self.output.count(PROMPT) > done or self.proc.poll() is not None, 60,
                       f"the prompt after {lines[:done]}")
            assert self.proc.poll() is None, f"the console ended before {line!r}:\n{self.output}"
            after_prompt(done)
            time.sleep(pause)
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        self.proc.stdin.close()
        return self.wait()

    def wait(self) -> str:
        self.proc.wait(60)
        self._reader.join(10)
        return self.output

    def answers(self) -> list[str]:
        """What each instruction printed before the next prompt (the clients' own lines may
        land a little later)."""
        return self.output.split(PROMPT)[1:]

    def holderd_socket(self) -> str:
        return re.search(r"holderd started \(pid \d+\), socket (\S+)", self.output)[1]

    def close(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the console and all it started, none left behind
            except ProcessLookupError:
                break
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


@pytest.fixture
def console(tmp_path, request):
    running = Console(tmp_path)
    yield running
    running.close()
    if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
        print(running.output)


def received(output: str, nick: str) -> list[tuple[int, int, str]]:
    """(k, n, text) of every message a client printed."""
    return [(int(k), int(n), text) for k, n, text in re.findall(rf"\[{nick}\] #(\d+) FROM \S+ (\d+) (.*)", output)]


def check_no_crash_of_the_console(console: Console) -> None:
    assert console.proc.returncode == 0, console.output
    assert "Traceback" not in console.output


def check_seed_story(console: Console) -> None:
    """The story went as it should, and every answer says what happened."""
    check_no_crash_of_the_console(console)
    output, answers = console.output, console.answers()
    assert "error:" not in output
    expected = {
        0: "C2 received: #1 FROM C1 1 message 1 from C1",
        1: "C1 received: #1 FROM C2 1 message 2 from C2",
        2: "holderd started",
        3: "holderd: keeps all 6 (by its own list)",
        4: "C2 received: #2 FROM C1 2 message 3 from C1",
        5: "died of SIGSEGV; holderd keeps its 6 fds: the clients' connections stay open",
        6: "C1 sent 'message 4 from C1' (chatd is down: it waits in the kernel",
        7: "in restore mode, waiting for `restore`",
        8: "restore: 2 clients and 1 pair back on port",
        9: "C2 received: #4 FROM C1 4 message 5 from C1",
        10: "C1 received: #2 FROM C2 2 message 6 from C2",
        11: "2 clients, 1 pair; holders: holderd ok (6 fds)",
    }
    for index, text in expected.items():
        assert text in answers[index], f"{SEED_STORY[index]!r} answered {answers[index]!r}, not {text!r}"
    assert "NOT backed up" not in answers[3]
    assert "holderd: protocol 1, holds 6 fds" in answers[11]
    # The message sent while chatd was down came after the restore, numbered on; no message
    # twice, none lost, and no connection ended before `exit` ended them.
    assert received(output, "C2") == [(k, k, f"message {m} from C1") for k, m in enumerate([1, 3, 4, 5], 1)]
    assert received(output, "C1") == [(1, 1, "message 2 from C2"), (2, 2, "message 6 from C2")]
    last_prompt = output.rindex(PROMPT)
    assert "EOF" not in output[:last_prompt], "a client's connection ended before exit"


def test_the_seed_story_typed_all_at_once(console):
    console.type_all(SEED_STORY)
    check_seed_story(console)


def test_the_seed_story_typed_a_second_apart_with_backup_checked_against_holderd(console):
    listed = {}

    def ask_holderd(done: int) -> None:
        if SEED_STORY[:done][-1:] in (["backup"], ["crash"]):
            with HolderClient(console.holderd_socket()) as holder:
                listed[SEED_STORY[done - 1]] = {item["name"] for item in holder.list("chatd/")}

    console.type_one_by_one(SEED_STORY, pause=1.0, after_prompt=ask_holderd)
    check_seed_story(console)
    said = int(re.search(r"holderd: keeps all (\d+) \(by its own list\)", console.answers()[3])[1])
    assert said == len(listed["backup"]) == 6
    assert {"chatd/listen", "chatd/state", "chatd/last-words"} <= listed["backup"] == listed["crash"]


def test_backup_before_create_and_right_after_it_say_what_holderd_keeps(console):
    story = ["backup", "create", "backup", "crash", "1to2", "restart", "restore", "2to1", "exit"]
    listed = {}

    def ask_holderd(done: int) -> None:
        if done == 3:  # the answer to the second backup is in; nothing paused before it
            with HolderClient(console.holderd_socket()) as holder:
                listed["after"] = {item["name"] for item in holder.list("chatd/")}

    console.type_one_by_one(story, pause=0, after_prompt=ask_holderd)
    check_no_crash_of_the_console(console)
    answers = console.answers()
    assert "holderd: keeps NOTHING, it did not answer: cannot reach holderd" in answers[0]
    assert "NOT backed up" in answers[0] and "type create, then backup" in answers[0]
    said = int(re.search(r"holderd: keeps all (\d+) \(by its own list\)", answers[2])[1])
    assert said == len(listed["after"]) == 6 and "NOT backed up" not in answers[2]
    assert "holderd keeps its 6 fds: the clients' connections stay open" in answers[3]
    assert "it waits in the kernel" in answers[4]
    assert "restore: 2 clients and 1 pair" in answers[6]
    assert "C1 received: #1 FROM C2 1 message 2 from C2" in answers[7]
    assert received(console.output, "C2") == [(1, 1, "message 1 from C1")]


def test_after_the_clients_died_every_instruction_answers_truly_and_the_console_goes_on(console):
    story = ["1to2", "crash", "status", "1to2", "2to1", "1to2", "backup", "restart", "restore", "1to2", "crash",
             "bogus", "status", "help", "exit"]
    console.type_all(story)
    check_no_crash_of_the_console(console)
    answers = console.answers()
    assert "C2 received: #1 FROM C1 1 message 1 from C1" in answers[0]
    assert "died of SIGSEGV, and nothing kept its client sockets (no holderd runs)" in answers[1]
    assert "C1's and C2's connections are gone (both got EOF)" in answers[1]
    assert "chatd: cannot reach chatd's control socket" in answers[2]
    for index in (3, 4, 5):
        assert "error: story-failed: nothing sent:" in answers[index] and "connection was closed" in answers[index]
    assert "waits in the kernel" not in console.output
    assert "error:" in answers[6]  # no chatd to ask
    assert "in restore mode" in answers[7]
    assert "nothing to restore: no holder kept chatd's sockets" in answers[8]
    assert "nothing sent:" in answers[9]
    assert "error: not-serving" in answers[10]
    assert "unknown instruction 'bogus'" in answers[11]
    assert "waiting for `chatctl restore`" in answers[12]
    assert "chatctl shell: crash and restore a chatd by hand" in answers[13]
    assert received(console.output, "C2") == [(1, 1, "message 1 from C1")]
