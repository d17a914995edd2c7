"""What a chatd cluster's NATS needs to let no stranger in: a CA, node certificates, one key per chatd host,
and the servers' authorization block with each host's permissions.

Theory of operation
-------------------
``chatctl nats-secrets DIR --hosts a,b,c`` (and :class:`ctl.natscluster.NatsCluster`,
which every test cluster and ``chatctl cluster`` use) calls :func:`make_secrets`,
which keeps what DIR already holds and makes only what is missing:

===========================  ======================================================
``ca.pem`` / ``ca-key.pem``   the cluster's own CA (EC P-256, 10 years). chatd hosts
                              trust it (``chatd --nats-ca``); nodes trust it for routes.
``nodes/<node>.pem`` / -key   a node's certificate, signed by the CA, for the names
                              clients and other nodes reach it by (``--names``), good
                              for server *and* client auth: routes are mutual TLS.
``hosts/<host>.nk``           the host's NATS key (an nkey seed, mode 0600): chatd
                              signs the server's nonce with it (``chatd --nats-creds``).
                              ``hosts/<host>.pub`` is its public half.
``authorization.conf``        one nkey user per host listed, with the permissions of
                              :func:`host_permissions`; the nodes' config holds it.
``nodes/<node>.conf``         what ``<node>``'s nats-server.conf includes at the top
                              (client TLS, the authorization), and ``<node>-routes.conf``
                              inside its ``cluster { }`` block (routes: mutual TLS).
===========================  ======================================================

Keys and certificates come from well-kept libraries, nothing hand-made: the
``cryptography`` package (X.509, EC keys) and ``nkeys`` (nats-py's own: the
seed's encoding), with the 32 random bytes of an Ed25519 seed from the OS.

**Revoking** a host is naming it in ``--revoke`` (and no more in ``--hosts``): its user leaves
``authorization.conf`` and its key files are removed; the nodes drop it when
they reload their config (``nats-server --signal reload`` or SIGHUP), which
closes its connections. Adding one is listing it: only its key is new.

**What a host may do** (:func:`host_permissions`): publish forwards to any
host's ``chat.<host>.<nick>``, its own lease ``$KV.<hosts>.<itself>`` and nick
entries ``$KV.<nicks>.<nick>``; call only the JetStream API requests chatd
makes (stream and bucket info and create, consumer create, KV gets) on the
stream and the two buckets; answer flow control; and subscribe only under its
own inbox prefix ``_INBOX.<host>.`` (chatd connects with that prefix), where
its consumers deliver and its requests are answered. What NATS cannot express
is in README.md, "Security across hosts".
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os

from fdkeep.errors import Error

#: The stream and buckets chatd uses (chatd.bus.Bus's defaults).
STREAM, NICK_BUCKET, HOST_BUCKET, SESSION_BUCKET = "CHATD", "chatd_nicks", "chatd_hosts", "chatd_sessions"
#: The names a node's certificate is good for unless told otherwise: loopback.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
CA_DAYS, CERT_DAYS = 3650, 825


def inbox_prefix(host: str) -> str:
    """Where a host's consumers deliver and its requests are answered: only it may subscribe there."""
    return f"_INBOX.{host}"


