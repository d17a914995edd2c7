"""The web port on a running chatd: HTTP answers, and WebSocket clients across crashes, mid-frame."""

from __future__ import annotations

import signal
import threading
import urllib.error
import urllib.request

import pytest

from ctl.launch import wait_until
from ctl.probe import LineClient, WebSocketClient


@pytest.fixture
def web(procs):
    procs.start_holderd()
    procs.start_chatd()
    return procs


def get(web, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{web.http_port}{path}", timeout=5) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def web_pair(web) -> tuple[WebSocketClient, WebSocketClient]:
    a, b = WebSocketClient(web.http_port), WebSocketClient(web.http_port)
    a.send({"type": "nick", "name": "A"}, {"type": "pair", "peer": "B"})
    b.send({"type": "nick", "name": "B"}, {"type": "pair", "peer": "A"})
    assert [m["type"] for m in a.messages(3)] == ["ok", "ok", "paired"]
    assert [m["type"] for m in b.messages(3)] == ["ok", "ok", "paired"]
    return a, b


def test_the_page_the_probe_and_errors_over_http(web):
    status, body = get(web, "/")
    assert status == 200 and b"<title>chat</title>" in body
    assert get(web, "/healthz") == (200, b"ok\n")
    assert get(web, "/nope")[0] == 404
    assert get(web, "/ws")[0] == 426, "a plain GET of the WebSocket says to upgrade"


def test_half_a_frame_received_when_chatd_dies_is_finished_not_lost(web):
    a, b = web_pair(web)
    frame = a.frame({"type": "msg", "text": "split across a crash"})
    a.send_raw(frame[:9])  # the header and a few bytes of payload: chatd reads them, then dies
    wait_until(lambda: web.control("status")["clients"] == 2, 5, "chatd to read")
    web.kill_chatd(signal.SIGKILL)
    web.start_chatd("--restore")
    a.send_raw(frame[9:])
    assert b.message() == {"type": "from", "from": "A", "n": 1, "text": "split across a crash"}
    a.send({"type": "msg", "text": "next"})
    assert b.message()["n"] == 2


def test_half_a_frame_sent_when_chatd_dies_is_finished_from_the_next_byte(web):
    """B reads nothing while A sends more than the sockets between chatd and B hold; chatd
    dies in the middle of a write to B (a fault point); B then reads whole frames, once each."""
    a, b = web_pair(web)
    web.kill_chatd(signal.SIGKILL)
    web.start_chatd("--restore", env={"CHATD_FAULT": "mid-write"})
    texts = [f"{k}:" + "w" * 60000 for k in range(160)]
    a.sock.settimeout(60)

    def write():
        try:
            a.send(*({"type": "msg", "text": text} for text in texts))
        except OSError:
            pass

    threading.Thread(target=write, daemon=True).start()
    assert web.chatd.wait(30) == -signal.SIGABRT
    web.start_chatd("--restore")
    assert web.control("status")["restore"]["output_resent"] > 0
    b.sock.settimeout(30)
    for k, text in enumerate(texts):
        assert b.message() == {"type": "from", "from": "A", "n": k + 1, "text": text}, f"message {k + 1}"


def test_a_browser_that_leaves_is_forgotten_everywhere(web):
    a, b = web_pair(web)
    line = LineClient(web.port)
    web.clients.append(line)
    from wsproto.events import CloseConnection

    a.send_raw(a.ws.send(CloseConnection(code=1000, reason="bye")))
    assert isinstance(a.event(), CloseConnection)
    assert b.message() == {"type": "unpaired", "peer": "A"}
    wait_until(lambda: web.control("status")["clients"] == 2, 5, "A to be closed")
    web.kill_chatd(signal.SIGKILL)
    web.start_chatd("--restore")
    assert web.control("status")["clients"] == 2, "A did not come back: no holder kept it"
