"""Properties of the decoders of what chatd takes from NATS (chatd.bus.payloads, chatd.forwards):
for any bytes a value or BusPayloadError, never another exception; what chatd writes reads back as
it was; what is nearly right (cut short, a field of the wrong type, a lying length, text that is
not UTF-8, a field too many, another version) is refused by name, never misread. Then what the
callers do with a refusal: skip it without stalling the cursor, and say it once per kind."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from chatd.bus import Claimed, Delivered, NickChanged
from chatd.bus.checks import kv_entry
from chatd.bus.payloads import MAX_ENTRY, BusPayloadError, Complaints, json_object, read_entry, read_kv_key
from chatd.directory import DirectoryView
from chatd.forwards import (MAX_COUNT, MAX_HEADER, MAX_TEXT, Header, chat_forwards, decode_forwards, encode_forward,
                            read_header)
from chatd.inbound import Inbound
from chatd.room import Forward, From, Room

from cluster_fakes import FakeBus, FakeMembers
from proptools import examples, json_values

nicks = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)
#: What a client may send: no control characters (chatd.room.CONTROL), so no line break either.
texts = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=200)
forwards = st.builds(Forward, st.integers(0, 10_000), nicks, nicks, nicks, st.integers(1, MAX_COUNT),
                     st.integers(0, MAX_COUNT), texts)
anything = st.binary(max_size=300) | json_values().map(lambda v: json.dumps(v).encode())


def header_of(forward: Forward) -> dict:
    return {"from": forward.sender_nick, "to": forward.receiver, "inc": forward.incarnation, "k": forward.k,
            "host": forward.host, "len": len(forward.text.encode())}


def wire(header: dict, text: bytes) -> bytes:
    return json.dumps(header).encode() + b"\n" + text


def kind_of(fields: dict, kind: str) -> str:
    """The kind a refusal of ``fields`` names: ``kind``, unless it is too long to be read at all
    (a header over MAX_HEADER has no line end in reach; an entry over MAX_ENTRY bytes)."""
    size = len(json.dumps(fields).encode())
    if "len" in fields:
        return kind if size <= MAX_HEADER else "header"
    return kind if size <= MAX_ENTRY else "length"


def refused(decode, *args) -> BusPayloadError:
    with pytest.raises(BusPayloadError) as caught:
        decode(*args)
    return caught.value


# -- any bytes ------------------------------------------------------------------------------------
def decodes_or_refuses(decode, *args):
    try:
        return decode(*args)
    except BusPayloadError as exc:
        assert exc.kind and str(exc), "a refusal names its kind and says what is wrong"
        return None


@examples(400)
@given(payload=anything, tail=st.binary(max_size=40))
def test_any_bytes_are_forwards_or_a_named_refusal(payload, tail):
    for data in (payload, payload + b"\n" + tail, tail + payload):
        found = decodes_or_refuses(decode_forwards, 3, data)
        assert found is None or (found and all(incoming.seq == 3 for incoming in found))
        decodes_or_refuses(chat_forwards, 3, data)
        decodes_or_refuses(read_header, data)


@examples(300)
@given(header=st.dictionaries(st.sampled_from(["from", "to", "inc", "k", "host", "len", "v", "x"]), json_values(),
                              max_size=8), text=st.binary(max_size=20))
def test_any_json_header_is_a_forward_or_a_named_refusal(header, text):
    decodes_or_refuses(decode_forwards, 1, wire(header, text))


@examples(150)
@given(value=anything | st.dictionaries(st.sampled_from(["host", "target", "v", "pid"]), json_values(),
                                        max_size=4).map(lambda v: json.dumps(v).encode()))
def test_any_bytes_are_a_directory_entry_or_a_named_refusal(value):
    entry = decodes_or_refuses(read_entry, value)
    if entry is not None:
        host, target = entry
        assert isinstance(host, str) and (target is None or isinstance(target, str))


@examples(300)
@given(key=st.text(max_size=80), headers=st.none() | st.dictionaries(st.text(max_size=12), st.text(max_size=8)))
def test_any_kv_subject_is_a_key_or_a_named_refusal(key, headers):
    prefix = "$KV.chatd_nicks."
    found = decodes_or_refuses(kv_entry, prefix, prefix + key, headers, 9)
    assert found is None or found == (key, 9, (headers or {}).get("KV-Operation") in ("DEL", "PURGE"))


def test_json_nested_deep_or_numbers_too_long_are_refused_not_a_crash():
    deep = b"[" * 100_000 + b"]" * 100_000
    long_number = b'{"from":"a","to":"b","inc":' + b"9" * 400 + b',"k":1,"host":"h","len":0}\n'
    assert refused(decode_forwards, 1, deep + b"\n").kind == "header", "a header is short: not even parsed"
    assert refused(decode_forwards, 1, long_number).kind == "field"
    assert refused(read_entry, b'{"host":' * 50_000).kind == "length"
    assert refused(json_object, deep, "x", ()).kind == "json", "the parser's own limit, caught"
    assert refused(json_object, b'{"n":' + b"9" * 5000 + b"}", "x", ()).kind == "json"


# -- round trips ----------------------------------------------------------------------------------
@examples(100)
@given(batch=st.lists(forwards, min_size=1, max_size=5))
def test_what_chatd_writes_reads_back_as_it_was(batch):
    payload = b"".join(encode_forward(forward) for forward in batch)
    for decode in (decode_forwards, chat_forwards):
        assert [(i.sender, i.receiver, i.incarnation, i.k, i.text) for i in decode(5, payload)] == \
            [(f.sender_nick, f.receiver, f.incarnation, f.k, f.text) for f in batch]
    assert read_header(payload) == Header.of(batch[0])


@examples(100)
@given(host=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True), target=st.none() | nicks,
       explicit_version=st.booleans())
def test_a_directory_entry_reads_back_as_it_was(host, target, explicit_version):
    value = {"host": host, "target": target, **({"v": 1} if explicit_version else {})}
    assert read_entry(json.dumps(value).encode()) == (host, target)


# -- nearly right ---------------------------------------------------------------------------------
@examples(80)
@given(batch=st.lists(forwards, min_size=1, max_size=3), data=st.data())
def test_a_batch_cut_inside_a_forward_is_refused(batch, data):
    payloads = [encode_forward(forward) for forward in batch]
    whole = b"".join(payloads)
    ends = {sum(map(len, payloads[:i])) for i in range(len(payloads) + 1)}
    cut = data.draw(st.integers(0, len(whole) - 1))
    assume(cut not in ends)
    refused(decode_forwards, 1, whole[:cut])


@examples(200)
@given(forward=forwards, field=st.sampled_from(["from", "to", "inc", "k", "host", "len"]),
       value=json_values())
def test_a_header_field_of_the_wrong_type_or_out_of_range_is_refused(forward, field, value):
    header = header_of(forward)
    good = {"from": str, "to": str, "host": str, "inc": int, "k": int, "len": int}[field]
    if type(value) is good:
        assume(good is str and not value.isascii() or good is int and (value < 0 or value > MAX_COUNT))
    header[field] = value
    refused(decode_forwards, 1, wire(header, forward.text.encode()))


@examples(100)
@given(forward=forwards, lie=st.integers(1, 2 ** 70), direction=st.sampled_from([1, -1]))
def test_a_length_that_lies_is_refused(forward, lie, direction):
    """Longer than the text: cut short (or over the line limit); shorter: what follows is no header
    (texts hold no line break); negative or past 8 bytes: refused as a field."""
    header = header_of(forward)
    header["len"] += direction * lie
    refused(decode_forwards, 1, wire(header, forward.text.encode()))


@examples(100)
@given(forward=forwards, size=st.integers(MAX_TEXT + 1, 2 * MAX_TEXT))
def test_a_text_over_a_line_is_refused_even_when_its_length_is_true(forward, size):
    header = header_of(forward)
    header["len"] = size
    assert refused(decode_forwards, 1, wire(header, b"x" * size)).kind == "field"


@examples(100)
@given(forward=forwards, bad=st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80"]),
       at=st.integers(0, 200))
def test_text_that_is_not_utf8_is_refused(forward, bad, at):
    text = forward.text.encode()
    at = min(at, len(text))
    text = text[:at] + bad + text[at:]
    header = header_of(forward)
    header["len"] = len(text)
    assert refused(decode_forwards, 1, wire(header, text)).kind == "utf8"
    bad_header = wire(header, text).replace(b'"from": "', b'"from": "\xff', 1)
    assert refused(decode_forwards, 1, bad_header).kind == "utf8"


@examples(50)
@given(forward=forwards, extra=st.text(min_size=1, max_size=10).filter(
    lambda name: name not in ("from", "to", "inc", "k", "host", "len", "v")), value=json_values())
def test_a_field_too_many_is_refused(forward, extra, value):
    header = {**header_of(forward), extra: value}
    assert refused(decode_forwards, 1, wire(header, forward.text.encode())).kind == kind_of(header, "field")
    entry = {"host": forward.host, "target": forward.receiver, extra: value}
    assert refused(read_entry, json.dumps(entry).encode()).kind == kind_of(entry, "field")


@examples(100)
@given(forward=forwards, version=json_values().filter(lambda v: not (type(v) is int and v == 1)))
def test_another_version_is_refused_by_name(forward, version):
    header = {**header_of(forward), "v": version}
    assert refused(decode_forwards, 1, wire(header, forward.text.encode())).kind == kind_of(header, "version")
    entry = {"host": forward.host, "v": version}
    assert refused(read_entry, json.dumps(entry).encode()).kind == kind_of(entry, "version")


@examples(100)
@given(forward=forwards, control=st.sampled_from(["\n", "\r", "\x00", "\x1b[2J", "\x7f", "\x85"]),
       at=st.integers(0, 200))
def test_a_text_no_client_could_send_is_decoded_but_not_taken(forward, control, at):
    """A line break in a forward's text would write a line of the sender's choosing into the
    receiver's stream: the wire format carries it, the receiving host refuses it."""
    text = forward.text[:at] + control + forward.text[at:]
    payload = encode_forward(Forward(0, forward.host, forward.receiver, forward.sender_nick, 1, 1, text))
    assert decode_forwards(1, payload)[0].text == text
    assert refused(chat_forwards, 1, payload).kind == "text"


