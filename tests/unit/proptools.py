"""What the property tests share: hypothesis profiles, strategies, and an fd count.

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


def drain(codec, limit: int) -> list:
    """Every command a codec (chatd.protocols) has ready, failing if it gives more than ``limit``:
    a parser that never stops is a bug too."""
    import pytest

    from chatd.room import Command

    out = []
    for _ in range(limit):
        command = codec.next_command()
        if command is None:
            return out
        assert isinstance(command, Command)
        out.append(command)
    pytest.fail(f"next_command gave more than {limit} commands: it does not stop")
