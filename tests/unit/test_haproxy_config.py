"""The haproxy.cfg ctl.haproxy writes (and the README shows): haproxy itself accepts it, and each
host is in both backends, the line port's checked on the host's web port."""

import subprocess

from ctl.haproxy import HAPROXY, LINE_BACKEND, WEB_BACKEND, haproxy_config
from helpers import require_haproxy


def test_each_host_is_in_both_backends_and_the_line_port_is_checked_on_the_web_port():
    config = haproxy_config([("10.0.0.1", 5001, 8001), ("10.0.0.2", 5001, 8001)], 5000, 8000, bind="0.0.0.0")
    sections = {}
    for block in config.split("\n\n"):
        lines = [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]
        if lines:
            sections[lines[0]] = lines[1:]
    line, web = sections[f"backend {LINE_BACKEND}"], sections[f"backend {WEB_BACKEND}"]
    assert "server h0 10.0.0.1:5001 check port 8001" in line and "server h1 10.0.0.2:5001 check port 8001" in line
    assert "server h0 10.0.0.1:8001 check" in web and "server h1 10.0.0.2:8001 check" in web
    for backend in (line, web):
        assert "balance leastconn" in backend and "http-check expect status 200" in backend
        assert any("uri /healthz" in option for option in backend)
    assert "mode tcp" in line and "mode http" in web and "timeout tunnel 1h" in web
    assert "bind 0.0.0.0:5000" in sections["frontend line"] and "bind 0.0.0.0:8000" in sections["frontend web"]


def test_haproxy_accepts_the_config(tmp_path):
    require_haproxy()
    path = tmp_path / "haproxy.cfg"
    path.write_text(haproxy_config([("127.0.0.1", 5001, 8001), ("127.0.0.1", 5002, 8002)], 5000, 8000,
                                   stats_socket=str(tmp_path / "stats.sock")))
    checked = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ALERT" not in checked.stdout + checked.stderr and "WARNING" not in checked.stdout + checked.stderr
