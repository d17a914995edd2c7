"""The start limit `chatctl cluster` restarts dead processes under (systemd's StartLimitBurst)."""

from ctl.hosts import RESTART_BURST, RESTART_INTERVAL, RestartLimit, how_it_ended


def test_the_fifth_death_within_ten_seconds_is_a_crash_loop():
    limit = RestartLimit()
    assert (RESTART_BURST, RESTART_INTERVAL) == (5, 10.0), "systemd's defaults"
    assert [limit.died(t) for t in (0.0, 1.0, 2.0, 3.0)] == [False] * 4
    assert limit.died(9.9)


def test_deaths_spread_out_never_make_a_crash_loop():
    limit = RestartLimit()
    assert not any(limit.died(t * 2.5) for t in range(100)), "four deaths at most in any 10 s"


def test_old_deaths_are_forgotten():
    limit = RestartLimit(burst=3, interval=10)
    assert not limit.died(0) and not limit.died(1)
    assert not limit.died(10.5), "the death at 0 is over 10 s old"
    assert limit.died(10.8), "the deaths at 1, 10.5 and 10.8 are three within 10 s"


def test_how_a_process_ended():
    assert how_it_ended(-11) == "killed by SIGSEGV"
    assert how_it_ended(-9) == "killed by SIGKILL"
    assert how_it_ended(1) == "exited with status 1"
    assert how_it_ended(0) == "exited with status 0"
    assert how_it_ended(-200) == "killed by signal 200"