def host_permissions(host: str, *, stream: str = STREAM, nick_bucket: str = NICK_BUCKET,
                     host_bucket: str = HOST_BUCKET, session_bucket: str = SESSION_BUCKET) -> dict:
    """The nats-server permissions of chatd host ``host``: everything not allowed is refused."""
    api = "$JS.API"
    streams = (stream, f"KV_{nick_bucket}", f"KV_{host_bucket}", f"KV_{session_bucket}")
    publish = [
        "chat.*.*",  # a forward to any host's receiver: chat.<to_host>.<receiver>
        f"$KV.{nick_bucket}.*",  # claim, update, release a nick (compare-and-set, see README)
        f"$KV.{host_bucket}.{host}",  # its own lease, no other host's
        f"$KV.{session_bucket}.*",  # a session's entry: any host may take a session over (chatd.keeper)
        f"{api}.STREAM.MSG.GET.{stream}",  # a session's messages again, taking it over (chatd.bus.sessions)
        "$JS.FC.>",  # flow control answers of its ordered consumers
    ]
    for name in streams:
        publish += [f"{api}.STREAM.INFO.{name}", f"{api}.STREAM.CREATE.{name}",
                    # ephemeral (ordered) consumers: nats-py's create request names no filter subject,
                    # so any subject of the stream can be read (README: what NATS cannot express)
                    f"{api}.CONSUMER.CREATE.{name}"]
    for bucket in (nick_bucket, host_bucket, session_bucket):
        publish += [f"{api}.DIRECT.GET.KV_{bucket}.>", f"{api}.DIRECT.GET.KV_{bucket}",
                    f"{api}.STREAM.MSG.GET.KV_{bucket}"]
    return {"publish": {"allow": publish}, "subscribe": {"allow": [f"{inbox_prefix(host)}.>"]}}


