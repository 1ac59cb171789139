"""Sentinel's clocks: the monotonic clock for durations, and a wall clock that never steps.

Two questions need two clocks:

- *How long?* (a scheduler tick, a cooldown, a verification deadline, `stable_for`):
  `time.monotonic()`, which no one can set. Every duration in Sentinel is measured on it.
- *When?* (sample timestamps, alert times, journal rows, what the API shows): wall-clock
  seconds, because they are compared with other machines and survive restarts.

The system's wall clock is a poor answer to the second question on its own: NTP, an
operator's `date -s` or a VM's migration *step* it. Stepped back one hour, every sample
Sentinel writes is older than the last one, the store refuses it as out of order, and
rules evaluated "now" see nothing for an hour; stepped forward, every `for:` and
`time() - x > 30` condition is met at once (issue 15, F8). So Sentinel's own wall clock,
`SteadyWallClock`, starts at the system's wall time and then runs on a steady clock
(`CLOCK_BOOTTIME`: monotonic, and it keeps counting across a suspend, where time really
passes). When the system clock is found to differ from it by more than a second, that
is a step: it is logged once and counted (`sentinel_clock_steps_total`), and the
difference is *slewed* away at `SLEW_RATE` (5 %: a one-hour step is absorbed in 20
hours, a 2 s boot-time correction in 40 s) instead of being jumped over. Durations read
from its timestamps are then off by at most 5 % while a step is absorbed, and never by
the hour. `offset()` says how far the system clock is ahead of Sentinel's timestamps
(exported as `sentinel_clock_offset_seconds`); edges that hand absolute times to other
machines (Alertmanager's `endsAt`) add it.

Durations that must survive a restart of Sentinel (cooldowns, budgets, `stable_for`,
how long Sentinel was down) are persisted as an `Instant`: the wall time, the boot id
and the steady clock's reading. `elapsed_since()` reads one back exactly on the steady
clock when it was written in the same boot, whatever the wall clock did meanwhile; from
an earlier boot it falls back to the wall clock, and a time from the "future" (the
clock went back while Sentinel was down) counts as now, so a cooldown read back from
disk can only last longer, never end early. Components take their clocks as a `Clocks`
object, so tests move time by hand.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

__all__ = [
    "SLEW_RATE",
    "Clocks",
    "Instant",
    "SystemClocks",
    "boot_id",
    "elapsed_since",
    "STEP_THRESHOLD_S",
    "SteadyWallClock",
    "age",
    "monotonic",
    "now_ms",
    "steady",
    "wall_clock",
    "wall_time",
]

log = logging.getLogger(__name__)

SLEW_RATE = 0.05  # at most 50 ms of correction per second of steady time
STEP_THRESHOLD_S = 1.0  # a larger difference between the clocks is reported as a step

monotonic = time.monotonic


_STEADY_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)
_read_steady = functools.partial(time.clock_gettime, _STEADY_ID)  # no Python frame per reading


def steady() -> float:
    """Seconds on a clock no one can set that counts a suspend (CLOCK_BOOTTIME where it exists)."""
    return _read_steady()


class SteadyWallClock:
    """Wall-clock seconds that follow the system clock's rate, never its steps (module doc)."""

    def __init__(
        self,
        *,
        system: Callable[[], float] = time.time,
        steady_clock: Callable[[], float] = _read_steady,
        slew_rate: float = SLEW_RATE,
        step_threshold: float = STEP_THRESHOLD_S,
    ) -> None:
        self._system = system
        self._steady = steady_clock
        self._slew_rate = slew_rate
        self._threshold = step_threshold
        self._lock = threading.Lock()
        self._last_steady = steady_clock()
        self._last = system()
        self._stepped = False  # a step is being absorbed
        self._residual = 0.0  # system clock minus Sentinel's, after the last reading
        self.steps_total = 0

    def now(self) -> float:
        """Sentinel's wall-clock time in Unix seconds; never less than an earlier reading."""
        with self._lock:
            reading_steady, reading_system = self._steady(), self._system()
            elapsed = reading_steady - self._last_steady
            if elapsed < 0.0:
                elapsed = 0.0
            t = self._last + elapsed
            error = reading_system - t
            limit = self._slew_rate * elapsed
            # Follow the system clock, but by no more than the slew allows (module doc).
            t += limit if error > limit else -limit if error < -limit else error
            jump = error - self._residual
            self._last, self._last_steady, self._residual = t, reading_steady, reading_system - t
            if not self._stepped and -self._threshold <= jump <= self._threshold:
                return t  # the common case: no step, nothing to say
            news = self._note(error, jump)
        if news is not None:
            log.log(news[0], news[1], *news[2])
        return t

    def now_ms(self) -> int:
        """`now()` in Prometheus's millisecond timestamps."""
        return int(self.now() * 1000)

    def offset(self) -> float:
        """How far the system clock is ahead of `now()` (negative: behind), in seconds."""
        now = self.now()
        return self._system() - now

    def _note(self, error: float, jump: float) -> tuple[int, str, tuple[float, ...]] | None:
        # Called with the lock held; returns what to log once it is released. A step is a
        # sudden change of the difference between the clocks, so a second step while the
        # first is still being absorbed is seen (and counted) too.
        if abs(jump) > self._threshold:
            self._stepped = True
            self.steps_total += 1
            return (
                logging.WARNING,
                "the system clock stepped by %+.1fs; Sentinel's timestamps keep their pace (now %+.1fs from "
                "the system clock) and catch up at %.0f%% of their pace (durations, alerts and actions are not "
                "affected)",
                (jump, -error, self._slew_rate * 100),
            )
        if self._stepped and abs(error) <= self._threshold / 2:
            self._stepped = False
            return (logging.INFO, "Sentinel's timestamps caught up with the system clock (%+.3fs)", (error,))
        return None


