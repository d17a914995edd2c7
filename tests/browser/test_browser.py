"""A real browser never notices chatd's crash, and is told the truth when it should notice:
headless Chromium on the chat page.

Debian's chromium, driven by Playwright (executable_path, --no-sandbox: no browser
download). Each page records what it saw in window.chat (see chatd/web/app.js),
including how many times its WebSocket's close event fired: across crashes, never,
is the point. When chatd does not answer, when the server says goodbye, and when the
connection is really gone, the page says which (the last tests).
Screenshots go to $ARTIFACTS_DIR (default: test-artifacts/ in the checkout).
"""

from __future__ import annotations

import os
import random
import signal
import shutil
import time
from pathlib import Path

import pytest

from ctl.launch import wait_until
from ctl.probe import LineClient
from helpers import skip_or_fail

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        skip_or_fail("Debian's chromium is not installed (apt-get install chromium)", "the browser tests")
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=[
        "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"])
    yield chromium
    chromium.close()
    playwright.stop()


@pytest.fixture
def web(procs):
    procs.start_holderd()
    procs.start_chatd()
    return procs


def open_page(browser, web, nick: str, peer: str, query: str = "", port: int | None = None, scheme: str = "http"):
    """A page on chatd's web port (or ``port``: a proxy in front of it) that names itself and pairs;
    ``browser`` may also be a browser context (its pages take the context's viewport)."""
    viewport = {"width": 720, "height": 800}
    page = browser.new_page(viewport=viewport) if hasattr(browser, "new_context") else browser.new_page()
    page.goto(f"{scheme}://127.0.0.1:{port or web.http_port}/{query}")
    page.wait_for_function("window.chat.opens === 1")
    page.fill("#nick", nick)
    page.click("#nick-form button")
    page.wait_for_function(f"window.chat.nick === {nick!r}")
    page.fill("#peer", peer)
    page.click("#pair-form button")
    return page


def say(page, text: str) -> None:
    page.fill("#text", text)
    page.click("#send")


def received(page) -> list:
    return page.evaluate("window.chat.messages")


def wait_for_messages(page, count: int, timeout_ms: int = 15000) -> None:
    page.wait_for_function(f"window.chat.messages.length >= {count}", timeout=timeout_ms)


def crash_and_restore(web, sig=signal.SIGSEGV) -> None:
    web.kill_chatd(sig)
    web.start_chatd("--restore")


def test_two_pages_chat_on_through_two_crashes_and_never_see_their_socket_close(browser, web):
    ann, bob = open_page(browser, web, "ann", "bob"), open_page(browser, web, "bob", "ann")
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r}")
    say(ann, "hello bob")
    wait_for_messages(bob, 1)
    say(bob, "hi ann")
    wait_for_messages(ann, 1)
    for crash in range(2):
        crash_and_restore(web)
        say(ann, f"after crash {crash + 1}")
        wait_for_messages(bob, crash + 2)
        say(bob, f"back {crash + 1}")
        wait_for_messages(ann, crash + 2)
    assert [(m["n"], m["text"]) for m in received(bob)] == [(1, "hello bob"), (2, "after crash 1"),
                                                             (3, "after crash 2")]
    assert [(m["n"], m["text"]) for m in received(ann)] == [(1, "hi ann"), (2, "back 1"), (3, "back 2")]
    for page in (ann, bob):
        assert page.evaluate("window.chat.closes") == 0, "the page's WebSocket close event never fired"
        assert page.evaluate("window.chat.opens") == 1, "one connection all along"
        assert page.inner_text("#state") == "open"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    ann.screenshot(path=str(ARTIFACTS / "ann-after-two-crashes.png"))
    bob.screenshot(path=str(ARTIFACTS / "bob-after-two-crashes.png"))
    print(f"screenshots: {ARTIFACTS}/ann-after-two-crashes.png, bob-after-two-crashes.png")


