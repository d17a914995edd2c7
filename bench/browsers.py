"""A handful of real browsers chatting across a crash of chatd: each page's time from the kill to
its next message shown.

    .venv/bin/python bench/browsers.py [--pages 8] [--crashes 3] [--interval-ms 100] [--json PATH]

Headless Chromium (Debian's, driven by Playwright with its executable_path, as
tests/browser does) opens ``--pages`` pages of chatd's chat page, in pairs:
each names itself, pairs with its partner, and sends a message every
``--interval-ms`` through the page's own form (its text: the send time), so
that something is always on its way. Each page notes when each message is
added to its list (a hook on ``window.chat.messages``, in the page, on the
page's clock: the machine's). chatd and holderd run as processes (as in
tests/browser), in two modes, each with pages of its own:

- ``standby``: two ``chatd --lease`` taking turns (as chatd@1 and chatd@2 do
  under systemd, tests/process/test_standby.py's TakingTurns): the one serving
  is killed (SIGSEGV) and the standby takes over; a new standby is started
  after the measurement;
- ``restart``: one chatd, killed (SIGSEGV) and started again with
  ``--restore`` at once (what systemd's restart does, less its own delay).

For each crash and page: the time from the kill to the first message shown
that its partner sent after the kill (so one the new chatd relayed). The
pages' WebSocket must never close (``window.chat.closes``) nor open again.
Bounded: ``--crashes`` crashes, each waited for at most 30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from ctl.launch import Launcher, wait_until  # noqa: E402
from browser.test_browser import open_page  # noqa: E402
from process.test_standby import TakingTurns  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
MODES = ("standby", "restart")

#: Notes when each message is added to the page's list, and sends one message every
#: `interval` ms through the page's form (what a user's typing does).
IN_PAGE = """(interval) => {
  window.bench = { shown: [], sent: 0 };
  const messages = window.chat.messages, push = messages.push.bind(messages);
  messages.push = (...added) => {
    const now = Date.now();
    for (const message of added) window.bench.shown.push([message.text, now]);
    return push(...added);
  };
  window.bench.timer = setInterval(() => {
    const text = document.getElementById("text");
    if (text.disabled) return;
    text.value = String(Date.now());
    window.bench.sent += 1;
    document.getElementById("msg-form").requestSubmit();
  }, interval);
}"""


def open_pair(browser, http_port: int, index: int):
    names = (f"p{index}a", f"p{index}b")
    pages = []
    for nick, peer in (names, names[::-1]):
        pages.append(open_page(browser, None, nick, peer, port=http_port))
    for page, peer in zip(pages, names[::-1]):
        page.wait_for_function(f"window.chat.paired === {peer!r}")
    return pages


def next_shown_ms(page, killed_ms: float) -> float | None:
    """ms from the kill to the first message shown that was sent after it."""
    shown = page.evaluate("window.bench.shown")
    after = [at for text, at in shown if text.isdigit() and int(text) > killed_ms]
    return after[0] - killed_ms if after else None


def run_mode(browser, mode: str, pages_count: int, crashes: int, interval_ms: int) -> dict:
    with Launcher() as launcher:
        launcher.start_holderd()
        turns = None
        if mode == "standby":
            turns = TakingTurns(launcher)
        else:
            launcher.start_chatd()
        pages = [page for index in range(pages_count // 2) for page in open_pair(browser, launcher.http_port, index)]
        try:
            for page in pages:
                page.evaluate(IN_PAGE, interval_ms)
            time.sleep(2)  # the pairs chat, the standby reads ahead
            results, baseline = [], []
            for crash in range(crashes):
                serving = turns.serving if turns else launcher.chatd
                if crash == 0:  # sent -> shown before any crash: how busy the pages and chatd are
                    baseline = [at - int(text) for page in pages for text, at in page.evaluate("window.bench.shown")
                                if text.isdigit()]
                killed = time.time()
                serving.send_signal(signal.SIGSEGV)
                if turns is None:
                    serving.wait(10)
                    launcher.start_chatd("--restore")
                killed_ms = killed * 1000
                for page in pages:
                    page.wait_for_function(
                        f"window.bench.shown.some(([text, at]) => /^[0-9]+$/.test(text) && Number(text) > {killed_ms})",
                        timeout=30000)
                gaps = [round(next_shown_ms(page, killed_ms), 1) for page in pages]
                results.append(gaps)
                print(f"  {mode}, crash {crash + 1}: kill -> each page's next message shown (ms): {gaps}", flush=True)
                if turns:
                    serving.wait(10)
                    turns.swap()
                time.sleep(2)  # the new standby reads ahead; the pages chat on
            closes = [page.evaluate("[window.chat.closes, window.chat.opens]") for page in pages]
            for page in pages:
                page.evaluate("clearInterval(window.bench.timer)")
            sent = sum(page.evaluate("window.bench.sent") for page in pages)
            shown = sum(page.evaluate("window.bench.shown.length") for page in pages)
        finally:
            for page in pages:
                page.close()
    every = [gap for gaps in results for gap in gaps]
    return {"mode": mode, "pages": len(pages), "crashes": results,
            "median_ms": round(statistics.median(every), 1),
            "worst_ms": max(every), "best_ms": min(every),
            "before_crashes_sent_to_shown_ms": {"median": statistics.median(baseline), "worst": max(baseline)},
            "socket_closes": sum(c for c, _ in closes), "socket_opens": sum(o for _, o in closes),
            "messages_sent": sent, "messages_shown": shown}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=8, help="pages, in pairs (default %(default)s)")
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--interval-ms", type=int, default=100, help="each page sends a message this often")
    parser.add_argument("--json", metavar="PATH", default=str(ROOT / "bench" / "results" / "browsers.json"))
    args = parser.parse_args()
    if args.pages < 2 or args.pages % 2:
        parser.error("--pages: an even number, at least 2 (they chat in pairs)")
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic", "--disable-background-timer-throttling",
            "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"])
        try:
            for mode in MODES:
                rows.append(run_mode(browser, mode, args.pages, args.crashes, args.interval_ms))
        finally:
            browser.close()
    print(f"\n{args.pages} Chromium pages in pairs, each sending every {args.interval_ms} ms; "
          f"{args.crashes} crashes a mode; kill -> each page's next message shown\n")
    print("| mode | kill -> next shown: median | best | worst | before the crashes: sent -> shown, median (worst) "
          "| WebSocket closes | messages shown / sent |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        before = row["before_crashes_sent_to_shown_ms"]
        print(f"| {row['mode']} | {row['median_ms']:g} ms | {row['best_ms']:g} ms | {row['worst_ms']:g} ms "
              f"| {before['median']:g} ({before['worst']:g}) ms "
              f"| {row['socket_closes']} | {row['messages_shown']:,} / {row['messages_sent']:,} |")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as out:
        json.dump({"args": vars(args), "rows": rows}, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
