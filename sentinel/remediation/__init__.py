"""Self-healing: firing alerts become bounded, verified, journaled actions.

- `engine.Remediator`: an alert's one pass, from `on_alert` to the carried-out action;
- `policy`: the pure decisions (routes, cooldowns, budgets, ladder, circuit breaker), and
  `resolve`, which says what follows from one request;
- `verify`: the pure judgment "is the worker healthy again?";
- `worker.WorkerRuntime`: what the engine keeps per worker;
- `gate`: admission before an action runs (the host-wide slot; a fleet budget plugs in);
- `perform`: the one place an action reaches a worker (verb, live batch limit, command);
- `journal` and `writer`: the action journal in SQLite, and its ordered writes that hold
  in memory while the disk refuses them;
- `backend` and `backends`: the verbs on a worker (systemd, a supervised process, commands);
- `settings`: the `remediation:` configuration, profiles and backends.
"""

__all__ = [
    "backend",
    "backends",
    "engine",
    "gate",
    "journal",
    "perform",
    "policy",
    "settings",
    "verify",
    "worker",
    "writer",
]
