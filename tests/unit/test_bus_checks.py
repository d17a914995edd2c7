"""chatd.bus.checks: the stream, bucket and cursor verdicts, on configurations decoded the way
nats-py decodes what nats-server answers (StreamConfig.from_response, durations in nanoseconds)."""

from __future__ import annotations

import pytest
from nats.js import api

from chatd.bus.checks import (DUPLICATE_WINDOW, bucket_refusal, check_token, cursor_refusal, describe, holder,
                              kv_entry, stream_refusal, unread_expired)
from fdkeep.errors import Error

NS = 1_000_000_000


def stream_config(**changes):
    """The stream chatd makes, as nats-server 2.9 answers STREAM.INFO for it, with ``changes``."""
    answer = {"name": "CHATD", "subjects": ["chat.>"], "retention": "limits", "max_consumers": -1,
              "max_msgs": -1, "max_bytes": -1, "max_age": 86400 * NS, "max_msgs_per_subject": -1,
              "max_msg_size": -1, "discard": "old", "storage": "file", "num_replicas": 3,
              "duplicate_window": 600 * NS, "sealed": False, "deny_delete": False, "deny_purge": False,
              "allow_rollup_hdrs": False}
    answer.update(changes)
    return api.StreamConfig.from_response(answer)


def bucket_config(**changes):
    """A KV bucket's stream as nats-server answers for ``create_key_value(history=1, ...)``."""
    answer = {"name": "KV_chatd_hosts", "subjects": ["$KV.chatd_hosts.>"], "retention": "limits",
              "max_msgs_per_subject": 1, "max_age": 10 * NS, "storage": "file", "num_replicas": 3,
              "discard": "new", "duplicate_window": 10 * NS, "allow_rollup_hdrs": True, "deny_delete": True}
    answer.update(changes)
    return api.StreamConfig.from_response(answer)


def stream_state(messages: int, first_seq: int, last_seq: int):
    return api.StreamState.from_response({"messages": messages, "bytes": 100 * messages, "first_seq": first_seq,
                                          "last_seq": last_seq, "consumer_count": 0})


def test_the_stream_chatd_makes_will_do_with_as_many_replicas_or_more():
    assert stream_refusal("CHATD", stream_config(), 3) is None
    assert stream_refusal("CHATD", stream_config(num_replicas=5), 3) is None
    assert stream_refusal("CHATD", stream_config(num_replicas=1), 1) is None
    assert stream_refusal("CHATD", stream_config(subjects=["other.>", "chat.>"]), 3) is None
    assert stream_refusal("CHATD", stream_config(duplicate_window=3600 * NS), 3) is None


@pytest.mark.parametrize("changes, named", [
    ({"subjects": ["chat.*"]}, "its subjects are ['chat.*'], not chat.>"),
    ({"subjects": None}, "its subjects are None, not chat.>"),
    ({"duplicate_window": 120 * NS}, "its duplicate window is 120 s, under 600 s (a publish retried later"),
    ({"duplicate_window": 0}, "its duplicate window is 0 s, under 600 s"),
    ({"num_replicas": 1}, "it has 1 replica(s), not 3 (an acked message could be lost with one node)"),
    ({"storage": "memory"}, "its storage is memory, not file"),
])
def test_a_stream_that_lacks_what_matters_is_refused_naming_the_problem_and_the_fix(changes, named):
    refusal = stream_refusal("CHATD", stream_config(**changes), 3)
    assert refusal.startswith(f"stream CHATD will not do: {named}")
    assert refusal.endswith("Fix: remove the stream (every host must agree on its settings) and start chatd again")


def test_every_problem_of_a_stream_is_named_at_once():
    refusal = stream_refusal("CHATD", stream_config(storage="memory", num_replicas=1, duplicate_window=2 * NS), 3)
    assert refusal.count("; ") == 2 and "duplicate window is 2 s" in refusal and "1 replica(s)" in refusal \
        and "storage is memory" in refusal


def test_a_duplicate_window_just_under_ten_minutes_is_refused():
    assert stream_refusal("CHATD", stream_config(duplicate_window=600 * NS - 1), 3) is not None
    assert stream_refusal("CHATD", stream_config(duplicate_window=int(DUPLICATE_WINDOW) * NS), 3) is None


