"""ctl.natssecrets and chatd.bus.access without a server: what is made, kept, revoked; the files
chatd is given; the refusals told with their fix. (The servers' side: tests/process/test_nats_security.py.)"""

from __future__ import annotations

import os
import ssl

import pytest

from chatd.bus.access import check_files, connect_options, refused
from ctl.natssecrets import Secrets, authorization_block, host_permissions, make_secrets
from fdkeep.errors import Error

pytest.importorskip("nkeys")
pytest.importorskip("cryptography")


def test_a_host_may_write_only_its_own_lease_and_read_only_its_own_inbox():
    allowed = host_permissions("h1")
    publish, subscribe = allowed["publish"]["allow"], allowed["subscribe"]["allow"]
    assert "$KV.chatd_hosts.h1" in publish and not any(p.startswith("$KV.chatd_hosts.") and p != "$KV.chatd_hosts.h1"
                                                         for p in publish)
    assert subscribe == ["_INBOX.h1.>"]
    assert "chat.*.*" in publish and "chat.>" not in publish and ">" not in publish
    for verb in ("DELETE", "PURGE", "UPDATE"):
        assert not any(f".STREAM.{verb}." in p for p in publish)
    assert all(p.startswith(("chat.", "$KV.chatd_", "$JS.FC.", "$JS.API.STREAM.INFO.", "$JS.API.STREAM.CREATE.",
                             "$JS.API.CONSUMER.CREATE.", "$JS.API.DIRECT.GET.KV_chatd_", "$JS.API.STREAM.MSG.GET."))
               for p in publish), publish


def test_the_authorization_block_has_one_user_a_host_with_its_own_permissions():
    block = authorization_block({"h1": "UAAA", "h2": "UBBB"})
    assert block.count("nkey:") == 2 and '"$KV.chatd_hosts.h1"' in block and '"_INBOX.h2.>"' in block


def test_secrets_are_made_once_kept_then_added_to_and_revoked(tmp_path):
    directory = str(tmp_path / "secrets")
    first = make_secrets(directory, ["a", "b"], ["n0", "n1"])
    assert first == {"made": ["ca", "node n0", "node n1", "host a", "host b"], "revoked": []}
    secrets = Secrets(directory)
    seed_a = open(secrets.host_seed("a"), "rb").read()
    assert oct(os.stat(secrets.host_seed("a")).st_mode & 0o777) == "0o600"
    assert oct(os.stat(secrets.ca_key).st_mode & 0o777) == "0o600"
    assert seed_a.startswith(b"SU") and open(secrets.host_public("a"), "rb").read().startswith(b"U")

    assert make_secrets(directory, ["a", "b", "c"], ["n0", "n1"]) == {"made": ["host c"], "revoked": []}
    assert open(secrets.host_seed("a"), "rb").read() == seed_a, "a key already made is kept"
    with pytest.raises(Error, match="c has a key .* not in --hosts. Fix"):
        make_secrets(directory, ["a", "b"], ["n0", "n1"])
    with pytest.raises(Error, match="both let in"):
        make_secrets(directory, ["a", "b", "c"], ["n0", "n1"], revoke=["c"])
    assert make_secrets(directory, ["a", "b"], ["n0", "n1"], revoke=["c"]) == {"made": [], "revoked": ["c"]}
    assert not os.path.exists(secrets.host_seed("c"))
    authorization = open(secrets.authorization).read()
    assert "$KV.chatd_hosts.c" not in authorization and "$KV.chatd_hosts.b" in authorization
    with pytest.raises(Error, match="cannot be part of a NATS subject"):
        make_secrets(directory, ["a", "b", "x y"], ["n0", "n1"])


def test_a_node_certificate_is_the_cas_for_its_names_and_a_client_context_trusts_it(tmp_path):
    from cryptography import x509

    directory = str(tmp_path / "secrets")
    make_secrets(directory, ["a"], ["n0"], names=["nats1.example", "10.0.0.5"])
    secrets = Secrets(directory)
    cert = x509.load_pem_x509_certificate(open(secrets.node_cert("n0"), "rb").read())
    ca = x509.load_pem_x509_certificate(open(secrets.ca, "rb").read())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["nats1.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    options = connect_options("a", secrets.host_seed("a"), secrets.ca)
    assert options["inbox_prefix"] == "_INBOX.a" and options["nkeys_seed"] == secrets.host_seed("a")
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED and options["tls"].check_hostname
    include = open(secrets.node_include("n0")).read()
    assert include.startswith("tls {") and "authorization {" in include
    assert "verify: true" in open(secrets.node_include("n0", routes=True)).read()


def test_bad_files_given_to_chatd_are_refused_with_the_fix(tmp_path):
    directory = str(tmp_path / "secrets")
    make_secrets(directory, ["a"], ["n0"])
    secrets = Secrets(directory)
    check_files(secrets.host_seed("a"), secrets.ca)  # the right ones
    check_files(None, None)  # an open cluster
    cases = {
        "missing": (str(tmp_path / "nope.nk"), None, "cannot read --nats-creds"),
        "the public key": (secrets.host_public("a"), None, "not a NATS user nkey seed"),
        "a certificate as the key": (secrets.ca, None, "not a NATS user nkey seed"),
        "a key as the CA": (None, secrets.ca_key, "holds no PEM certificate"),
        "missing CA": (None, str(tmp_path / "nope.pem"), "cannot read --nats-ca"),
    }
    for what, (creds, ca, said) in cases.items():
        with pytest.raises(Error, match=said) as raised:
            check_files(creds, ca)
        assert "Fix:" in raised.value.message, what
    garbled = tmp_path / "garbled.nk"
    garbled.write_bytes(b"SU" + b"1" * 56)  # not base32
    check_files(str(garbled), None)  # looks like one: only nkeys can tell, on the bus thread
    with pytest.raises(Error, match="not a valid nkey seed.*Fix"):
        connect_options("a", str(garbled), None)
    with pytest.raises(Error, match="cannot be loaded.*Fix"):
        connect_options("a", None, str(garbled))


def test_refusals_are_told_with_the_fix_and_other_errors_are_not_refusals():
    authorization = Exception("nats: 'Authorization Violation'")
    assert "has none" in refused(authorization, "a", has_key=False, has_ca=True)
    assert "refused this host's key (a)" in refused(authorization, "a", has_key=True, has_ca=True)
    certificate = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "--nats-ca" in refused(certificate, "a", has_key=False, has_ca=False)
    assert "TLS with the NATS servers failed" in refused(certificate, "a", has_key=True, has_ca=True)
    violation = Exception('nats: permissions violation for publish to "$kv.chatd_hosts.b"')
    assert "Fix:" in refused(violation, "a", has_key=True, has_ca=True)
    plain = Exception("nats: the server offered no TLS, and this host was given --nats-ca: not connecting in the clear")
    assert "not connecting in the clear. Fix:" in refused(plain, "a", has_key=True, has_ca=True)
    assert refused(ConnectionRefusedError(111, "Connect call failed"), "a", has_key=True, has_ca=True) is None
    # A connection closed over a silent link (a partition): its TLS close times out, no refusal.
    assert refused(TimeoutError("SSL shutdown timed out"), "a", has_key=True, has_ca=True) is None
