"""The secured NATS cluster lets no stranger in, and each host do only what chatd needs (real nats-server).

Every connection here is a real nats-py client against a real 3-node cluster
made by :class:`ctl.natscluster.NatsCluster` as a deployment makes it
(``chatctl nats-secrets``: TLS for clients and routes, one nkey user per host
with its permissions). What is refused is asked for for real, and what the
refusal should have prevented is then looked at (the stream and the other
host's lease are still there), so a server that let it through fails the test.
"""

from __future__ import annotations

import asyncio
import os
import shutil

import pytest

from chatd.bus import Bus, BusError
from chatd.bus.access import connect_options
from ctl.natscluster import NatsCluster, monitor_get
from ctl.natssecrets import Secrets, make_secrets
from helpers import require_nats

from test_bus import Driver

LEASE = 2.0


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    require_nats()
    cluster = NatsCluster(str(tmp_path_factory.mktemp("secured")), 3, hosts=("hA", "hB"), start=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


def as_host(cluster: NatsCluster, host: str) -> dict:
    return connect_options(host, **cluster.bus_options(host))


async def refusal(cluster: NatsCluster, **options) -> BaseException:
    """What connecting with ``options`` raised; fails if it connected."""
    import nats

    try:
        connection = await nats.connect(cluster.urls, allow_reconnect=False, connect_timeout=3, **options)
    except Exception as exc:
        return exc
    await connection.close()
    raise AssertionError(f"connected with {sorted(options)}: the cluster let a stranger in")


def test_strangers_are_refused(secured, tmp_path):
    """No TLS, TLS without a key, a key the servers do not know, and a known key that does not trust
    the cluster's CA (a host dialling an impostor server) are all refused."""
    import nkeys

    stranger_seed = tmp_path / "stranger.nk"
    stranger_seed.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    other_ca = Secrets(str(tmp_path / "other"))
    make_secrets(other_ca.directory, ["hA"], ["n0"])
    ca_only = connect_options("x", None, secured.secrets.ca)

    async def main():
        return {
            "plain": await refusal(secured),
            "tls, no key": await refusal(secured, **ca_only),
            "unknown key": await refusal(secured, **connect_options("hA", str(stranger_seed), secured.secrets.ca)),
            "other CA": await refusal(secured, **connect_options("hA", secured.secrets.host_seed("hA"),
                                                                 other_ca.ca)),
        }

    got = asyncio.run(main())
    print({what: repr(exc) for what, exc in got.items()})
    assert "CERTIFICATE_VERIFY_FAILED" in str(got["plain"])  # the servers speak TLS only
    assert "authorization violation" in str(got["tls, no key"]).lower()
    assert "authorization violation" in str(got["unknown key"]).lower()
    assert "CERTIFICATE_VERIFY_FAILED" in str(got["other CA"])


def test_a_refused_bus_says_the_fix_and_never_serves(secured, tmp_path):
    """chatd's bus with a wrong key, with none, without TLS, and trusting another CA (an impostor's
    servers, as far as it can tell) says why (code "refused") and never becomes ready."""
    import nkeys

    wrong = tmp_path / "wrong.nk"
    wrong.write_bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER))
    other = Secrets(str(tmp_path / "other"))
    make_secrets(other.directory, ["hA"], ["n0"])
    cases = {"wrong key": {"creds": str(wrong), "ca": secured.secrets.ca},
             "no key": {"ca": secured.secrets.ca},
             "no TLS": {},
             "other CA": {"creds": secured.secrets.host_seed("hA"), "ca": other.ca}}
    drivers = {}
    try:
        for what, options in cases.items():
            bus = Bus(secured.urls, "hA", host_lease=LEASE, **options)
            drivers[what] = Driver(bus)
            bus.start(0)
        for what, driver in drivers.items():
            driver.wait_for(lambda: [e for e in driver.of(BusError) if e.code == "refused"], 15,
                            f"the {what} bus to say it is refused")
        messages = {what: [e for e in d.of(BusError) if e.code == "refused"][0].message for what, d in drivers.items()}
        print(messages)
        assert "refused this host's key (hA)" in messages["wrong key"] and "Fix:" in messages["wrong key"]
        assert "has none" in messages["no key"] and "--nats-creds" in messages["no key"]
        assert "--nats-ca" in messages["no TLS"] and "Fix:" in messages["no TLS"]
        assert "TLS with the NATS servers failed" in messages["other CA"] and "Fix:" in messages["other CA"]
        for driver in drivers.values():
            assert not driver.bus.status()["ready"] and driver.bus.status()["connected"] is None
    finally:
        for driver in drivers.values():
            driver.bus.close()


def test_a_host_that_expects_tls_never_signs_in_to_a_server_without_it(nats_cluster_factory, tmp_path):
    """A server (or someone in between) offering no TLS to a host given --nats-ca gets no CONNECT:
    nats-py alone would sign the server's nonce and go on in the clear."""
    plain = nats_cluster_factory(nodes=1, secure=False)
    secrets = Secrets(str(tmp_path / "secrets"))
    make_secrets(secrets.directory, ["hA"], ["n0"])
    bus = Bus(plain.urls, "hA", host_lease=LEASE, creds=secrets.host_seed("hA"), ca=secrets.ca)
    driver = Driver(bus)
    try:
        bus.start(0)
        driver.wait_for(lambda: [e for e in driver.of(BusError) if e.code == "refused"], 15, "the refusal")
        [message] = {e.message for e in driver.of(BusError) if e.code == "refused"}
        assert "offered no TLS" in message and "Fix:" in message
        assert bus.status()["connected"] is None and not bus.status()["ready"]
        connz = plain.monitor(0, "/connz?auth=true") or {}
        assert not [c for c in connz.get("connections") or [] if c.get("name") == "chatd hA"], connz
    finally:
        bus.close()