def test_a_page_and_a_line_client_chat_across_a_crash(browser, web):
    page = open_page(browser, web, "webby", "liner")
    line = LineClient(web.port)
    web.clients.append(line)
    line.send("NICK liner", "PAIR webby")
    assert line.lines(3) == ["OK NICK liner", "OK PAIR webby", "PAIRED webby"]
    page.wait_for_function("window.chat.paired === 'liner'")
    say(page, "from the browser")
    assert line.line() == "FROM webby 1 from the browser"
    crash_and_restore(web, signal.SIGKILL)
    line.send("MSG from a terminal")
    wait_for_messages(page, 1)
    say(page, "still here")
    assert line.line() == "FROM webby 2 still here"
    assert received(page) == [{"from": "liner", "n": 1, "text": "from a terminal"}]
    assert page.evaluate("window.chat.closes") == 0


STREAM = """(peer) => {
    window.streamed = 0;
    window.streaming = setInterval(() => {
        window.streamed += 1;
        send({type: "msg", text: "k:" + window.streamed});
    }, 4);
}"""


def test_a_browser_pair_streaming_through_random_kills_loses_and_repeats_nothing(browser, web):
    ann, bob = open_page(browser, web, "ann", "bob"), open_page(browser, web, "bob", "ann")
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r}")
    for page in (ann, bob):
        page.evaluate(STREAM)
    rng = random.Random(5)
    for _ in range(10):
        time.sleep(rng.uniform(0.1, 0.4))
        crash_and_restore(web, rng.choice((signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)))
    time.sleep(0.3)
    for page in (ann, bob):
        page.evaluate("clearInterval(window.streaming)")
    for page, other in ((ann, bob), (bob, ann)):
        sent = other.evaluate("window.streamed")
        page.wait_for_function(f"window.chat.messages.length >= {sent}", timeout=90000)  # a bound, not a speed target: a loaded machine draws slowly
        got = received(page)
        assert [m["text"] for m in got] == [f"k:{k}" for k in range(1, sent + 1)], "each once, in order"
        assert [m["n"] for m in got] == list(range(1, sent + 1))
        assert page.evaluate("window.chat.closes") == 0 and page.evaluate("window.chat.errors") == []
    print(f"streamed through 10 kills: {ann.evaluate('window.streamed')} and {bob.evaluate('window.streamed')} "
          "messages, each received once")


def pair_pages(browser, web, query: str = ""):
    ann, bob = open_page(browser, web, "ann", "bob", query), open_page(browser, web, "bob", "ann", query)
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r}")
    return ann, bob


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))
    print(f"screenshot: {ARTIFACTS / name}")


def test_while_chatd_does_not_answer_the_page_says_it_waits_and_what_was_typed_arrives_once(browser, web):
    ann, bob = pair_pages(browser, web)
    say(ann, "before")
    wait_for_messages(bob, 1)
    ann.wait_for_function("window.chat.pending === 0 && window.chat.state === 'open'")
    # Stopped, then dead: the socket stays open both times (holderd keeps it), chatd answers nothing.
    for stop, back in (("SIGSTOP", "SIGCONT"), ("SIGKILL", "restore")):
        if stop == "SIGSTOP":
            web.chatd.send_signal(signal.SIGSTOP)
        else:
            web.kill_chatd(signal.SIGKILL)
        say(ann, f"while chatd got {stop}")
        ann.wait_for_function("window.chat.state === 'waiting'", timeout=10000)
        assert ann.inner_text("#state") == "waiting for the server"
        status = ann.inner_text("#status")
        assert "not answering" in status and "kept and delivered when it is back" in status, status
        assert ann.evaluate("window.chat.pending") == 1
        assert ann.locator("#log li.out.pending").count() == 1
        assert "nothing lost" in ann.inner_text("footer"), "true: the socket is open, what is typed waits"
        assert not ann.is_disabled("#text"), "typing goes on: it is kept"
        if stop == "SIGKILL":
            screenshot(ann, "ann-waiting-for-chatd.png")
        if back == "SIGCONT":
            web.chatd.send_signal(signal.SIGCONT)
        else:
            web.start_chatd("--restore")
        ann.wait_for_function("window.chat.state === 'open' && window.chat.pending === 0", timeout=15000)
        assert ann.inner_text("#state") == "open" and not ann.is_visible("#status")
        assert ann.locator("#log li.out.pending").count() == 0
    say(ann, "after")
    wait_for_messages(bob, 4)
    assert [(m["n"], m["text"]) for m in received(bob)] == [
        (1, "before"), (2, "while chatd got SIGSTOP"), (3, "while chatd got SIGKILL"), (4, "after")], "each once"
    for page in (ann, bob):
        assert page.evaluate("window.chat.closes") == 0 and page.evaluate("window.chat.opens") == 1


