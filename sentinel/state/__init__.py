"""What survives a restart, kept safely: the state directory and its files.

- `lock.StateDirLock`: one Sentinel per state directory (an exclusive flock);
- `files.atomic_write`: replace a file so no reader, crash or power cut sees half of it;
- `sqlite.open_database` and `Schema`: the one way the journal, the outbox and the alert
  state open SQLite (schema versions and migrations, busy_timeout, corrupt or unopenable
  files moved aside or kept in memory, transactions that keep the real error);
- `health.StateHealth`: what could not be written, counted and logged once, exported as
  `sentinel_state_*` series.
"""

__all__ = ["files", "health", "lock", "sqlite"]
