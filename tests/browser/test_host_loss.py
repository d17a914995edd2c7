"""A whole host lost under a page: headless Chromium, three chatd hosts behind a real HAProxy (issue 24).

Three chatd hosts over a real 3-node NATS JetStream cluster, Debian's haproxy in
front (tests/haproxied.py: the README's configuration, faster checks). Two
Chromium pages open the chat through HAProxy's web port only, each steered to a
host of its own (the other hosts drained for its connection): ann on h0, bob on
h1. Both pages type continuously (every 50 ms) while h0 is lost whole (its chatd
and holderd SIGKILLed: ann's connection and h0's journal are gone). ann's page
reconnects by itself, through the same address, HAProxy sends it to a live host,
and the page resumes its session there (``RESUME``: the session is kept in the
cluster, chatd.keeper) with what it typed while away. Once both pages chat again,
they stop typing, and each page's log must hold every message the other typed,
exactly once, in order, ``#n`` contiguous from 1; neither page fell back to a new
client or saw an error. The test prints how long ann's page took to chat again
(measured, not asserted). Chromium is ended after the module; the pages (a browser
context of the test's own), haproxy, every chatd, holderd and NATS node after the
test, failed or not.
"""

from __future__ import annotations

import json
import time

import pytest

from ctl.haproxy import WEB_BACKEND
from ctl.launch import wait_until
from haproxied import host_of, hosts_behind_haproxy, only
from test_browser import (SESSION_QUERY, WATCH_BADGE, assert_received_once_in_order, browser, open_page,  # noqa: F401
                          received, screenshot, stop_typing, typed, typing, wait_for_messages)

#: How long a page may take to show what it waits for: a bound, not a speed target (a loaded
#: 2-core machine running three hosts, three NATS nodes, HAProxy and Chromium falls behind).
BOUND_MS = 60000
#: The users type every 50 ms: each message is drawn, and a page's timers starve on a loaded machine.
TYPE = typing(50)


#: The hosts' lease: longer than the lost page takes to come back through HAProxy, so that its
#: session is taken over while the lost host's lease stands (past it, the session's peer is
#: shown it gone meanwhile: UNPAIRED, then PAIRED; README, "A host's loss is a reconnect").
LEASE = 20.0


@pytest.fixture
def behind_haproxy(tmp_path, request):
    with hosts_behind_haproxy(tmp_path, request, lease=LEASE) as both:
        yield both


@pytest.fixture
def context(browser):  # noqa: F811
    """A browser context of the test's own: its pages are closed with it, whatever happens."""
    each = browser.new_context(viewport={"width": 720, "height": 800})
    yield each
    each.close()


def page_on(context, cluster, proxy, index: int, nick: str, peer: str):
    """A page through HAProxy whose WebSocket lands on host ``index`` (the others drained while it opens)."""
    with only(proxy, WEB_BACKEND, index):
        page = open_page(context, None, nick, peer, SESSION_QUERY, port=proxy.web_port)
        page.wait_for_function(f"window.chat.nick === {nick!r}", timeout=BOUND_MS)
    assert host_of(cluster, nick) == index, f"{nick}'s WebSocket is on h{index}"
    return page


class Wire:
    """Every frame of one page's WebSockets, in order: ``(connection, "sent" | "got", message)``, the page's
    connections numbered from 1 (Playwright's events: the page is not changed). Read when a test fails."""

    def __init__(self):
        self.frames: list[tuple[int, str, dict]] = []
        self.connections = 0

    def watch(self, page) -> None:
        page.on("websocket", self._opened)

    def _opened(self, socket) -> None:
        self.connections += 1
        number = self.connections
        socket.on("framesent", lambda payload: self._add(number, "sent", payload))
        socket.on("framereceived", lambda payload: self._add(number, "got", payload))

    def _add(self, number: int, way: str, payload) -> None:
        try:
            self.frames.append((number, way, json.loads(payload)))
        except ValueError:
            self.frames.append((number, way, {"type": "?", "raw": str(payload)[:80]}))

    def story(self, prefix: str, missing: list[int]) -> str:
        """What the wire shows of the messages ``prefix:k`` (k in ``missing``): where each was sent, whether
        a pong answered it there, and what ``resumed`` said."""
        said = [f"resumed on connection {number}: {message}" for number, way, message in self.frames
                if message.get("type") == "resumed"]
        answered_last: dict[int, str] = {}  # a pong answers its connection's pings in order
        latest: dict[int, str | None] = {}
        pings: dict[int, list[str | None]] = {}
        for number, way, message in self.frames:
            if way == "sent" and message.get("type") == "msg":
                latest[number] = message.get("text")
            elif way == "sent" and message.get("type") == "ping":
                pings.setdefault(number, []).append(latest.get(number))
            elif way == "got" and message.get("type") == "pong" and pings.get(number):
                if (text := pings[number].pop(0)) is not None:
                    answered_last[number] = text
        said += [f"the last message a pong answered on connection {number}: {text}"
                 for number, text in sorted(answered_last.items())]
        ponged, each = [], []
        for k in missing:
            text = f"{prefix}:{k}"
            sent = [(index, number) for index, (number, way, message) in enumerate(self.frames)
                    if way == "sent" and message.get("type") == "msg" and message.get("text") == text]
            where = [number for _, number in sent]
            answered = bool(sent) and any(number == sent[0][1] and way == "got" and message.get("type") == "pong"
                                          for number, way, message in self.frames[sent[0][0]:])
            each.append(f"{text} sent on connection(s) {where}" + (", a pong after it there" if answered else ""))
            ponged.append(answered)
        return "; ".join(said + each[:3] + (["…"] if len(each) > 3 else []) + each[-2:] * (len(each) > 5)) + \
            f"; {sum(ponged)} of the {len(missing)} missing were answered by a pong on the connection that sent them"


def ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` as ``1-3, 7``."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)


def assert_each_once(page, name: str, other: str, expected: list[str], wire: Wire) -> None:
    """``page`` (``name``'s) shows ``expected`` (what ``other`` typed), each once, in order; waits a bounded
    time for it, and says what is missing or doubled (and what the page noted) if not."""
    deadline = time.monotonic() + BOUND_MS / 1000
    while len(received(page)) < len(expected) and time.monotonic() < deadline:
        time.sleep(0.2)
    texts = [m["text"] for m in received(page)]
    if texts != expected:
        numbers = [int(text.split(":")[1]) for text in texts]
        missing = sorted(set(range(1, len(expected) + 1)) - set(numbers))
        doubled = sorted({k for k in numbers if numbers.count(k) > 1})
        prefix = expected[0].split(":")[0] if expected else ""
        notes = page.locator("#log li.note, #log li.error").all_inner_texts()
        pytest.fail(f"{name} shows {len(texts)} of the {len(expected)} messages {other} typed; missing: "
                    f"{ranges(missing) or 'none'}; doubled: {ranges(doubled) or 'none'}; in order: "
                    f"{numbers == sorted(numbers)}; {name}'s notes: {notes}; {name}'s window.chat "
                    f"(messages left out): { {k: v for k, v in page.evaluate('window.chat').items() if k != 'messages'} }; "
                    f"{other}'s wire: {wire.story(prefix, missing)}")
    assert_received_once_in_order(page, expected)


def test_a_page_whose_host_is_lost_resumes_through_haproxy_on_another_host_and_both_logs_go_on_once(
        context, behind_haproxy):
    cluster, proxy = behind_haproxy
    wires = {"ann": Wire(), "bob": Wire()}
    context.once("page", wires["ann"].watch)
    ann = page_on(context, cluster, proxy, 0, "ann", "bob")
    context.once("page", wires["bob"].watch)
    bob = page_on(context, cluster, proxy, 1, "bob", "ann")
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r} && window.chat.session", timeout=BOUND_MS)
        page.evaluate(WATCH_BADGE)
        assert page.evaluate("link.socket.url") == f"ws://127.0.0.1:{proxy.web_port}/ws", "through HAProxy"
    assert set(proxy.states().values()) == {"UP"}, "every host ready again after the steering"
    ann.evaluate(TYPE, "a")
    bob.evaluate(TYPE, "b")
    wait_for_messages(ann, 20, BOUND_MS)
    wait_for_messages(bob, 20, BOUND_MS)

    # h0 is lost whole, while both type: ann's connection and h0's journal die with it.
    typed_before = {name: page.evaluate("window.typed.length") for name, page in (("ann", ann), ("bob", bob))}
    cluster.lose_host(0)
    lost = time.monotonic()
    ann.wait_for_function("window.chat.resumes === 1 && window.chat.state === 'open'", timeout=BOUND_MS)
    resumed = time.monotonic() - lost
    # Chatting again: each page shows a message the other typed after the loss.
    for page, name in ((bob, "ann"), (ann, "bob")):
        page.wait_for_function(f"window.chat.messages.length > {typed_before[name]}", timeout=BOUND_MS)
    chatting = time.monotonic() - lost
    landed = host_of(cluster, "ann")
    print(f"h0 lost: ann's page resumed on h{landed} through HAProxy {resumed:.2f} s after, both pages showed a "
          f"message typed after the loss {chatting:.2f} s after")  # measured, not asserted; told even on a failure
    assert landed in (1, 2), f"ann's page resumed on a live host (h{landed})"
    wait_until(lambda: proxy.host_state(0) == {"DOWN"}, 15, "HAProxy's checks to take h0 out")
    for page in (ann, bob):
        wait_for_messages(page, len(received(page)) + 20, BOUND_MS)

    for page in (ann, bob):
        stop_typing(page)
    for page in (ann, bob):
        page.wait_for_function("window.chat.pending === 0 && window.chat.state === 'open'", timeout=BOUND_MS)
    assert_each_once(ann, "ann", "bob", typed(bob, "b"), wires["bob"])
    assert_each_once(bob, "bob", "ann", typed(ann, "a"), wires["ann"])
    ann_chat, bob_chat = ann.evaluate("window.chat"), bob.evaluate("window.chat")
    assert ann_chat["opens"] == 2 and ann_chat["resumes"] == 1, "one new connection, its session taken back"
    assert bob_chat["opens"] == 1 and bob_chat["closes"] == 0 and bob_chat["resumes"] == 0, "bob's host lived"
    for page, chat in ((ann, ann_chat), (bob, bob_chat)):
        assert chat["fallbacks"] == 0 and chat["errors"] == [], chat
        assert page.locator("#log li.error").count() == 0 and page.locator("#log li.out.lost").count() == 0
    assert "reconnecting…" in ann.evaluate("window.badges")
    assert any(state != "open" for state in ann.evaluate("window.typed")), "ann typed while away, and it arrived once"
    screenshot(ann, "ann-after-host-loss.png")
    print(f"ann typed {len(typed(ann, 'a'))}, bob {len(typed(bob, 'b'))} through the loss of h0: each received "
          "once, in order")
