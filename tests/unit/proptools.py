"""What the property tests share: hypothesis profiles, strategies, an fd count, and how
a codec (chatd.protocols) is fed and drained, which the codecs' other tests share too.

Profiles (``HYPOTHESIS_PROFILE``):

- ``ci`` (the default): derandomized and without an example database, so a run
  is the same on every machine and never flakes, with example counts that keep
  every property file to a few seconds on a busy 2-core machine. What it finds
  it finds every time.
- ``explore``: random, 20 times the examples, with the example database
  (``.hypothesis/``), to hunt for new failures locally:
  ``HYPOTHESIS_PROFILE=explore .venv/bin/pytest tests/unit/test_prop_*.py``.
  A failure it finds is printed with its ``@reproduce_failure`` blob.

Each test names its example count with :func:`examples`, scaled by the profile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from helpers import is_open

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore", derandomize=False, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
SCALE = 20 if PROFILE == "explore" else 1


def examples(count: int) -> settings:
    """``@examples(n)``: n examples (times 20 under the explore profile), no deadline."""
    return settings(max_examples=count * SCALE, deadline=None)


def open_fds() -> set[int]:
    """This process's open descriptors (not the one listing /proc/self/fd takes for a moment)."""
    return {fd for fd in map(int, os.listdir("/proc/self/fd")) if is_open(fd)}


#: A browser's request to open the chat's WebSocket (the key is RFC 6455's example).
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
WS_HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")

#: Any text, lone surrogates included: JSON can carry them ("\\ud800"), and one in a
#: holder name once crashed holderd.
ANY_TEXT = st.text(max_size=20)


def json_values(text=ANY_TEXT, max_leaves: int = 12):
    """Any JSON value (no NaN or infinities: strict JSON has none)."""
    scalars = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70)
               | st.floats(allow_nan=False, allow_infinity=False) | text)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                        max_leaves=max_leaves)


def json_objects(text=ANY_TEXT, max_leaves: int = 12):
    return st.dictionaries(text, json_values(text, max_leaves), max_size=5)


@st.composite
def cuts(draw, data: bytes, max_cuts: int = 12, focus: int = 0) -> list[bytes]:
    """``data`` cut into pieces at arbitrary points (empty pieces included); with ``focus``,
    most points fall from there on (past a preamble such as an HTTP head)."""
    anywhere = st.integers(0, len(data))
    focused = st.integers(max(0, min(focus, len(data))), len(data))
    points = draw(st.lists(focused | anywhere if focus > 0 else anywhere,
                           max_size=max_cuts))
    bounds = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def calls(codec, limit: int):
    """Each result of a codec's (chatd.protocols) ``next_command`` until it says it needs more
    bytes (that None too), failing if it gives more than ``limit`` commands: a parser that never
    stops is a bug too."""
    import pytest

    from chatd.protocols import HEALTH_ASKED
    from chatd.room import Command

    for _ in range(limit):
        command = codec.next_command()
        if command is HEALTH_ASKED:  # chatd answers a probe at once (chatd.server): a healthy host here
            codec.answer_health(None)
            continue
        yield command
        if command is None:
            return
        assert isinstance(command, Command)
    pytest.fail(f"next_command gave more than {limit} commands: it does not stop")


def drain(codec, limit: int) -> list:
    """Every command a codec has ready (at most ``limit``, see :func:`calls`)."""
    return [command for command in calls(codec, limit) if command is not None]


def take(codec, data: bytes = b"") -> list:
    """Feed ``data`` to a codec, then take every command it has ready: a line or a frame is
    at least a byte, so there are no more than the bytes fed and one that was waiting."""
    codec.feed(data)
    return drain(codec, len(data) + 2)


@dataclass
class Fed:
    """What :func:`feed_in_pieces` saw."""

    commands: list
    #: What the codec had to send on its own (take_output after each piece).
    output: bytes
    #: Every point chatd may have committed its journal at, as (consumed, state, how many
    #: commands were taken by then): at the start and after each call of next_command.
    points: list[tuple[int, bytes, int]]


def feed_in_pieces(codec, pieces) -> Fed:
    """Feed ``pieces`` one by one as reads bring them, taking the commands after each, as chatd does."""
    fed = Fed([], b"", [(codec.consumed, codec.state, 0)])
    for piece in pieces:
        codec.feed(piece)
        for command in calls(codec, len(piece) + 2):
            if command is not None:
                fed.commands.append(command)
            fed.points.append((codec.consumed, codec.state, len(fed.commands)))
        fed.output += codec.take_output()
    return fed