def test_after_a_drain_the_page_says_the_chat_ended_and_does_not_come_back_by_itself(browser, web):
    ann, bob = pair_pages(browser, web)
    assert len(web.control("clients")["clients"]) == 2
    assert web.control("drain")["drained"] == 2
    for page in (ann, bob):
        page.wait_for_function("window.chat.state === 'ended'")
    # The old page reconnected within half a second; give it several.
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        assert web.control("clients")["clients"] == [], "no page came back by itself"
        time.sleep(0.2)
    for page in (ann, bob):
        assert page.evaluate("window.chat.opens") == 1
        assert page.inner_text("#state") == "ended"
        assert "ended this chat" in page.inner_text("#status")
        assert page.inner_text("#status-action") == "Start again"
        assert "nothing lost" not in page.inner_text("footer")
        assert page.is_disabled("#text")
    screenshot(ann, "ann-after-drain.png")
    for page in (ann, bob):
        page.click("#status-action")  # the user's choice: a new connection, the same name and pairing
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.state === 'open' && window.chat.paired === {peer!r}")
    assert len(web.control("clients")["clients"]) == 2
    say(ann, "a new chat")
    wait_for_messages(bob, 1)
    assert received(bob) == [{"from": "ann", "n": 1, "text": "a new chat"}]


def test_with_chatd_and_holderd_gone_the_page_retries_in_one_line_then_gives_up_and_offers_to_reconnect(browser, web):
    retries = 4
    ann = open_page(browser, web, "ann", "bob", f"?retries={retries}&backoff_ms=200&backoff_cap_ms=600")
    bob = LineClient(web.port)
    web.clients.append(bob)
    bob.send("NICK bob", "PAIR ann")
    ann.wait_for_function("window.chat.paired === 'bob' && window.chat.session")
    assert "nothing lost" in ann.inner_text("footer")
    web.kill_chatd(signal.SIGKILL)
    say(ann, "into the void")  # waits in the kernel: gone with the socket when holderd dies too
    ann.wait_for_function("window.chat.state === 'waiting'", timeout=10000)
    # Everything the status line and the log ever show, seen from inside the page: a try
    # may last a few milliseconds (the jitter may pick 0), too short for polling to catch.
    ann.evaluate("""() => {
        window.seen = {statuses: [], logLengths: []};
        const status = document.getElementById("status-text"), log = document.getElementById("log");
        new MutationObserver(() => seen.statuses.push(status.textContent))
            .observe(status, {childList: true, characterData: true, subtree: true});
        new MutationObserver(() => seen.logLengths.push(log.children.length)).observe(log, {childList: true});
    }""")
    web.holderd.send_signal(signal.SIGKILL)
    assert web.holderd.wait(10) == -signal.SIGKILL
    lost_at = time.monotonic()
    ann.wait_for_function("window.chat.state === 'offline'", timeout=20000)
    print(f"gave up {time.monotonic() - lost_at:.2f} s after holderd died ({retries} tries)")
    seen = ann.evaluate("window.seen")
    assert seen["logLengths"] == [], "with a session, nothing in the log while it retries: the chat may go on"
    assert ann.locator("#log li.out.pending").all_inner_texts() == ["into the void"], "kept, to send on resume"
    assert ann.locator("#status").count() == 1, "one status line, its text updated in place"
    for attempt in range(1, retries + 1):
        assert any(f"(try {attempt} of {retries})" in text for text in seen["statuses"]), seen["statuses"]
    assert ann.evaluate("window.chat.attempts") == retries
    assert ann.inner_text("#state") == "offline"
    assert ann.inner_text("#status-text") == (f"Could not reach the server ({retries} tries). What you typed is kept: "
                                              "reconnecting sends it, if the server still has this chat.")
    assert ann.inner_text("#status-action") == "Reconnect"
    assert not ann.is_disabled("#text"), "typing goes on: kept for the resume"
    footer = ann.inner_text("footer")
    assert "nothing lost" not in footer and "reconnecting takes it back" in footer, footer
    screenshot(ann, "ann-gave-up.png")
    time.sleep(1.0)  # given up: no more tries
    assert ann.evaluate("window.chat.attempts") == retries and ann.evaluate("window.chat.state") == "offline"
    # holderd took chatd's journal with it (no state directory here): the session is gone,
    # the page is told so, and comes back as a new client.
    web.start_holderd()
    web.start_chatd()
    ann.click("#status-action")
    ann.wait_for_function("window.chat.state === 'open' && window.chat.opens === 2 && window.chat.nick === 'ann'"
                          " && window.chat.fallbacks === 1")
    assert ann.locator("#log li.error").last.inner_text() == (
        "The server no longer has this chat (unknown-session): connected again, as a new client; "
        "1 message(s) you sent were not confirmed and may not have arrived")
    assert ann.locator("#log li.out.lost").all_inner_texts() == ["into the void"]
    assert "nothing lost" in ann.inner_text("footer")
    wait_until(lambda: [c["nick"] for c in web.control("clients")["clients"]] == ["ann"], 10, "ann back in chatd")
    assert ann.evaluate("window.chat.paired") is None, "bob's connection ended with holderd: no one to pair with"
    ann.wait_for_function("window.chat.session", timeout=10000)  # a new session, for the next time