@examples(100)
@given(host=st.text(max_size=70), target=json_values())
def test_an_entry_naming_no_host_or_a_target_no_nick_is_refused(host, target):
    assume(not (host.isascii() and host.replace("-", "").replace("_", "").isalnum() and 1 <= len(host) <= 64)
           or not (target is None or isinstance(target, str) and target.isascii()
                   and target.replace("-", "").replace("_", "").isalnum() and len(target) <= 32))
    refused(read_entry, json.dumps({"host": host, "target": target}).encode())


def test_a_kv_key_of_more_than_one_token_or_odd_bytes_names_no_one():
    for key in ("a.b", "", "é", "%%", "x" * 65, "a b", ">"):
        assert refused(read_kv_key, "$KV.b.", "$KV.b." + key).kind == "key"
    assert read_kv_key("$KV.b.", "$KV.b.ann") == "ann"


# -- the callers ----------------------------------------------------------------------------------
def test_complaints_say_the_first_of_each_kind_then_a_sum_at_most_every_interval():
    said, now = [], [0.0]
    complain = Complaints(said.append, every=60, clock=lambda: now[0])
    for seq in range(1000):
        now[0] = seq * 0.1  # 100 s of refusals, ten a second, two kinds
        complain("stream message", BusPayloadError("json" if seq % 2 else "utf8", "x"), f"{seq}")
    assert len(said) == 2 + 2, said  # the first of each kind, and one sum of each after 60 s
    assert "is not chatd's" in said[0] and "counted" in said[0]
    assert any(line.startswith("stream message: 300 more refused for 'utf8'") for line in said), said
    assert complain.refused == 1000 and complain.refused_of("stream message") == {"json": 500, "utf8": 500}


