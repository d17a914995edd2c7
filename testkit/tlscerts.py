"""A throwaway certificate authority and a server certificate for loopback, made with Debian's openssl.

Theory of operation
-------------------
:func:`make_test_pki` runs the ``openssl`` command-line tool (never crypto of
our own) in a directory: a CA (an EC P-256 key, a self-signed certificate
with ``CA:TRUE``), and a server key and certificate signed by it whose
subjectAltName is ``IP:127.0.0.1`` and ``DNS:localhost`` (a browser checks the
name it dialled against the SAN, not the CN). Both live two days: long enough
for any run, short enough that a leaked one is worthless. It writes the PEM
HAProxy's ``bind … ssl crt`` wants: the server certificate, then the CA's (the
chain), then the server's private key, in one file.

A browser is made to trust the CA the way a user's machine does, not by
switching checks off: :func:`nss_home` makes a home directory whose NSS
database (``$HOME/.pki/nssdb``, where Chromium on Linux looks for the
certificates its user added) holds the CA as a trusted issuer of server
certificates (``certutil -A -t C,,``, Debian's libnss3-tools). A Chromium run
with ``HOME`` there verifies the chain, the name and the dates itself.
:func:`spki_sha256` gives the base64 SHA-256 of a certificate's public key,
the form of Chromium's ``--ignore-certificate-errors-spki-list`` (for where no
NSS tools are installed; it pins the key, it does not check the chain).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import shutil
import subprocess

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
CERTUTIL = shutil.which("certutil") or "/usr/bin/certutil"
#: Days the test certificates are valid.
DAYS = 2

SERVER_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@dataclasses.dataclass(frozen=True)
class TestPKI:
    ca_cert: str  #: the CA's certificate (PEM): what a client trusts
    server_cert: str  #: the server's certificate (PEM), signed by the CA
    server_key: str  #: the server's private key (PEM)
    haproxy_pem: str  #: certificate, chain and key in one file, for ``bind … ssl crt``


def missing_tls_tools() -> str | None:
    """What this machine lacks to make a test PKI and have Chromium trust it, as the fix; None if nothing."""
    lacking = [package for path, package in ((OPENSSL, "openssl"), (CERTUTIL, "libnss3-tools"))
               if not os.access(path, os.X_OK)]
    return f"{' and '.join(lacking)} (apt-get install {' '.join(lacking)})" if lacking else None


def _run(*argv: str, cwd: str) -> None:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {(done.stdout + done.stderr).strip()}")


def make_test_pki(directory: str, common_name: str = "chatd test") -> TestPKI:
    """A CA and a server certificate for 127.0.0.1 and localhost, in ``directory`` (made if need be)."""
    os.makedirs(directory, exist_ok=True)
    path = lambda name: os.path.join(directory, name)  # noqa: E731
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _run(OPENSSL, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", str(DAYS),
         "-subj", f"/CN={common_name} CA", cwd=directory)  # openssl.cnf's v3_ca: CA:TRUE, key ids
    _run(OPENSSL, "req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost",
         cwd=directory)
    with open(path("server.ext"), "w") as f:
        f.write(SERVER_EXTENSIONS)
    _run(OPENSSL, "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
         "-days", str(DAYS), "-sha256", "-extfile", "server.ext", "-out", "server.crt", cwd=directory)
    _run(OPENSSL, "verify", "-CAfile", "ca.crt", "server.crt", cwd=directory)  # as a client will
    with open(path("haproxy.pem"), "w") as pem:
        for part in ("server.crt", "ca.crt", "server.key"):
            with open(path(part)) as f:
                pem.write(f.read())
    os.chmod(path("haproxy.pem"), 0o600)
    return TestPKI(path("ca.crt"), path("server.crt"), path("server.key"), path("haproxy.pem"))


def nss_home(directory: str, ca_cert: str, nickname: str = "chatd test CA") -> str:
    """A home directory (``directory``) whose NSS database trusts ``ca_cert`` to issue server
    certificates; run Chromium with ``HOME`` set to it."""
    database = os.path.join(directory, ".pki", "nssdb")
    os.makedirs(database, exist_ok=True)
    _run(CERTUTIL, "-N", "-d", f"sql:{database}", "--empty-password", cwd=directory)
    _run(CERTUTIL, "-A", "-d", f"sql:{database}", "-n", nickname, "-t", "C,,", "-i", ca_cert, cwd=directory)
    return directory


def spki_sha256(cert: str) -> str:
    """base64(SHA-256(the certificate's SubjectPublicKeyInfo, DER)), as Chromium's SPKI lists take it."""
    public = subprocess.run([OPENSSL, "x509", "-in", cert, "-noout", "-pubkey"], capture_output=True, check=True,
                            timeout=60).stdout
    der = subprocess.run([OPENSSL, "pkey", "-pubin", "-outform", "DER"], input=public, capture_output=True,
                         check=True, timeout=60).stdout
    return base64.b64encode(hashlib.sha256(der).digest()).decode()