# -- sessions: a page whose connection is cut takes its session back (issue 28) ------------------
#
# Each page talks to chatd through a CuttingProxy of its own, so the test cuts one page's
# connection and not the other's. The timings are short for the test: a backoff of up to
# 0.1 s, 0.2 s … 1 s; a ping after each message and every 0.5 s while idle; a page that hears
# nothing for 5 s gives its socket up (the half-open cut), longer than chatd's restore takes.
SESSION_QUERY = "?backoff_ms=100&backoff_cap_ms=1000&heartbeat_ms=500&answer_ms=1000&dead_ms=5000"
TYPING_LIMIT = 4000  # messages a page types at most (every 15 ms: a minute), a bound on the loop

TYPING = """(prefix) => {
    // The user types a message every %d ms, whenever the page lets them (the box is enabled);
    // window.typed[k-1] is the state of the page when it typed prefix:k.
    window.typed = [];
    window.typing = setInterval(() => {
        const box = document.getElementById("text");
        if (window.typed.length >= %d) { clearInterval(window.typing); return; }
        if (box.disabled) return;
        box.value = prefix + ":" + (window.typed.length + 1);
        document.getElementById("msg-form").requestSubmit();
        window.typed.push(window.chat.state);
    }, %d);
}"""


def typing(every_ms: int) -> str:
    """The script of a user who types a message every ``every_ms``, at most TYPING_LIMIT of them."""
    return TYPING % (every_ms, TYPING_LIMIT, every_ms)


TYPE = typing(15)

