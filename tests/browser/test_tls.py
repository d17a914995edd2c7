"""The web chat over TLS: headless Chromium on https:// and wss://, TLS ended by a real HAProxy in front of chatd.

A TLS session lives in the memory of the process that did the handshake, so it
cannot survive chatd's crash the way a TCP connection does (holderd keeps the
latter, not the former): TLS ends in HAProxy (ctl.haproxy, ``tls_cert``), and
chatd keeps the plain connections behind it, as ever.

The test makes a CA and a server certificate for 127.0.0.1 with Debian's
openssl (testkit.tlscerts), and has Chromium trust that CA the way a user's
machine does: its NSS database (``$HOME/.pki/nssdb``, certutil), so Chromium
checks the chain, the name and the dates itself. That the check is real is
tested too: a Chromium without the CA refuses the page. Then two pages chat
over wss:// while both type; chatd is killed (SIGKILL, then a real SIGSEGV)
and restored each time: each page's WebSocket (and so its TLS connection to
HAProxy) is the one it opened, never closed, and every message arrives once,
in order. Last, HAProxy itself is reloaded (the old process keeps serving the
connections it has: nothing closes), then restarted (the TLS connections die with it):
the pages reconnect with their default timings, resume their sessions
(``RESUME``), and still nothing is lost or doubled; the test prints how long
that took. haproxy (the old one of a reload too), chatd, holderd and each
test's pages are ended after each test, Chromium after the module, failed or
not; all traffic is on loopback.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ctl.haproxy import HAProxy
from ctl.launch import wait_until
from helpers import free_port, require_haproxy, skip_or_fail
from test_browser import (CHROMIUM, TYPE, WATCH_BADGE, assert_received_once_in_order, open_page, received,
                          screenshot, stop_typing, typed, typing, wait_for_messages)
from testkit.tlscerts import make_test_pki, missing_tls_tools, nss_home

LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic"]
#: HAProxy restarts in the last test, each timed from its stop to both pages resumed.
RESTARTS = 3
#: How long a page may take to show what it waits for: a bound, not a speed target (two pages that
#: type and draw every message, on a loaded 2-core machine, fall behind for seconds).
BOUND_MS = 60000
#: The last test's users type every 50 ms: it lasts longer, and a page's log of thousands of
#: messages, each drawn, would starve its own timers on a loaded machine.
TYPE_SLOWER = typing(50)


def require(missing: str | None, what: str) -> None:
    if missing:
        skip_or_fail(f"{what} needs {missing}", "the TLS tests")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    require(missing_tls_tools(), "a test CA trusted by Chromium")
    directory = tmp_path_factory.mktemp("pki")
    made = make_test_pki(str(directory / "certs"))
    return made, nss_home(str(directory / "home"), made.ca_cert)


@pytest.fixture(scope="module")
def playwright():
    require(None if os.access(CHROMIUM, os.X_OK) else "chromium (apt-get install chromium)", "the browser test")
    from playwright.sync_api import sync_playwright

    driver = sync_playwright().start()
    yield driver
    driver.stop()


@pytest.fixture(scope="module")
def browser(playwright, pki):
    """Chromium whose user trusts the test CA (and no certificate check switched off)."""
    _, home = pki
    chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS,
                                          env={**os.environ, "HOME": home})
    yield chromium
    chromium.close()


@pytest.fixture
def context(browser):
    """A browser context of the test's own: its pages are closed with it, whatever happens."""
    each = browser.new_context(viewport={"width": 720, "height": 800})
    yield each
    each.close()


@pytest.fixture
def behind_tls(procs, pki, tmp_path, request):
    """holderd and chatd on loopback, and HAProxy ending TLS in front of them (the README's config)."""
    require_haproxy()
    made, _ = pki
    procs.start_holderd()
    procs.start_chatd()
    line_port = free_port()
    web_port = free_port()
    while web_port == line_port:
        web_port = free_port()
    proxy = HAProxy(str(tmp_path / "haproxy"), [(procs.port, procs.http_port)], line_port, web_port,
                    tls_cert=made.haproxy_pem)
    try:
        proxy.start()
        wait_until(lambda: set(proxy.states().values()) == {"UP"}, 15, "HAProxy to see chatd UP")
        yield procs, proxy
    finally:
        if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
            print(f"=== haproxy\n{proxy.log_tail(8000)}")
        proxy.close()


def tls_pair(browser, web, proxy: HAProxy, query: str = ""):
    """ann and bob on https:// through HAProxy, paired, each with a session, both typing."""
    pages = [open_page(browser, web, nick, peer, query, port=proxy.web_port, scheme="https")
             for nick, peer in (("ann", "bob"), ("bob", "ann"))]
    for page, peer in zip(pages, ("bob", "ann")):
        page.wait_for_function(f"window.chat.paired === {peer!r} && window.chat.session")
        page.evaluate(WATCH_BADGE)
        assert page.evaluate("link.socket.url") == f"wss://127.0.0.1:{proxy.web_port}/ws"
    return pages


def test_chromium_refuses_the_page_without_the_test_ca_and_verifies_it_with_it(playwright, context, behind_tls,
                                                                               tmp_path):
    web, proxy = behind_tls
    page = context.new_page()
    response = page.goto(proxy.web_url)
    details = response.security_details()
    assert response.ok and details["subjectName"] == "localhost" and details["issuer"] == "chatd test CA", details
    assert details["protocol"] in ("TLS 1.2", "TLS 1.3"), details
    (tmp_path / "stranger").mkdir()
    stranger = playwright.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS,
                                          env={**os.environ, "HOME": str(tmp_path / "stranger")})
    try:
        with pytest.raises(Exception, match="ERR_CERT_AUTHORITY_INVALID"):
            stranger.new_page().goto(proxy.web_url, timeout=15000)
    finally:
        stranger.close()


