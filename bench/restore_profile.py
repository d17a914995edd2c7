"""Where a cold restore's time goes, web clients against line clients: py-spy over ``chatd --restore``.

    .venv/bin/python bench/restore_profile.py {web,line} COUNT [--out PATH]

Starts holderd and chatd as processes (ctl.launch), connects COUNT idle clients
of the kind (web: upgraded and named, bench/web_scale.py's; line: named),
kills chatd with SIGSEGV, has every client send its ping (so every socket has
work when chatd comes back), and starts ``chatd --restore`` under ``py-spy
record`` (500 samples/s, 6 s). It prints how long after the restart the last
pong was read, and py-spy's samples by part (bench/web_rates.py's
where_time_goes). Needs py-spy in the venv (``pip install py-spy``).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.web_rates import PY_SPY, where_time_goes  # noqa: E402
from bench.web_scale import masked_frame, server_frame, web_connect  # noqa: E402
from ctl.launch import Launcher  # noqa: E402


def line_connect(port: int, name: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(f"NICK {name}\n".encode())
    assert sock.recv(100) == f"OK NICK {name}\n".encode()
    return sock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("web", "line"))
    parser.add_argument("count", type=int)
    parser.add_argument("--out", default=None, help="py-spy's raw samples (default /tmp/restore-KIND.txt)")
    args = parser.parse_args()
    out = args.out or f"/tmp/restore-{args.kind}.txt"
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    with Launcher() as launcher:
        launcher.start_holderd()
        launcher.start_chatd()
        if args.kind == "web":
            socks = [web_connect(launcher.http_port, f"c{i}") for i in range(args.count)]
            ping, pong = masked_frame({"type": "ping"}), server_frame({"type": "pong"})
        else:
            socks = [line_connect(launcher.port, f"c{i}") for i in range(args.count)]
            ping, pong = b"PING\n", b"PONG\n"
        time.sleep(2)
        launcher.chatd.send_signal(signal.SIGSEGV)
        launcher.chatd.wait(10)
        for sock in socks:
            sock.sendall(ping)
        spy = subprocess.Popen([PY_SPY, "record", "-r", "500", "-d", "6", "-f", "raw", "-o", out, "--",
                                sys.executable, "-m", "chatd", "--port", str(launcher.port), "--http-port",
                                str(launcher.http_port), "--control", launcher.control_socket, "--holder",
                                launcher.holder_socket, "--restore"],
                               env=launcher.env, cwd=launcher.workdir, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
        try:
            began, answered = time.time(), 0
            for sock in socks:
                data = b""
                while len(data) < len(pong):
                    chunk = sock.recv(100)
                    if not chunk:
                        break
                    data += chunk
                answered += data == pong
            print(f"{args.kind}: {answered:,} of {args.count:,} answered, the last {time.time() - began:.2f} s "
                  "after the restart")
            spy.wait(60)
        finally:
            # py-spy's child, the restored chatd, answers on the launcher's control socket: stop it by its pid.
            try:
                os.kill(launcher.control("status")["pid"], signal.SIGTERM)
            except Exception:
                pass
            if spy.poll() is None:
                spy.kill()
            for sock in socks:
                sock.close()
    parts = where_time_goes(out)
    print(f"{args.kind}: " + ", ".join(f"{part} {share:.0%}" for part, share in parts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
