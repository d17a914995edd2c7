"""NATS JetStream clusters on loopback for the process tests: real nats-server processes, always ended.

``nats_cluster`` is one 3-node cluster shared by a module's tests (a cluster and
its R3 stream and buckets take a couple of seconds to make); a test that kills
nodes makes its own with ``nats_cluster_factory``. Where nats-server or nats-py
is missing the tests skip, except under CI, where they must run.
"""

from __future__ import annotations


import pytest

from ctl.natscluster import NatsCluster
from helpers import require_nats


@pytest.fixture
def nats_cluster_factory(tmp_path, request):
    """``make(nodes=3, start=True, **options)``: a cluster of the test's own (secured unless ``secure=False``), ended after it (logs printed if it failed)."""
    require_nats()
    clusters: list[NatsCluster] = []

    def make(nodes: int = 3, start: bool = True, **options) -> NatsCluster:
        cluster = NatsCluster(str(tmp_path / f"nats-{len(clusters)}"), nodes, start=False, **options)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()
    if hasattr(request.node, "rep_call") and request.node.rep_call.failed:
        for cluster in clusters:
            print(cluster.logs()[-20000:])


@pytest.fixture(scope="module")
def nats_cluster(tmp_path_factory):
    """A 3-node cluster shared by the module's tests, each node running when a test starts."""
    require_nats()
    cluster = NatsCluster(str(tmp_path_factory.mktemp("nats")), 3, start=False)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def shared_cluster(nats_cluster):
    """``nats_cluster``, with any node a test left down started again first."""
    for node in nats_cluster.nodes:
        if not node.running:
            nats_cluster.restart(node.index)
    return nats_cluster
