"""Write what a release keeps beyond a process, with that release's own code: the test data
of tests/unit/test_formats.py. Run by scripts/make-format-data with PYTHONPATH at a checkout
of release 0.1.0 (commit 0f01ab1), never with the working tree's code; written against that
release's modules (a later release's data needs its own imports here).

Deterministic: the same release writes the same bytes, so the data can be made again and
compared. Each value below is checked, field by field, by the test that reads it back.
"""

import gzip
import json
import os
import struct
import sys
import types

from chatd.journal import BOX_RING, Journal, Record
from chatd.rings import Outbox
from fdkeep.bundle import KEY, MAGIC, MESSAGE
from holderd.mirror import add_line, remove_line

from chatd.cluster import Cluster, encode_forward  # where 0.1.0 has them
from chatd.room import Forward


def directory_entry(nick, target) -> bytes:
    """A nick's directory value, by 0.1.0's own code."""
    return Cluster._entry(types.SimpleNamespace(host_id="h1"), nick, target)


out, release_tree = sys.argv[1], sys.argv[2]
import chatd  # noqa: E402
assert chatd.__file__.startswith(release_tree), f"{chatd.__file__} is not the release's code"
os.makedirs(out, exist_ok=True)

# -- the journal: three slots, default rings, an outbox each (a cluster host) ---------------
journal = Journal.create(3, box_size=BOX_RING)
PENDING_IN, PENDING_OUT = b"MSG half a li", b"FROM bob 4 committed, unsent\n"
ann = Record(1001, "line", "ann", "bob", received=3, in_handled=130, out_start=200,
             out_end=200 + len(PENDING_OUT), incarnation=11)
bob = Record(1002, "websocket", "bob", "ann", received=2, in_handled=90, out_start=300, out_end=300,
             flags=1, codec=b"\x02ws", poison_offset=70, poison_count=1)
journal.commit({0: ann, 1: bob}, cursor=5)  # copy 1 of slots 0 and 1
ann.received = 4
# A message ann sent to eve on another host, committed and not yet acknowledged.
outbox = Outbox(journal.box_ring(2))
forward = encode_forward(Forward(2, "h2", "eve", "dan", 2 ** 63 + 5, 7, "hi eve, from h1"))
outbox.append(forward)
outbox.commit()
dan = Record(1003, "line", "dan", "eve", received=1, in_handled=40, out_start=10, out_end=10, flags=2,
             incarnation=2 ** 63 + 5, sent=7, peer_incarnation=99, last_k=6, box_start=0, box_end=outbox.end)
journal.commit({0: ann, 2: dan}, cursor=42)  # copy 0 of slot 0: the newest; the root's other copy
# Bytes in flight: ann's input read and not handled, and her output committed and not sent.
journal.in_ring(0)[130:130 + len(PENDING_IN)] = PENDING_IN
journal.out_ring(0)[200:200 + len(PENDING_OUT)] = PENDING_OUT
journal.mark_handling(1, 90)
journal.set_owner(4242, 123456789)
image = os.pread(journal.fd, os.fstat(journal.fd).st_size, 0)
with gzip.GzipFile(os.path.join(out, "journal-v3.bin.gz"), "wb", mtime=0) as f:
    f.write(image)

# -- holderd's fd-store mirror index: held, metadata changed, released, and a cut line ----
index = (add_line(1, 0, "chatd/listen", b"")
         + add_line(2, 0, "chatd/state", b"{}")
         + add_line(3, 1000, "other/thing", b"\x00\xffmeta")
         + add_line(3, 1000, "other/thing", b"newer meta")
         + add_line(4, 0, "chatd/bundle/0/1/w", b"")
         + remove_line(4)
         + add_line(5, 0, "chatd/bundle/0/1/r", b"")[:10])  # a line a crash cut short
with open(os.path.join(out, "holderd-index-v1.txt"), "wb") as f:
    f.write(index)

# -- a bundle message: its header and keys (the fds travel beside it, not in the bytes) -------
keys = [0, 7, 2 ** 64 - 1]
payload = b"".join(KEY.pack(key) for key in keys)
with open(os.path.join(out, "bundle-message-v1.bin"), "wb") as f:
    f.write(MESSAGE.pack(MAGIC, len(keys), len(payload)) + payload)

# -- across hosts: a stream message of forwards, a directory entry, a host lease --------------
forwards = forward + encode_forward(Forward(2, "h2", "eve", "dan", 2 ** 63 + 5, 8, "two\nlines ünï"))
with open(os.path.join(out, "forwards-v1.bin"), "wb") as f:
    f.write(forwards)
with open(os.path.join(out, "cluster-values-v1.json"), "w") as f:
    json.dump({
        # a nick's directory value, as the release's own code writes it
        "directory_entry": directory_entry("dan", "eve").decode(),
        "directory_entry_unpaired": directory_entry("dan", None).decode(),
        # the host lease's value (chatd.bus writes it inline, with its pid and clock: this shape)
        "host_lease": json.dumps({"host": "h1", "pid": 4242, "since": 1700000000.5}),
    }, f, indent=1)
    f.write("\n")
print("wrote", sorted(os.listdir(out)))
