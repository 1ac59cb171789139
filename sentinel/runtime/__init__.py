"""What every part of the daemon runs on: its clocks, its scheduler and its worker threads.

- `clock`: the monotonic clock for durations, and `SteadyWallClock`, Sentinel's wall
  clock for timestamps, which follows the system clock's pace but never its steps;
- `scheduler`: `Scheduler` and `Job`, the one way periodic work runs (collectors, rule
  groups, remediation, delivery, the watchdog), on the monotonic clock;
- `durations`: every dialect of duration Sentinel reads (Prometheus's, the config's,
  PromQL test scripts'), on one table of units;
- `threads`: `WorkerThreads`, small bounded pools of daemon threads, so blocking work of
  one kind (remediation, reloads) never waits behind another kind that hangs;
- `timeouts`: `wait_for`, which never swallows a cancellation (Python < 3.12's does).
"""

__all__ = ["clock", "durations", "scheduler", "threads", "timeouts"]
