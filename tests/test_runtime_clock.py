"""Sentinel's clocks: a wall clock that keeps its pace through steps, and instants read back across restarts."""

from __future__ import annotations

import logging

import pytest

from sentinel.runtime.clock import SLEW_RATE, Instant, SteadyWallClock, age, elapsed_since


class Manual:
    """A system clock and a steady clock moved by hand."""

    def __init__(self) -> None:
        self.system_t = 1_700_000_000.0
        self.steady_t = 1_000.0

    def system(self) -> float:
        return self.system_t

    def steady(self) -> float:
        return self.steady_t

    def run(self, seconds: float) -> None:
        self.system_t += seconds
        self.steady_t += seconds


def clock(m: Manual) -> SteadyWallClock:
    return SteadyWallClock(system=m.system, steady_clock=m.steady)


def test_follows_the_system_clock_while_it_is_not_stepped() -> None:
    m = Manual()
    c = clock(m)
    assert c.now() == pytest.approx(m.system_t)
    m.run(12.5)
    assert c.now() == pytest.approx(m.system_t)
    assert c.offset() == pytest.approx(0.0)


def test_a_backward_step_of_an_hour_keeps_timestamps_moving_forward(caplog: pytest.LogCaptureFixture) -> None:
    m = Manual()
    c = clock(m)
    before = c.now()
    m.system_t -= 3600  # NTP or `date -s` steps the clock back
    readings = []
    for _ in range(10):
        m.run(1.0)
        readings.append(c.now())
    assert readings == sorted(readings) and readings[0] > before
    # Each second of real time is at least (1 - slew) seconds of Sentinel time: never a jump.
    gaps = [b - a for a, b in zip([before, *readings], readings, strict=False)]
    assert all(1 - SLEW_RATE - 1e-9 <= g <= 1.0 + 1e-9 for g in gaps)
    assert c.offset() == pytest.approx(-3600 + 10 * SLEW_RATE, abs=1e-6)
    assert c.steps_total == 1
    assert caplog.text.count("the system clock stepped by -3600.0s") == 1


def test_a_forward_step_is_absorbed_gradually_not_jumped_over() -> None:
    m = Manual()
    c = clock(m)
    start = c.now()
    m.system_t += 3600
    m.run(10.0)
    assert c.now() - start == pytest.approx(10.0 * (1 + SLEW_RATE))
    assert c.steps_total == 1


def test_a_step_is_caught_up_and_said_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    m = Manual()
    c = clock(m)
    m.system_t += 2.0  # a small boot-time correction: 2 s
    for _ in range(100):
        m.run(1.0)
        c.now()
    assert c.offset() == pytest.approx(0.0, abs=1e-9)
    assert "caught up with the system clock" in caplog.text
    assert c.steps_total == 1


def test_elapsed_since_an_instant_of_this_boot_uses_the_steady_clock_whatever_the_wall_did() -> None:
    class Clocks:
        def __init__(self) -> None:
            self.wall_t, self.steady_t, self.boot = 1_700_000_000.0, 500.0, "boot-a"

        def wall(self) -> float:
            return self.wall_t

        def steady(self) -> float:
            return self.steady_t

        def boot_id(self) -> str:
            return self.boot

    clocks = Clocks()
    then = Instant.now(clocks)
    clocks.steady_t += 30
    clocks.wall_t += 3600 + 30  # the wall clock also stepped forward an hour
    assert elapsed_since(then, clocks) == pytest.approx(30)
    clocks.boot = "boot-b"  # after a reboot only the wall clock can tell
    assert elapsed_since(then, clocks) == pytest.approx(3630)
    clocks.wall_t = then.wall - 600  # and a time from the "future" counts as now
    assert elapsed_since(then, clocks) == 0.0


def test_age_of_a_future_time_is_zero() -> None:
    assert age(100.0, 90.0) == 0.0 and age(90.0, 100.0) == 10.0


def test_a_second_step_while_the_first_is_absorbed_is_counted_too() -> None:
    m = Manual()
    c = clock(m)
    m.system_t -= 3600
    m.run(1.0)
    c.now()
    m.system_t += 7200  # and forward two hours, long before the first was caught up
    m.run(1.0)
    start = c.now()
    m.run(1.0)
    assert c.now() - start == pytest.approx(1.0 + SLEW_RATE)
    assert c.steps_total == 2