WATCH_BADGE = """() => {
    // Every text the badge shows, seen from inside the page (a reconnection may be quick).
    window.badges = [];
    const badge = document.getElementById("state");
    new MutationObserver(() => window.badges.push(badge.textContent))
        .observe(badge, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture
def proxies(web):
    from testkit.cutproxy import CuttingProxy

    made: list[CuttingProxy] = []

    def proxy() -> CuttingProxy:
        made.append(CuttingProxy(web.http_port))
        return made[-1]

    yield proxy
    for each in made:
        each.close()


def session_pair(browser, web, proxies):
    """ann and bob, each through a proxy of its own, paired, each with a session."""
    ann_proxy, bob_proxy = proxies(), proxies()
    ann = open_page(browser, web, "ann", "bob", SESSION_QUERY, port=ann_proxy.port)
    bob = open_page(browser, web, "bob", "ann", SESSION_QUERY, port=bob_proxy.port)
    for page, peer in ((ann, "bob"), (bob, "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r} && window.chat.session")
        page.evaluate(WATCH_BADGE)
    return ann, bob, ann_proxy, bob_proxy


def typed(page, prefix: str) -> list[str]:
    return [f"{prefix}:{k}" for k in range(1, page.evaluate("window.typed.length") + 1)]


def stop_typing(page) -> None:
    page.evaluate("clearInterval(window.typing)")


def assert_received_once_in_order(page, expected: list[str], earlier: list | None = None) -> None:
    """page's log (after ``earlier``, what it showed before a reload) is ``expected``, each once,
    #n contiguous from 1; the DOM shows as many as window.chat holds; nothing dropped by the guard."""
    page.wait_for_function(f"window.chat.messages.length >= {len(expected) - len(earlier or [])}", timeout=30000)
    got = (earlier or []) + received(page)
    texts = [m["text"] for m in got]
    assert len(texts) == len(expected) and texts == expected, (
        f"{len(texts)} received, {len(expected)} typed; first difference at "
        f"{next((i for i, (a, b) in enumerate(zip(texts, expected)) if a != b), min(len(texts), len(expected)))}")
    assert [m["n"] for m in got] == list(range(1, len(got) + 1)), "#n contiguous"
    assert page.locator("#log li.in").count() == len(received(page)), "the log shows each once"
    assert page.evaluate("window.chat.dropped") == 0, "chatd sent each once: the page's guard dropped none"


def cut_and_wait_for_resume(page, proxy, how) -> float:
    """Cut ``page``'s connection ``how`` and wait until the page took its session back; the seconds it took."""
    resumes = page.evaluate("window.chat.resumes")
    started = time.monotonic()
    assert proxy.cut(how) == 1, "the page's WebSocket was open through the proxy"
    page.wait_for_function(f"window.chat.resumes > {resumes} && window.chat.state === 'open'", timeout=30000)
    return time.monotonic() - started


def test_pages_whose_connections_are_cut_while_both_type_resume_and_show_every_message_once(browser, web, proxies):
    from testkit.cutproxy import Cut

    ann, bob, ann_proxy, bob_proxy = session_pair(browser, web, proxies)
    ann.evaluate(TYPE, "a")
    bob.evaluate(TYPE, "b")
    wait_for_messages(ann, 20)
    wait_for_messages(bob, 20)
    took = {}
    # Each way a connection ends, to each page in turn, while both type.
    for how in (Cut.RESET, Cut.SERVER_SILENT, Cut.CLIENT_SILENT):
        for name, page, proxy in (("ann", ann, ann_proxy), ("bob", bob, bob_proxy)):
            took[f"{name} {how.value}"] = cut_and_wait_for_resume(page, proxy, how)
            wait_for_messages(page, len(received(page)) + 10)
    # chatd crashes in the middle: invisible to the pages, as ever (no socket closed or given up).
    sockets = [(page.evaluate("window.chat.opens"), page.evaluate("window.chat.closes")) for page in (ann, bob)]
    crash_and_restore(web, signal.SIGKILL)
    for page in (ann, bob):
        wait_for_messages(page, len(received(page)) + 20)
    assert [(page.evaluate("window.chat.opens"), page.evaluate("window.chat.closes")) for page in (ann, bob)] \
        == sockets, "the crash closed no page's socket"
    # Both at once, twice: each reconnects and resumes on its own.
    for _ in range(2):
        ann_resumes, bob_resumes = ann.evaluate("window.chat.resumes"), bob.evaluate("window.chat.resumes")
        assert ann_proxy.cut(Cut.RESET) == 1 and bob_proxy.cut(Cut.RESET) == 1
        ann.wait_for_function(f"window.chat.resumes > {ann_resumes} && window.chat.state === 'open'", timeout=30000)
        bob.wait_for_function(f"window.chat.resumes > {bob_resumes} && window.chat.state === 'open'", timeout=30000)
    for page in (ann, bob):
        wait_for_messages(page, len(received(page)) + 10)
    for page in (ann, bob):
        stop_typing(page)
    for page in (ann, bob):
        page.wait_for_function("window.chat.pending === 0 && window.chat.state === 'open'", timeout=30000)
    assert_received_once_in_order(ann, typed(bob, "b"))
    assert_received_once_in_order(bob, typed(ann, "a"))
    for page in (ann, bob):
        chat = page.evaluate("window.chat")
        badges = page.evaluate("window.badges")
        states = page.evaluate("window.typed")
        assert "reconnecting…" in badges and badges[-1] == "open", badges
        assert "offline" not in badges, "never gave up"
        assert chat["resumes"] == 5 and chat["fallbacks"] == 0 and chat["errors"] == [], chat
        assert chat["abandoned"] == 1, "one half-open socket given up (the client-silent cut), no other"
        assert any(state != "open" for state in states), "something was typed while away, and arrived once"
        assert page.locator("#log li.error").count() == 0 and page.locator("#log li.out.lost").count() == 0
        assert page.locator("#log li.note").all_inner_texts()[-1].startswith("paired with"), "the log just went on"
    screenshot(ann, "ann-after-cuts.png")
    print(f"ann typed {len(typed(ann, 'a'))}, bob {len(typed(bob, 'b'))}, through 5 cuts each (3 kinds, 2 at once) and a crash; "
          "cut to resumed: " + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in took.items()))


