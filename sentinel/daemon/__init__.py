"""The daemon: one process that wires collectors, store, rules, healing and the HTTP API.

- `core.Daemon`: start-up, the collector schedule, reload on SIGHUP, shutdown;
- `healing.HealingStack`: notifications, remediation, backends and the control token;
- `systemd_notify.SystemdNotifier`: READY, STATUS, RELOADING, STOPPING and the watchdog;
- `logsetup`, `gctune`, `report`: logging, garbage-collector settings, `run --report`.

Nothing is imported here (the CLI imports `core` only when it runs the daemon).
"""

__all__ = ["core", "gctune", "healing", "logsetup", "report", "systemd_notify"]
