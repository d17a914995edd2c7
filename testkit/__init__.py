"""What the tests and the benchmarks drive the daemons with; not part of the product (not packaged).

- :mod:`testkit.fuzz`: the live-daemon fuzzer (random and mutated frames, bytes and fds of every
  kind against holderd, chatd's line, web and control sockets), used by tests/process/test_fuzz.py
  and bench/fuzz.py;
- :mod:`testkit.soak`: pairs streaming sender-numbered messages and the exactly-once accounting,
  used by the zero-loss, cluster and real-systemd tests and bench/soak.py;
- :mod:`testkit.cutproxy`: a loopback TCP proxy that cuts every connection through it on
  demand (a reset, or half-open either way), used by the browser tests of sessions.

The first two stand on ``ctl`` (the launcher, the probe client) and the floors below it, and nothing in
``chatd``, ``holderd``, ``fdkeep`` or ``ctl`` imports them.
"""