PAGE_LOG_ON_UNLOAD = """() => addEventListener("pagehide", () => sessionStorage.setItem("test.log",
    JSON.stringify((JSON.parse(sessionStorage.getItem("test.log")) || []).concat(window.chat.messages))))"""


def test_a_page_reloaded_by_the_user_resumes_from_its_tabs_token(browser, web, proxies):
    ann, bob, _, _ = session_pair(browser, web, proxies)
    bob.evaluate(TYPE, "b")
    token = ann.evaluate("JSON.parse(sessionStorage.getItem('chat.session')).token")
    assert len(token) == 32, "the tab keeps its session's token"
    for reload in range(3):
        wait_for_messages(ann, 10)
        ann.evaluate(PAGE_LOG_ON_UNLOAD)  # what the page showed, to the last message, kept across the reload
        say(ann, f"just before reload {reload + 1}")  # may still be on its way: kept, sent again if need be
        ann.reload()
        ann.wait_for_function("window.chat.resumes === 1 && window.chat.state === 'open'", timeout=20000)
        shown = ann.evaluate("JSON.parse(sessionStorage.getItem('test.log'))")
        wait_for_messages(ann, 1)
        first = received(ann)[0]["n"]
        assert first == shown[-1]["n"] + 1, f"the new log goes on from #{shown[-1]['n']}: it began at #{first}"
        assert ann.evaluate("window.chat.nick") == "ann" and ann.evaluate("window.chat.paired") == "bob"
        assert ann.input_value("#nick") == "ann"
        assert ann.evaluate("window.chat.opens") == 1 and ann.evaluate("window.chat.fallbacks") == 0
    wait_for_messages(ann, 10)
    stop_typing(bob)
    ann.evaluate(PAGE_LOG_ON_UNLOAD)
    ann.reload()  # the last time: to collect the whole log
    ann.wait_for_function("window.chat.resumes === 1", timeout=20000)
    earlier = ann.evaluate("JSON.parse(sessionStorage.getItem('test.log'))")
    assert_received_once_in_order(ann, typed(bob, "b"), earlier)
    assert ann.evaluate("JSON.parse(sessionStorage.getItem('chat.session')).token") == token, "one session"
    bob.wait_for_function("window.chat.messages.length >= 3")
    assert [m["text"] for m in received(bob)] == [f"just before reload {k}" for k in (1, 2, 3)], "each once"
    assert [m["n"] for m in received(bob)] == [1, 2, 3]
    print(f"ann reloaded 4 times while bob typed {len(typed(bob, 'b'))} messages: each shown once, #n went on")
