"""Self-healing: firing alerts become bounded, verified, journaled actions on workers.

- `engine.Remediator`: decides at once on each alert and carries actions out;
- `policy`: the pure decisions (routes, cooldowns, budgets, ladder, circuit breaker);
- `journal`: the action journal and each worker's state, in SQLite;
- `backend` and `backends`: the verbs on a worker (systemd, a supervised process, commands);
- `settings`: the `remediation:` configuration, profiles and backends.
"""

__all__ = ["backend", "backends", "engine", "journal", "policy", "settings"]
