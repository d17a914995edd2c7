"""Soak: pairs stream numbered messages while chatd is killed at random, a thousand times and more.

    .venv/bin/python bench/soak.py [--crashes 1000] [--pairs 20] [--seed 1] [--json out.json]
    .venv/bin/python bench/soak.py --cuts 1000 --crashes 100   # the resume soak: sessions, cut at random

Starts holderd and chatd in a scratch directory (ctl.launch), streams between
the pairs (testkit.soak: some messages near 64 KiB, some written in pieces, some
readers slow), and kills chatd with SIGKILL, SIGSEGV or SIGABRT at random
instants, starting the next `chatd --restore` at once, as systemd would. At the
end it prints one table row: messages sent and received, crashes, and the
problems, each of which should be 0: lost, repeated, garbled, n gaps, n
repeats, dropped connections. Exits 1 if any is not.

With ``--cuts`` every client has a session (chatd.sessions) and, among the
crashes, connections are cut at random (``--cuts`` times 1-3 clients: a reset, a
close, or a client gone silent), and the clients resume: the row adds the cuts
and resumes, and the problems must still be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from testkit import soak  # noqa: E402
from ctl.launch import Launcher  # noqa: E402

SIGNALS = (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT)
COLUMNS = ("sent", "received", "crashes", "lost", "repeated", "garbled", "n_gaps", "n_repeats", "dropped")
SESSION_COLUMNS = ("cuts", "resumes", "busy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crashes", type=int, default=1000,
                        help="how many times chatd is killed, 0.05-0.5 s apart (default %(default)s)")
    parser.add_argument("--pairs", type=int, default=20,
                        help="pairs of clients streaming messages both ways (default %(default)s)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seeds the random choices: when to crash and with which signal, which readers "
                        "are slow, which lines are written in pieces (default %(default)s)")
    parser.add_argument("--no-replay", action="store_true", help="run chatd with --no-replay (to see loss)")
    parser.add_argument("--cuts", type=int, default=0,
                        help="with sessions: cut 1-3 clients' connections this many times among the crashes, "
                        "and the clients resume (default %(default)s: no sessions)")
    parser.add_argument("--json", metavar="PATH", help="write the totals as JSON here")
    args = parser.parse_args()
    extra = ["--no-replay"] if args.no_replay else []
    columns = COLUMNS + (SESSION_COLUMNS if args.cuts else ())
    began = time.monotonic()
    with Launcher() as launcher:
        launcher.start_holderd()
        launcher.start_chatd(*extra)

        def crash(rng):
            launcher.chatd.send_signal(rng.choice(SIGNALS))
            launcher.chatd.wait(30)
            launcher.start_chatd("--restore", *extra, wait=False)

        def progress(tally):
            print(f"  [{time.monotonic() - began:6.0f}s] " + " ".join(f"{c}={getattr(tally, c)}" for c in columns),
                  flush=True)

        tally = soak.run(launcher.port, args.pairs, args.crashes, crash, seed=args.seed, progress=progress,
                         settle=120, sessions=bool(args.cuts), cuts=args.cuts)
    seconds = time.monotonic() - began
    print(f"\n| {' | '.join(columns)} | seconds |")
    print("|" + " --- |" * (len(columns) + 1))
    print("| " + " | ".join(f"{getattr(tally, c):,}" for c in columns) + f" | {seconds:.0f} |")
    for note in tally.notes:
        print("  ", note)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({**tally.row(), "pairs": args.pairs, "seconds": round(seconds, 1),
                       "no_replay": args.no_replay, "notes": tally.notes}, out, indent=2)
    return 1 if tally.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
