"""The haproxy.cfg ctl.haproxy writes (and the README shows): haproxy itself accepts it, and each
host is in both backends, the line port's checked on the host's web port."""

import shutil
import subprocess

import pytest

from ctl.haproxy import HAPROXY, LINE_BACKEND, WEB_BACKEND, HAProxy, haproxy_config, tls_cert_problem
from fdkeep.errors import Error
from helpers import require_haproxy
from testkit.tlscerts import make_test_pki


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


def require_openssl():
    if not shutil.which("openssl"):
        pytest.skip("Debian's openssl is not installed (apt-get install openssl)")


def test_haproxy_accepts_the_config_with_tls_on_the_web_port_only(tmp_path):
    require_haproxy()
    require_openssl()
    pki = make_test_pki(str(tmp_path / "pki"))
    config = haproxy_config([("127.0.0.1", 5001, 8001)], 5000, 8000, stats_socket=str(tmp_path / "stats.sock"),
                            tls_cert=pki.haproxy_pem)
    assert f"bind 127.0.0.1:8000 ssl crt {pki.haproxy_pem} alpn http/1.1" in config
    assert "bind 127.0.0.1:5000\n" in config, "the line port stays plain TCP"
    assert "ssl-min-ver TLSv1.2" in config
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run([HAPROXY, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "ALERT" not in checked.stdout + checked.stderr and "WARNING" not in checked.stdout + checked.stderr
    assert tls_cert_problem(pki.haproxy_pem) is None


def test_a_certificate_haproxy_could_not_use_is_refused_before_anything_starts_naming_the_fix(tmp_path):
    require_openssl()
    pki = make_test_pki(str(tmp_path / "pki"))
    missing = str(tmp_path / "nowhere.pem")
    assert "is not there" in tls_cert_problem(missing) and "README" in tls_cert_problem(missing)
    assert "not a file" in tls_cert_problem(str(tmp_path))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    assert "holds no certificate" in tls_cert_problem(str(not_pem))
    no_key = tmp_path / "no-key.pem"
    no_key.write_text(open(pki.server_cert).read())
    assert "holds no private key" in tls_cert_problem(str(no_key)) and "cat cert.pem" in tls_cert_problem(str(no_key))
    shutil.copy(pki.server_key, str(no_key) + ".key")
    assert tls_cert_problem(str(no_key)) is None, "the key beside it, as haproxy takes it"
    require_haproxy()
    with pytest.raises(Error) as refused:
        HAProxy(str(tmp_path / "haproxy"), [(5001, 8001)], 5000, 8000, tls_cert=missing)
    assert "is not there" in refused.value.message


def test_chatctl_prints_the_config_to_keep_and_refuses_a_tls_cluster_it_could_not_start(tmp_path, capsys):
    from ctl.cli import main

    assert main(["haproxy-config", "--host", "10.0.0.11:5001,8080", "--host", "10.0.0.12:5001,8080",
                 "--listen", "5000,443", "--tls-cert", str(tmp_path / "chat.pem")]) == 0
    printed = capsys.readouterr()
    assert f"bind 0.0.0.0:443 ssl crt {tmp_path / 'chat.pem'} alpn http/1.1" in printed.out
    assert "server h1 10.0.0.12:5001 check port 8080" in printed.out
    assert "warning: the TLS certificate" in printed.err and "is not there" in printed.err
    assert main(["cluster", "--tls-cert", str(tmp_path / "chat.pem")]) == 2
    assert "--tls-cert needs --haproxy" in capsys.readouterr().err
    assert main(["cluster", "--haproxy", "5000,8000", "--tls-cert", str(tmp_path / "chat.pem")]) == 2
    assert "is not there" in capsys.readouterr().err