def authorization_block(users: dict[str, str], **names) -> str:
    """nats-server's ``authorization`` block: ``users`` maps host -> its public nkey."""
    lines = ["# Written by `chatctl nats-secrets`: one user per chatd host (README, \"Security across hosts\").",
             "authorization {", "  timeout: 2", "  users: ["]
    for host, public in sorted(users.items()):
        permissions = json.dumps(host_permissions(host, **names))
        lines.append(f"    # host {host}")
        lines.append(f"    {{ nkey: {json.dumps(public)}, permissions: {permissions} }}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


class Secrets:
    """Where :func:`make_secrets` put everything in ``directory``."""

    def __init__(self, directory: str):
        self.directory = os.path.abspath(directory)
        self.ca = os.path.join(self.directory, "ca.pem")
        self.ca_key = os.path.join(self.directory, "ca-key.pem")
        self.authorization = os.path.join(self.directory, "authorization.conf")

    def node_cert(self, node: str) -> str:
        return os.path.join(self.directory, "nodes", f"{node}.pem")

    def node_key(self, node: str) -> str:
        return os.path.join(self.directory, "nodes", f"{node}-key.pem")

    def node_include(self, node: str, routes: bool = False) -> str:
        """The file ``node``'s config includes: at the top (client TLS and the authorization), or
        with ``routes``, inside its ``cluster { }`` block (mutual TLS between nodes)."""
        return os.path.join(self.directory, "nodes", f"{node}{'-routes' if routes else ''}.conf")

    def host_seed(self, host: str) -> str:
        return os.path.join(self.directory, "hosts", f"{host}.nk")

    def host_public(self, host: str) -> str:
        return os.path.join(self.directory, "hosts", f"{host}.pub")

    def hosts(self) -> list[str]:
        folder = os.path.join(self.directory, "hosts")
        return sorted(name[:-3] for name in os.listdir(folder) if name.endswith(".nk")) if os.path.isdir(folder) else []

    def tls_block(self, node: str, *, routes: bool = False) -> str:
        """The ``tls { }`` block of ``node`` for clients (no client certificate asked: hosts sign
        in with their nkey) or for routes (``verify``: the other node's certificate must be the CA's)."""
        verify = ", verify: true" if routes else ""
        return (f"tls {{ cert_file: {json.dumps(self.node_cert(node))}, key_file: {json.dumps(self.node_key(node))}, "
                f"ca_file: {json.dumps(self.ca)}, timeout: 3{verify} }}")

    def node_config(self, node: str) -> str:
        """What ``node``'s nats-server config adds: client TLS and the authorization block (a
        clustered node's ``cluster { }`` block also takes ``tls_block(node, routes=True)``)."""
        with open(self.authorization) as f:
            return self.tls_block(node) + "\n" + f.read()


def _write(path: str, data: bytes, mode: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".new"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(temporary, mode)
    os.replace(temporary, path)


def _name_entries(names) -> list:
    from cryptography import x509

    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(secrets: Secrets, cluster_name: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"chatd NATS CA ({cluster_name})")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(secrets.ca_key, _key_pem(key), 0o600)
    _write(secrets.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _load_ca(secrets: Secrets):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        with open(secrets.ca, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        with open(secrets.ca_key, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError) as exc:
        raise Error("bad-secrets", f"cannot read the CA in {secrets.directory} ({exc}): restore ca.pem and "
                                   "ca-key.pem from a backup, or start again in an empty directory (every host "
                                   "then needs its new files)") from None
    return cert, key


def _make_node_cert(secrets: Secrets, node: str, names, ca_cert, ca_key) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _new_key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"nats node {node}")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_name_entries(names)), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(secrets.node_key(node), _key_pem(key), 0o600)
    _write(secrets.node_cert(node), cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _make_host_key(secrets: Secrets, host: str) -> None:
    import nkeys

    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key
    _write(secrets.host_seed(host), seed + b"\n", 0o600)
    _write(secrets.host_public(host), public + b"\n", 0o644)


def host_public_key(secrets: Secrets, host: str) -> str:
    import nkeys

    try:
        with open(secrets.host_seed(host), "rb") as f:
            return nkeys.from_seed(bytearray(f.read().strip())).public_key.decode()
    except Exception as exc:  # OSError, or nkeys' own errors for a seed that is not one
        raise Error("bad-secrets", f"{secrets.host_seed(host)} is not an nkey seed ({exc}): remove it and run "
                                   "chatctl nats-secrets again (the host gets a new key)") from None


def make_secrets(directory: str, hosts: list[str], nodes: list[str], *, names=LOOPBACK_NAMES,
                 cluster_name: str = "chatd", revoke: list[str] = ()) -> dict:
    """Make what is missing in ``directory`` for ``hosts`` and ``nodes``, revoke the hosts in
    ``revoke``, and write ``authorization.conf``. A host with a key that is in neither list is an
    error (a host forgotten on the command line would be cut off). Returns what changed:
    {"made": [...], "revoked": [...]}."""
    from chatd.bus.checks import check_token

    for host in hosts:
        check_token("host id", host)
    for node in nodes:
        check_token("node name", node)
    secrets = Secrets(directory)
    both = sorted(set(hosts) & set(revoke))
    if both:
        raise Error("bad-hosts", f"{', '.join(both)} cannot be both let in (--hosts) and revoked (--revoke)")
    forgotten = [host for host in secrets.hosts() if host not in hosts and host not in revoke]
    if forgotten:
        raise Error("bad-hosts", f"{', '.join(forgotten)} {'has a key' if len(forgotten) == 1 else 'have keys'} in "
                                 f"{secrets.directory} but {'is' if len(forgotten) == 1 else 'are'} not in --hosts. "
                                 "Fix: list every host to keep in --hosts, and those to cut off in --revoke")
    os.makedirs(secrets.directory, mode=0o755, exist_ok=True)
    made, revoked = [], []
    if not os.path.exists(secrets.ca):
        _make_ca(secrets, cluster_name)
        made.append("ca")
    ca_cert, ca_key = _load_ca(secrets)
    for node in nodes:
        if not (os.path.exists(secrets.node_cert(node)) and os.path.exists(secrets.node_key(node))):
            _make_node_cert(secrets, node, names, ca_cert, ca_key)
            made.append(f"node {node}")
    for host in hosts:
        if not os.path.exists(secrets.host_seed(host)):
            _make_host_key(secrets, host)
            made.append(f"host {host}")
    for host in secrets.hosts():
        if host in revoke:
            for path in (secrets.host_seed(host), secrets.host_public(host)):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
            revoked.append(host)
    users = {host: host_public_key(secrets, host) for host in hosts}
    _write(secrets.authorization, authorization_block(users).encode(), 0o644)
    for node in nodes:  # what a node's nats-server.conf includes (relative paths: see README)
        _write(secrets.node_include(node), secrets.node_config(node).encode(), 0o644)
        _write(secrets.node_include(node, routes=True), (secrets.tls_block(node, routes=True) + "\n").encode(), 0o644)
    return {"made": made, "revoked": revoked}
