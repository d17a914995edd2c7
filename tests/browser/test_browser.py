"""A real browser never notices chatd's crash: headless Chromium on the chat page.

Debian's chromium, driven by Playwright (executable_path, --no-sandbox: no browser
download). Each page records what it saw in window.chat (see chatd/web/app.js),
including how many times its WebSocket's close event fired: never, is the point.
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

from ctl.probe import LineClient

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def browser():
    if not shutil.which("chromium"):
        reason = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}; CI=true, so the browser tests must not be skipped")
        pytest.skip(reason)
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


def open_page(browser, web, nick: str, peer: str):
    page = browser.new_page(viewport={"width": 720, "height": 800})
    page.goto(f"http://127.0.0.1:{web.http_port}/")
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
        page.wait_for_function(f"window.chat.messages.length >= {sent}", timeout=20000)
        got = received(page)
        assert [m["text"] for m in got] == [f"k:{k}" for k in range(1, sent + 1)], "each once, in order"
        assert [m["n"] for m in got] == list(range(1, sent + 1))
        assert page.evaluate("window.chat.closes") == 0 and page.evaluate("window.chat.errors") == []
    print(f"streamed through 10 kills: {ann.evaluate('window.streamed')} and {bob.evaluate('window.streamed')} "
          "messages, each received once")