def age(then: float, now: float) -> float:
    """Seconds from a persisted wall time to `now`; a time from the future counts as now (module doc)."""
    return max(0.0, now - then)


wall_clock = SteadyWallClock()


def wall_time() -> float:
    """Sentinel's wall-clock time in Unix seconds (the process-wide `SteadyWallClock`)."""
    return wall_clock.now()


def now_ms() -> int:
    """Sentinel's wall-clock time in Prometheus's millisecond timestamps."""
    return wall_clock.now_ms()


@cache
def boot_id() -> str:
    """The kernel's id of this boot; "" where there is none (then persisted times use the wall clock)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class Clocks(Protocol):
    """The clocks a component reads: Sentinel's wall clock, the steady clock and the boot id."""

    def wall(self) -> float: ...

    def steady(self) -> float: ...

    def boot_id(self) -> str: ...


class SystemClocks:
    """The real clocks: `wall_time`, `steady` (CLOCK_BOOTTIME) and the kernel's boot id."""

    def wall(self) -> float:
        return wall_time()

    def steady(self) -> float:
        return steady()

    def boot_id(self) -> str:
        return boot_id()


@dataclass(frozen=True)
class Instant:
    """A moment as persisted: wall time, and the steady clock's reading in a boot (module doc)."""

    wall: float
    boot: str = ""
    steady: float | None = None

    @classmethod
    def now(cls, clocks: Clocks) -> Instant:
        return cls(clocks.wall(), clocks.boot_id(), clocks.steady())

    @classmethod
    def at_steady(cls, clocks: Clocks, steady_then: float) -> Instant:
        """The instant `steady_then` (a reading of `clocks.steady`) in this boot."""
        now = clocks.steady()
        return cls(clocks.wall() - (now - steady_then), clocks.boot_id(), steady_then)


def elapsed_since(then: Instant, clocks: Clocks) -> float:
    """Seconds from a persisted instant to now: on the steady clock within one boot, else by wall time."""
    if then.boot and then.steady is not None and then.boot == clocks.boot_id():
        return max(0.0, clocks.steady() - then.steady)
    return age(then.wall, clocks.wall())