def test_pages_on_wss_through_haproxy_keep_their_tls_connection_through_chatd_crashes_and_lose_nothing(
        context, behind_tls):
    web, proxy = behind_tls
    ann, bob = tls_pair(context, web, proxy)
    for page in (ann, bob):
        page.evaluate("window.firstSocket = link.socket")
    ann.evaluate(TYPE, "a")
    bob.evaluate(TYPE, "b")
    wait_for_messages(ann, 20, BOUND_MS)
    wait_for_messages(bob, 20, BOUND_MS)
    for sig in (signal.SIGKILL, signal.SIGSEGV):
        web.kill_chatd(sig)
        time.sleep(0.3)  # both type while chatd is dead: their messages wait in the kept sockets
        web.start_chatd("--restore")
        for page in (ann, bob):
            wait_for_messages(page, len(received(page)) + 20, BOUND_MS)
    stop_and_check_each_received_once(ann, bob)
    for page in (ann, bob):
        chat = page.evaluate("window.chat")
        assert page.evaluate("link.socket === window.firstSocket"), "the WebSocket the page opened, still"
        assert chat["opens"] == 1 and chat["closes"] == 0, "one wss:// connection all along, never closed"
        assert chat["resumes"] == 0 and chat["fallbacks"] == 0 and chat["errors"] == [], chat
        assert "reconnecting…" not in page.evaluate("window.badges")
    assert set(proxy.states().values()) == {"UP"}
    log = proxy.log_tail(100_000)
    assert " web~ " in log, "HAProxy logged requests on its TLS frontend (web~)"
    assert "/ws " not in log, "no WebSocket through HAProxy ended (it logs each when it ends)"
    screenshot(ann, "ann-over-tls-after-two-crashes.png")
    print(f"over wss:// through HAProxy, two chatd crashes: ann typed {len(typed(ann, 'a'))}, bob "
          f"{len(typed(bob, 'b'))} messages, each received once; one TLS connection per page")


def stop_and_check_each_received_once(ann, bob) -> None:
    """Both pages stop typing; once nothing is pending, each got every message the other typed, once, in order."""
    for page in (ann, bob):
        stop_typing(page)
    for page in (ann, bob):
        page.wait_for_function("window.chat.pending === 0 && window.chat.state === 'open'", timeout=BOUND_MS)
    assert_received_once_in_order(ann, typed(bob, "b"))
    assert_received_once_in_order(bob, typed(ann, "a"))


def test_a_reload_of_haproxy_keeps_the_tls_connections_a_restart_cuts_them_and_the_pages_resume(context,
                                                                                                  behind_tls):
    web, proxy = behind_tls
    ann, bob = tls_pair(context, web, proxy)  # the page's own timings: what a user gets
    ann.evaluate(TYPE_SLOWER, "a")
    bob.evaluate(TYPE_SLOWER, "b")
    wait_for_messages(ann, 20, BOUND_MS)
    wait_for_messages(bob, 20, BOUND_MS)

    # A reload: the old haproxy stops listening and serves the connections it has until they end.
    before = proxy.proc
    proxy.reload()
    assert proxy.proc is not before
    # A new haproxy shows a host "UP 1/3" until its first check passes.
    wait_until(lambda: set(proxy.states().values()) == {"UP"}, 15, "the new HAProxy to see chatd UP")
    for page in (ann, bob):
        wait_for_messages(page, len(received(page)) + 20, BOUND_MS)
    assert before.poll() is None, "the old haproxy still carries the pages' TLS connections"
    for page in (ann, bob):
        chat = page.evaluate("window.chat")
        assert chat["opens"] == 1 and chat["closes"] == 0 and chat["resumes"] == 0, chat
    newcomer = context.new_page()
    assert newcomer.goto(proxy.web_url).ok, "the new haproxy serves new pages"
    newcomer.close()

    # A restart (stop, then start): every TLS connection ends with the process that held its state.
    took, down = [], []
    for restart in range(1, RESTARTS + 1):
        stopped = time.monotonic()
        proxy.close()  # SIGTERM: haproxy ends at once (the old one too), every TLS connection with it
        proxy.start()
        down.append(time.monotonic() - stopped)
        for page in (ann, bob):
            page.wait_for_function(f"window.chat.resumes === {restart} && window.chat.state === 'open'",
                                   timeout=60000)
        took.append(time.monotonic() - stopped)
        for page in (ann, bob):
            wait_for_messages(page, len(received(page)) + 20, BOUND_MS)
    stop_and_check_each_received_once(ann, bob)
    for page in (ann, bob):
        chat = page.evaluate("window.chat")
        assert chat["opens"] == RESTARTS + 1 and chat["resumes"] == RESTARTS, "a new TLS connection each time"
        assert chat["fallbacks"] == 0 and chat["errors"] == [], "the session taken back each time, never lost"
        assert page.locator("#log li.error").count() == 0 and page.locator("#log li.out.lost").count() == 0
    print(f"haproxy reloaded: no connection closed; restarted {RESTARTS} times (down {', '.join(f'{s:.2f}' for s in down)} s): both pages "
          f"resumed over wss:// {', '.join(f'{s:.2f}' for s in took)} s after the stop; ann typed "
          f"{len(typed(ann, 'a'))}, bob {len(typed(bob, 'b'))}, each received once")
