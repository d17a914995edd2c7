"""How a chatd host proves itself to NATS, and how it knows the server is ours: its nkey and the CA.

Theory of operation
-------------------
A secured cluster (``chatctl nats-secrets``, README "Security across hosts")
gives each host an **nkey seed** (``--nats-creds``: the server sends a nonce,
the host signs it; the seed never leaves the host) and the cluster's **CA**
(``--nats-ca``: the connection is TLS, and the server's certificate must be
signed by that CA and name the address dialled). The host's permissions let
it subscribe only under its own inbox prefix ``_INBOX.<host>``, so it connects
with that prefix: its consumers deliver there and its requests are answered
there.

:func:`check_files` runs on chatd's thread when the Bus is made: it only reads
the files (it imports neither nkeys nor ssl's contexts, which a restarting
chatd must not wait for) and raises an :class:`~fdkeep.errors.Error` naming the
fix. :func:`connect_options` runs on the bus thread and gives nats-py's
``connect`` what it needs; a seed nkeys cannot read, or a CA ssl cannot load,
is a fatal BusError there; :func:`new_client` makes a client that never
signs in over a connection the server did not make TLS. :func:`refused` tells, from what nats-py reports,
that the servers refused this host (credentials, TLS) and how to fix it.
"""

from __future__ import annotations

from fdkeep.errors import Error


def inbox_prefix(host_id: str) -> str:
    """The subjects only this host may subscribe to (ctl.natssecrets gives the same permission)."""
    return f"_INBOX.{host_id}"


def check_files(creds: str | None, ca: str | None) -> None:
    """Raise :class:`Error` unless ``creds`` reads as an nkey user seed and ``ca`` as PEM certificates."""
    if creds is not None:
        try:
            with open(creds, "rb") as f:
                seed = f.read().strip()
        except OSError as exc:
            raise Error("bad-creds", f"cannot read --nats-creds {creds}: {exc.strerror or exc}. Fix: give the "
                                     "host's key made by `chatctl nats-secrets` (DIR/hosts/<host>.nk), readable "
                                     "by chatd's user") from None
        if not seed.startswith(b"SU") or b"\n" in seed:
            raise Error("bad-creds", f"--nats-creds {creds} is not a NATS user nkey seed (one line starting "
                                     "SU). Fix: give DIR/hosts/<host>.nk made by `chatctl nats-secrets`, not its "
                                     ".pub or a certificate")
    if ca is not None:
        try:
            with open(ca, "rb") as f:
                pem = f.read()
        except OSError as exc:
            raise Error("bad-ca", f"cannot read --nats-ca {ca}: {exc.strerror or exc}. Fix: give the cluster's "
                                  "CA certificate made by `chatctl nats-secrets` (DIR/ca.pem)") from None
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise Error("bad-ca", f"--nats-ca {ca} holds no PEM certificate. Fix: give DIR/ca.pem made by "
                                  "`chatctl nats-secrets` (not a key)")


def connect_options(host_id: str, creds: str | None, ca: str | None) -> dict:
    """nats-py ``connect`` keyword arguments for this host; raises :class:`Error` naming the fix."""
    options: dict = {}
    if creds is not None:
        import nkeys

        try:
            with open(creds, "rb") as f:
                nkeys.from_seed(bytearray(f.read().strip())).wipe()
        except Exception as exc:  # nkeys raises its own ErrInvalidSeed & co.
            raise Error("bad-creds", f"--nats-creds {creds} is not a valid nkey seed ({type(exc).__name__}). "
                                     "Fix: make the host's key again with `chatctl nats-secrets` and reload "
                                     "the nats-servers") from None
        options["nkeys_seed"] = creds
        options["inbox_prefix"] = inbox_prefix(host_id)
    if ca is not None:
        import ssl

        try:
            context = ssl.create_default_context(cafile=ca)  # verifies the chain and the name dialled
        except (OSError, ssl.SSLError) as exc:
            raise Error("bad-ca", f"--nats-ca {ca} cannot be loaded ({exc}). Fix: give DIR/ca.pem made by "
                                  "`chatctl nats-secrets`") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        options["tls"] = context
    return options


#: What :func:`new_client`'s client says when a server offers no TLS to a host given --nats-ca.
OFFERED_NO_TLS = "the server offered no TLS"


def new_client(tls_expected: bool):
    """A nats-py client (not yet connected). With ``tls_expected`` (``--nats-ca``), one that never
    sends CONNECT in the clear: nats-py upgrades to TLS only when the server's INFO asks for it, so
    a server that does not (or someone in between who took TLS out of its INFO) would get this
    host's CONNECT, with its key's signature of a nonce that may be a real server's, relayed."""
    import nats.errors
    from nats.aio.client import Client

    if not tls_expected:
        return Client()

    class TlsOnlyClient(Client):
        def _connect_command(self) -> bytes:  # nats-py's, called once INFO is read, before CONNECT goes
            if not (self._server_info or {}).get("tls_required"):
                raise nats.errors.Error(f"nats: {OFFERED_NO_TLS}, and this host was given --nats-ca: "
                                        "not connecting in the clear")
            return super()._connect_command()

    return TlsOnlyClient()


def refused(exc: BaseException, host_id: str, has_key: bool, has_ca: bool) -> str | None:
    """If nats-py's ``exc`` says the servers refused this host, the line for the log with the fix."""
    text = str(exc).lower()
    if OFFERED_NO_TLS.lower() in text:
        return ("a NATS server offered no TLS, and this host expects it (--nats-ca): not connecting in the "
                "clear. Fix: give the servers their TLS and authorization (`chatctl nats-secrets`, README "
                "\"Security across hosts\"); is --cluster naming the right servers?")
    if "permissions violation" in text:
        return (f"NATS refused what this host ({host_id}) asked: {exc}. Fix: the servers' authorization must "
                "be the one `chatctl nats-secrets` writes for this chatd's release (run it again, reload the "
                "servers)")
    if "authorization violation" in text or "authentication" in text:
        if not has_key:
            return ("the NATS servers ask for credentials and this host has none. Fix: pass --nats-creds "
                    "DIR/hosts/<host>.nk and --nats-ca DIR/ca.pem made by `chatctl nats-secrets`")
        return (f"the NATS servers refused this host's key ({host_id}). Fix: is this host in the servers' "
                "authorization (`chatctl nats-secrets DIR --hosts ...` lists it, and the servers were reloaded "
                "since)? Is --nats-creds this host's own DIR/hosts/<host>.nk?")
    if "timed out" in text:
        # "SSL shutdown timed out": a connection closed while the link is silent (a partition, its TLS
        # close never answered), not a refusal: said as any network trouble is.
        return None
    if "certificate" in text or "ssl" in text or "tls" in text:
        if not has_ca:
            return ("the NATS servers require TLS. Fix: pass --nats-ca DIR/ca.pem (and --nats-creds "
                    "DIR/hosts/<host>.nk) made by `chatctl nats-secrets`")
        return (f"TLS with the NATS servers failed ({exc}). Fix: --nats-ca must be the CA that signed the "
                "servers' certificates, and --cluster must name them by an address their certificate holds "
                "(chatctl nats-secrets --names)")
    return None