#: What host hA tries and must not do: (publish or subscribe, subject).
FORBIDDEN = [
    ("publish", "$KV.chatd_hosts.hB"),  # another host's lease
    ("publish", "$JS.API.STREAM.DELETE.CHATD"),
    ("publish", "$JS.API.STREAM.PURGE.CHATD"),
    ("publish", "$JS.API.STREAM.UPDATE.CHATD"),
    ("publish", "$JS.API.STREAM.MSG.DELETE.CHATD"),
    ("publish", "$JS.API.STREAM.DELETE.KV_chatd_nicks"),
    ("publish", "$JS.API.STREAM.PURGE.KV_chatd_hosts"),
    ("publish", "$JS.API.CONSUMER.DURABLE.CREATE.CHATD.spy"),
    ("publish", "$JS.API.STREAM.CREATE.OTHER"),
    ("publish", "$JS.API.STREAM.LIST"),
    ("publish", "chat.hB"),  # not a forward's subject
    ("publish", "chat.hB.bob.extra"),
    ("publish", "_INBOX.hB.abc"),  # into another host's inbox (its consumers deliver there)
    ("publish", "elsewhere"),
    ("subscribe", "_INBOX.hB.>"),  # another host's deliveries
    ("subscribe", "chat.>"),  # the forwards as they are published
    ("subscribe", "$KV.chatd_nicks.>"),
    ("subscribe", ">"),
]


def test_a_host_may_do_only_what_chatd_needs(secured):
    """Host hA, with its own key, tries every subject of FORBIDDEN: each is refused by the server
    (a permissions violation for exactly that subject), nothing it aimed at changed, and what chatd
    needs (a forward to another host, its own lease) still works on the same connection."""
    import nats

    async def main():
        violations = []

        async def on_error(exc):
            violations.append(str(exc).lower())

        host_b = await nats.connect(secured.urls, **as_host(secured, "hB"))
        host_a = await nats.connect(secured.urls, error_cb=on_error, **as_host(secured, "hA"))
        try:
            js_b, js_a = host_b.jetstream(), host_a.jetstream()
            # What a chatd host makes: the stream and the leases bucket, hB's lease in it.
            from nats.js import api
            await js_b.add_stream(api.StreamConfig(name="CHATD", subjects=["chat.>"], num_replicas=3,
                                                   duplicate_window=600))
            leases = await js_b.create_key_value(bucket="chatd_hosts", history=1, ttl=3600, replicas=3)
            await leases.put("hB", b'{"host": "hB"}')
            before = (await js_b.stream_info("CHATD")).state.messages
            for kind, subject in FORBIDDEN:
                if kind == "publish":
                    await host_a.publish(subject, b'{"host": "hA"}')
                else:
                    await host_a.subscribe(subject)
                await host_a.flush()
            deadline = asyncio.get_running_loop().time() + 5
            while len(violations) < len(FORBIDDEN) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            # Allowed, on the same connection: a forward to hB's receiver, and hA's own lease.
            ack = await js_a.publish("chat.hB.bob", b"hello", timeout=5)
            own = await js_a.publish("$KV.chatd_hosts.hA", b'{"host": "hA"}', timeout=5)
            after = await js_b.stream_info("CHATD")
            lease_b = await leases.get("hB")
            return violations, before, after, ack, own, lease_b
        finally:
            await host_a.close()
            await host_b.close()

    violations, before, after, ack, own, lease_b = asyncio.run(main())
    for kind, subject in FORBIDDEN:
        word = "publish" if kind == "publish" else "subscription"
        assert any(f'violation for {word} to "{subject.lower()}"' in v for v in violations), \
            f"{kind} {subject} was not refused: {violations}"
    assert lease_b.value == b'{"host": "hB"}', "hA overwrote hB's lease"
    assert after.state.messages == before + 1 and ack.stream == "CHATD", "the stream lost or gained too much"
    assert own.stream == "KV_chatd_hosts"


def test_a_revoked_host_is_cut_off_and_cannot_come_back(tmp_path):
    """`chatctl nats-secrets` without the host, and a reload: its connection is closed, its key refused."""
    require_nats()
    import nats

    with NatsCluster(str(tmp_path / "nats"), 3, hosts=("hA", "hC")) as cluster:
        kept_seed = tmp_path / "hC.nk"  # the thief's copy: the revocation removes the file
        shutil.copy(cluster.secrets.host_seed("hC"), kept_seed)
        options = connect_options("hC", str(kept_seed), cluster.secrets.ca)

        async def main():
            closed = asyncio.Event()

            async def on_disconnect():
                closed.set()

            connection = await nats.connect(cluster.urls, allow_reconnect=False, disconnected_cb=on_disconnect,
                                            **options)
            await asyncio.to_thread(cluster.revoke, "hC")
            await asyncio.wait_for(closed.wait(), 10)
            again = await refusal(cluster, **options)
            still = await nats.connect(cluster.urls, allow_reconnect=False, **as_host(cluster, "hA"))
            await still.close()
            return again

        again = asyncio.run(main())
        assert "authorization violation" in str(again).lower()
        assert not os.path.exists(cluster.secrets.host_seed("hC"))


def test_routes_between_nodes_are_mutual_tls(secured):
    """Each node asks TLS of the other nodes and verifies their certificate (the CA's), and the
    routes are up: the cluster formed over TLS."""
    for index, node in enumerate(secured.nodes):
        varz = monitor_get(node.monitor_port, "/varz")
        assert varz["tls_required"] and varz["cluster"]["tls_required"] and varz["cluster"]["tls_verify"], varz
        assert monitor_get(node.monitor_port, "/routez")["num_routes"] == len(secured.nodes) - 1