@pytest.fixture
def inbound():
    room = Room()
    members = FakeMembers(room)
    members.connect(1, "ann", "bob")
    room.remote_changed("bob", "h2", "ann")
    inbound = Inbound(room, members, stash_limit=1000)
    inbound.start(10)
    inbound.directory_read()
    return inbound, members


@examples(100)
@given(garbage=st.lists(anything, min_size=1, max_size=20))
def test_garbage_in_the_stream_is_skipped_the_cursor_moves_and_the_next_forward_arrives(garbage):
    room = Room()
    members = FakeMembers(room)
    members.connect(1, "ann", "bob")
    room.remote_changed("bob", "h2", "ann")
    side = Inbound(room, members)
    side.start(10)
    side.directory_read()
    said = []
    side.complaints.say = said.append
    taken = 0
    for seq, payload in enumerate(garbage, 11):
        try:
            chat_forwards(seq, payload)
            taken += 1  # hypothesis made a valid forward: the room takes it or drops it
        except BusPayloadError:
            pass
        side.delivered(Delivered(seq, "chat.h1.ann", {}, payload))
        assert side.cursor == seq, "handled: the cursor is past it"
    assert len(said) <= len({exc.kind for exc in [BusPayloadError(k, "") for k in
                                                     ("utf8", "json", "field", "version", "length", "header",
                                                      "empty", "text")]})
    assert side.complaints.refused == len(garbage) - taken
    end = 11 + len(garbage)
    good = encode_forward(Forward(0, "h1", "ann", "bob", 7, 1, "still here"))
    side.delivered(Delivered(end, "chat.h1.ann", {}, good))
    assert members.deliveries()[-1:] == [(1, From("bob", members.deliveries()[-1][1].n, "still here"))]
    assert side.cursor == end


