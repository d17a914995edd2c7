"""A real second user, made for the test (``useradd``) and acting through ``runuser``:
refused where it is not allowed; where it is, it can neither read, replace nor remove
another uid's fds, nor take its leases."""

import json
import os

import pytest

from helpers import OtherUser, needs_root_to_act_as_another_uid, tcp_pair
from holderd.client import HolderClient, Lease


@pytest.fixture
def user(procs):
    needs_root_to_act_as_another_uid()
    made = OtherUser(create=True, packages=("fdkeep", "holderd", "chatd", "ctl"))
    procs.holder_socket = made.path("holderd.sock")
    procs.control_socket = made.path("control.sock")
    yield made
    procs.close()
    made.close()


#: What the second user tries against holderd: everything, on root's names and its own.
ATTEMPTS = """
import json, os, socket
from fdkeep.errors import Error
from holderd.client import HolderClient, Lease
seen = {{}}
def attempt(what, call):
    try:
        seen[what] = call()
    except Error as exc:
        seen[what] = "error " + exc.code
mine, other_end = socket.socketpair()
with HolderClient({path!r}, timeout=10) as h:  # generous: a loaded 2-core machine is slow
    attempt("ping", lambda: h.ping()["uid"])
    attempt("list", lambda: [item["name"] for item in h.list()])
    attempt("retrieve", lambda: [item.name for item in h.retrieve("secret")])
    attempt("retrieve-all", lambda: len(h.retrieve()))
    attempt("remove", lambda: h.remove(names=["secret"]))
    attempt("store", lambda: h.store([("secret", b"the user's", mine.fileno())]))
    attempt("retrieve-own", lambda: [(i.name, i.meta.decode(), os.fstat(i.fd).st_ino == os.fstat(mine.fileno()).st_ino)
                                     for i in h.retrieve("secret")])
    attempt("lease", lambda: Lease("turn", {path!r}, timeout=10).request())
    attempt("remove-all", lambda: h.remove(prefix=""))
print(json.dumps(seen))
"""


def test_a_second_user_not_allowed_is_refused_and_root_is_unharmed(procs, user):
    procs.start_holderd()
    client, server = tcp_pair()
    with HolderClient(procs.holder_socket) as mine:
        mine.store([("secret", b"root's", server.fileno())])
        seen = json.loads(user.run(ATTEMPTS, path=procs.holder_socket))
        assert set(seen.values()) == {"error not-allowed"}, seen
        assert [item["name"] for item in mine.list()] == ["secret"]
    client.close()
    server.close()


def test_an_allowed_second_user_can_neither_read_replace_nor_remove_roots_fds(procs, user):
    procs.start_holderd("--allow-uid", "0", "--allow-uid", str(user.uid))
    client, server = tcp_pair()
    with HolderClient(procs.holder_socket) as root:
        root.store([("secret", b"root's", server.fileno())])
        turn = Lease("turn", procs.holder_socket)
        assert turn.request()
        seen = json.loads(user.run(ATTEMPTS, path=procs.holder_socket))
        assert seen["ping"] == user.uid
        assert seen["list"] == [] and seen["retrieve"] == [] and seen["retrieve-all"] == 0
        assert seen["remove"] == 0, "root's name is not the user's to remove"
        assert seen["store"] == 1 and seen["retrieve-own"] == [["secret", "the user's", True]]
        assert seen["lease"] is True, "a lease is per uid: root's does not block the user, nor the reverse"
        assert seen["remove-all"] == 1, "only its own"
        assert turn.poll() is None, "root still holds its lease"
        turn.close()
        [item] = root.retrieve("secret")
        assert item.meta == b"root's" and os.fstat(item.fd).st_ino == os.fstat(server.fileno()).st_ino
        os.close(item.fd)
        assert root.ping()["held"] == 1
    client.close()
    server.close()


CONTROL = """
from ctl.control import call
from fdkeep.errors import Error
try:
    print(call({op!r}, {path!r}))
except Error as exc:
    print(exc.code, exc.message)
"""


@pytest.mark.parametrize("op", ["status", "crash", "backup"])
def test_a_second_user_cannot_control_chatd(procs, user, op):
    procs.start_holderd()
    procs.start_chatd()
    said = user.run(CONTROL, path=procs.control_socket, op=op)
    assert said.startswith("not-allowed ") and "may not control chatd" in said, said
    assert procs.chatd.poll() is None and procs.control("status")["ok"]