def test_the_buckets_chatd_makes_will_do():
    assert bucket_refusal("chatd_hosts", bucket_config(), 3, ttl=10.0) is None
    assert bucket_refusal("chatd_nicks", bucket_config(max_age=0), 3, ttl=None) is None
    assert bucket_refusal("chatd_hosts", bucket_config(max_age=2_500_000_000, num_replicas=5), 3, ttl=2.5) is None


@pytest.mark.parametrize("changes, ttl, named", [
    ({"max_msgs_per_subject": 5}, 10.0, "it keeps 5 revisions a key, not 1"),
    ({"max_msgs_per_subject": -1}, 10.0, "it keeps -1 revisions a key, not 1"),
    ({"num_replicas": 1}, 10.0, "it has 1 replica(s), not 3"),
    ({"max_age": 3600 * NS}, None, "its entries expire after 3600 s: nicks would vanish"),
    ({"max_age": 30 * NS}, 10.0, "its entries expire after 30 s, not host_lease = 10 s (every host must use"),
    ({"max_age": 0}, 10.0, "its entries expire after 0 s, not host_lease = 10 s"),
])
def test_a_bucket_that_lacks_what_matters_is_refused_naming_the_problem_and_the_fix(changes, ttl, named):
    refusal = bucket_refusal("b", bucket_config(**changes), 3, ttl=ttl)
    assert refusal.startswith(f"KV bucket b will not do: {named}")
    assert refusal.endswith("Fix: give every host the same settings, or remove the bucket, and start chatd again")


def test_a_cursor_past_the_end_of_the_stream_is_refused():
    assert cursor_refusal("CHATD", 0, stream_state(0, 0, 0)) is None
    assert cursor_refusal("CHATD", 41, stream_state(41, 1, 41)) is None
    refusal = cursor_refusal("CHATD", 42, stream_state(3, 1, 3))
    assert refusal.startswith("this host's journal has read stream CHATD up to sequence 42, but the stream ends at 3")
    assert refusal.endswith("Fix: start chatd with a fresh journal (its cursor at 0)")


def test_messages_that_expired_before_this_host_read_them_are_named():
    assert unread_expired("CHATD", 10, stream_state(5, 11, 15), 86400.0) is None, "the next one is there"
    assert unread_expired("CHATD", 0, stream_state(5, 11, 15), 86400.0) is None, "no cursor: nothing was read"
    assert unread_expired("CHATD", 10, stream_state(0, 31, 30), 86400.0) is None, "all gone: nothing to skip to"
    assert unread_expired("CHATD", 10, stream_state(5, 26, 30), 86400.0) == (
        "stream CHATD starts at sequence 26: messages 11 to 25 expired (max age 86400 s) before this host read them")


def test_tokens_are_what_a_subject_or_key_can_hold():
    for good in ["a", "host-1", "A_b-9", "x" * 64]:
        check_token("nick", good)
    for bad in ["", "x" * 65, "bob.evil", "a>", "a*", "é", "a b", None, 7]:
        with pytest.raises(Error) as caught:
            check_token("nick", bad)
        assert caught.value.code == "bad-name" and repr(bad) in caught.value.message


def test_a_nick_value_names_its_host_or_none():
    assert holder(b'{"host": "h1", "target": "bob"}') == "h1"
    for value in [b'{"host": 7}', b'["host"]', b"null", b"", b"\xff", b'{"hos": "h1"}', b"[" * 100_000]:
        assert holder(value) is None, value


def test_a_kv_change_gives_its_key_revision_and_whether_it_was_deleted():
    assert kv_entry("$KV.b.", "$KV.b.ann", None, 7) == ("ann", 7, False)
    assert kv_entry("$KV.b.", "$KV.b.ann", {"KV-Operation": "DEL"}, 8) == ("ann", 8, True)
    assert kv_entry("$KV.b.", "$KV.b.ann", {"KV-Operation": "PURGE"}, 9) == ("ann", 9, True)


def test_errors_are_described_by_type_and_message_without_nats_prefix():
    class TimeoutError(Exception):
        pass

    assert describe(TimeoutError("nats: timeout")) == "TimeoutError: timeout"
    assert describe(OSError("connection refused ")) == "OSError: connection refused"
    assert describe(TimeoutError()) == "TimeoutError"
