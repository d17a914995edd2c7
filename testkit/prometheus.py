"""Debian's real Prometheus, run as a child process for the tests: it scrapes chatd and holderd.

Theory of operation
-------------------
:class:`Prometheus` writes a configuration (:func:`scrape_config`, the README's
shape with a short ``scrape_interval``), keeps its time-series database in a
directory of the test's own, and listens on 127.0.0.1 on a port the kernel picks
(``--web.listen-address=127.0.0.1:0``): the port is then read back from the
kernel, as the one TCP socket that process listens on (:func:`listening_ports`).
:meth:`Prometheus.query` asks its HTTP API (``/api/v1/query``) a PromQL
expression; :meth:`Prometheus.wait_for` asks until an answer pleases. The child
dies with the thread that started it (:func:`ctl.children.die_with_parent`) and
:meth:`Prometheus.close` stops it (``with`` does too), whatever the test did.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

from ctl.children import ClosedOnExit, die_with_parent, log_tail, stop


def missing_prometheus() -> str | None:
    """What is missing to run these tests, or None."""
    missing = [name for name in ("prometheus", "promtool") if shutil.which(name) is None]
    return f"{' and '.join(missing)} (apt-get install prometheus)" if missing else None


def scrape_config(chatd: list[str], holderd: list[str], interval: str = "15s") -> str:
    """A Prometheus configuration that scrapes chatd and holderd at these ``host:port`` targets."""
    def targets(addresses: list[str]) -> str:
        return ", ".join(f'"{address}"' for address in addresses)

    return (
        "global:\n"
        f"  scrape_interval: {interval}\n"
        f"  evaluation_interval: {interval}\n"
        "scrape_configs:\n"
        "  - job_name: chatd\n"
        f"    static_configs: [{{targets: [{targets(chatd)}]}}]\n"
        "  - job_name: holderd\n"
        f"    static_configs: [{{targets: [{targets(holderd)}]}}]\n"
    )


def listening_ports(pid: int) -> list[int]:
    """The TCP ports process ``pid`` listens on, as the kernel says (/proc: its socket inodes,
    matched in /proc/net/tcp and tcp6 against the sockets in state LISTEN, 0A)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    if fields[3] == "0A" and fields[9] in inodes:
                        ports.append(int(fields[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return sorted(set(ports))


class Prometheus(ClosedOnExit):
    def __init__(self, directory: str, config: str):
        self.directory = directory
        self.config_path = os.path.join(directory, "prometheus.yml")
        self.log_path = os.path.join(directory, "prometheus.log")
        with open(self.config_path, "w") as config_file:
            config_file.write(config)
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "Prometheus":
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                ["prometheus", f"--config.file={self.config_path}",
                 f"--storage.tsdb.path={os.path.join(self.directory, 'data')}",
                 "--web.listen-address=127.0.0.1:0", "--log.level=info"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.directory,
                preexec_fn=die_with_parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{log_tail(self.log_path)}")
            ports = listening_ports(self.proc.pid)
            if ports:
                self.port = ports[0]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as answer:
                        if answer.status == 200:
                            return self
                except OSError:
                    pass
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready within {timeout} s:\n{log_tail(self.log_path)}")

    def query(self, expression: str) -> list[dict]:
        """The instant vector (or scalar, as one sample) ``expression`` evaluates to now."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = json.load(answer)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus refused {expression!r}: {body}")
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expression: str) -> float | None:
        """The one sample's value of ``expression``; None if it has none (yet)."""
        result = self.query(expression)
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_for(self, expression: str, pleases, timeout: float = 30.0):
        """Ask until the value of ``expression`` ``pleases``; that value (AssertionError at the timeout)."""
        deadline, value = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            value = self.value(expression)
            if value is not None and pleases(value):
                return value
            time.sleep(0.25)
        raise AssertionError(f"{expression} = {value} after {timeout} s:\n{log_tail(self.log_path)}")

    def close(self) -> None:
        if self.proc is not None:
            stop([self.proc])
            self.proc = None
