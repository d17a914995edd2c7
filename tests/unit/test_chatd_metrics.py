"""chatd.metrics maps what the cluster reports (chatctl status's owners) to gauges, and leaves
out what it does not know yet rather than invent a value."""

from chatd.metrics import _cluster


def test_the_clusters_status_becomes_gauges():
    status = {"connected": True, "forwards_in_flight": 3, "stashed": 2, "hosts_alive": ["h1", "h2"],
              "bus": {"lag": 7, "publishes_pending": 1}}
    values = {family.name: family.samples[0].value for family in _cluster(status)}
    assert values == {"chatd_cluster_connected": 1, "chatd_cluster_stream_lag_messages": 7,
                      "chatd_cluster_forwards_in_flight": 3, "chatd_cluster_stashed": 2,
                      "chatd_cluster_publishes_pending": 1, "chatd_cluster_other_hosts_alive": 2}


def test_a_lag_not_known_yet_is_left_out():
    values = {family.name for family in _cluster({"connected": False, "bus": {"lag": None}})}
    assert "chatd_cluster_stream_lag_messages" not in values and "chatd_cluster_connected" in values
