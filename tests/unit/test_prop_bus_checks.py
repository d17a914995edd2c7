"""Properties of chatd.bus.checks over what a server may answer (decoded by nats-py, durations in
nanoseconds) and what other hosts may have written: a verdict for every input, never an exception,
and the verdict the rules give."""

from __future__ import annotations

import json
import re

from hypothesis import given
from hypothesis import strategies as st
from nats.js import api

from chatd.bus.checks import (NAME_TOKEN, bucket_refusal, cursor_refusal, holder, kv_entry, stream_refusal,
                              unread_expired)
from proptools import examples, json_values

NS = 1_000_000_000
nanoseconds = st.integers(0, 10 ** 15) | st.sampled_from([600 * NS - 1, 600 * NS, 600 * NS + 1, 10 * NS])
subjects = st.none() | st.lists(st.sampled_from(["chat.>", "chat.*", "chat", "other.>", ">"]), max_size=3)
tokens = st.from_regex(NAME_TOKEN, fullmatch=True)


@examples(300)
@given(value=st.binary(max_size=64) | json_values().map(lambda v: json.dumps(v).encode()))
def test_any_nick_value_names_a_host_or_none(value):
    named = holder(value)
    assert named is None or isinstance(named, str)


@examples(200)
@given(host=st.text(max_size=20), more=st.dictionaries(st.text(max_size=5).filter(lambda key: key != "v"),
                                                       json_values(), max_size=3))
def test_a_value_with_a_host_names_it(host, more):
    """(Without a "v": a value of another version names nobody, as the next test says.)"""
    assert holder(json.dumps({**more, "host": host}).encode()) == host


@examples(100)
@given(host=st.text(max_size=20), version=json_values().filter(lambda v: v != 1))
def test_a_value_of_another_version_names_nobody(host, version):
    assert holder(json.dumps({"host": host, "v": version}).encode()) is None


@examples(300)
@given(subjects=subjects, window=nanoseconds, have=st.none() | st.integers(1, 5), want=st.integers(1, 5),
       storage=st.sampled_from(["file", "memory"]))
def test_a_stream_is_refused_exactly_when_it_breaks_a_rule_and_every_broken_rule_is_named(
        subjects, window, have, want, storage):
    config = api.StreamConfig.from_response({"name": "S", "subjects": subjects, "duplicate_window": window,
                                             "num_replicas": have, "storage": storage})
    broken = {
        "its subjects": "chat.>" not in (subjects or []),
        "its duplicate window": window < 600 * NS,
        "replica(s)": (have or 1) < want,
        "its storage": storage != "file",
    }
    refusal = stream_refusal("S", config, want)
    if not any(broken.values()):
        assert refusal is None
    else:
        assert refusal.startswith("stream S will not do: ") and "Fix: remove the stream" in refusal
        for words, is_broken in broken.items():
            assert (words in refusal) == is_broken, words


@examples(300)
@given(per_subject=st.sampled_from([-1, 0, 1, 2, 64]), max_age=st.none() | nanoseconds,
       have=st.none() | st.integers(1, 5), want=st.integers(1, 5),
       ttl=st.none() | st.sampled_from([0.5, 2.0, 10.0]) | st.floats(0.001, 10 ** 6))
def test_a_bucket_is_refused_exactly_when_it_breaks_a_rule(per_subject, max_age, have, want, ttl):
    config = api.StreamConfig.from_response({"name": "KV_b", "max_msgs_per_subject": per_subject,
                                             "max_age": max_age, "num_replicas": have})
    age = (max_age or 0) / NS
    broken = {
        "revisions a key": per_subject != 1,
        "replica(s)": (have or 1) < want,
        "expire after": (age > 0) if ttl is None else abs(age - ttl) > 0.001,
    }
    refusal = bucket_refusal("b", config, want, ttl)
    if not any(broken.values()):
        assert refusal is None
    else:
        assert refusal.startswith("KV bucket b will not do: ") and "Fix: " in refusal
        for words, is_broken in broken.items():
            assert (words in refusal) == is_broken, words


@st.composite
def stream_states(draw):
    """A stream's state: messages from first_seq to last_seq, some perhaps deleted; empty: first = last + 1."""
    last = draw(st.integers(0, 10 ** 6))
    first = draw(st.integers(1, last + 1)) if last else draw(st.sampled_from([0, 1]))
    messages = draw(st.integers(0, last - first + 1)) if last >= first else 0
    return api.StreamState.from_response({"messages": messages, "bytes": 0, "first_seq": first,
                                          "last_seq": last, "consumer_count": 0})


@examples(300)
@given(state=stream_states(), cursor=st.integers(0, 10 ** 6 + 10))
def test_a_cursor_is_refused_past_the_end_and_an_unread_gap_is_named_exactly(state, cursor):
    refusal = cursor_refusal("S", cursor, state)
    assert (refusal is not None) == (cursor > state.last_seq)
    expired = unread_expired("S", cursor, state, 60.0)
    if expired is None:
        assert cursor == 0 or state.first_seq <= cursor + 1 or not state.messages
    else:
        first, last = map(int, re.search(r"messages (\d+) to (\d+) expired", expired).groups())
        assert first == cursor + 1 and last == state.first_seq - 1 and first <= last


@examples(200)
@given(bucket=tokens, key=tokens, seq=st.integers(1, 2 ** 63),
       operation=st.sampled_from([None, "PUT", "DEL", "PURGE"]), more=st.dictionaries(tokens, tokens, max_size=2))
def test_a_kv_change_gives_back_its_key_and_whether_it_deleted(bucket, key, seq, operation, more):
    headers = {**more, "KV-Operation": operation} if operation else (more or None)
    prefix = f"$KV.{bucket}."
    assert kv_entry(prefix, prefix + key, headers, seq) == (key, seq, operation in ("DEL", "PURGE"))