def test_a_forged_line_break_does_not_reach_the_receiver(inbound):
    side, members = inbound
    forged = encode_forward(Forward(0, "h1", "ann", "bob", 7, 1, "hi\nPAIRED mallory"))
    side.delivered(Delivered(11, "chat.h1.ann", {}, forged))
    assert members.deliveries() == [] and side.cursor == 11


def directory_side():
    room = Room()
    bus, members = FakeBus(), FakeMembers(room)
    directory = DirectoryView(bus, "h1", room, members, incarnation=lambda: 5)
    directory.read()
    bus.take()
    return directory, bus, members, room


@examples(100)
@given(values=st.lists(anything, min_size=1, max_size=10))
def test_garbage_over_an_entry_of_ours_is_written_over_once_and_others_entries_are_kept(values):
    directory, bus, members, room = directory_side()
    members.connect(1, "ann", "bob")
    directory.own["ann"] = ("bob", 3)
    directory.nick_changed(NickChanged("bob", json.dumps({"host": "h2", "target": "ann"}).encode(), 4))
    said = []
    directory.complaints.say = said.append
    for revision, value in enumerate(values, 10):
        try:
            read_entry(value)
            continue  # hypothesis made a valid entry: not garbage
        except BusPayloadError:
            pass
        directory.nick_changed(NickChanged("ann", value, revision))
        directory.nick_changed(NickChanged("bob", value, revision))
    calls = bus.take()
    if directory.complaints.refused:
        assert calls == [("claim", ("sync", 1), "ann", {"host": "h1", "target": "bob"})], \
            "ours is put back, one call at a time"
        assert len(said) <= 2 * 8
    assert directory.entries == {"bob": ("h2", "ann")}, "the last entry read of another host's nick stays"


def test_a_put_back_refused_is_not_claimed_again_at_once():
    directory, bus, members, room = directory_side()
    members.connect(1, "ann")
    directory.sync(room.members[1])
    assert bus.take() == [("claim", ("sync", 1), "ann", {"host": "h1", "target": None})]
    directory.claimed(Claimed(("sync", 1), "ann", False, 9, "h7"))
    assert bus.take() == [], "no loop at the bus's speed"
    directory.sync(room.members[1])
    assert len(bus.take()) == 1, "its next commit tries again"


def test_the_bus_thread_takes_a_nick_whose_entry_is_garbage_but_not_another_releases():
    from chatd.bus.directory import Directory

    assert Directory._holder(b'{"host":"h2","target":null}') == ("h2", False)
    assert Directory._holder(b"\xff garbage") == (None, True)
    assert Directory._holder(b'{"host":"h2","target":["x"]}') == (None, True)
    assert Directory._holder(b'{"v":2,"host":"h2"}') == (None, False)


def test_an_entry_whose_target_is_no_name_is_ignored_not_a_crash():
    """Found by the bus fuzzer (tests/process/test_fuzz.py), fixed: read_entry checked the host
    but took the target as it came, so ``{"host": <a live host>, "target": {...}}`` went into the
    room and Inbound.wake (a dict as a key: TypeError), out of Cluster._on_results, and chatd's
    loop ended, on every host that read it, from one KV write anyone could make."""
    from chatd.bus import HostChanged

    directory, bus, members, room = directory_side()
    members.connect(1, "ann", "bob")
    directory.host_changed(HostChanged("h2", True))
    for target in ({"a": 1}, ["ann"], 5, True, "no way", "x" * 33):
        value = json.dumps({"host": "h2", "target": target}).encode()
        assert directory.nick_changed(NickChanged("bob", value, 3)) is None
    assert "bob" not in room.remote and directory.complaints.refused == 6
