"""Worker backends: the verbs (start, stop, restart with a profile) carried out on a worker.

- `SystemdBackend`: a systemd unit over D-Bus; the profile goes to its `EnvironmentFile=`.
- `ProcessBackend`: Sentinel supervises the worker as a child (demo, hosts without systemd).
- `CommandBackend`: an operator's argv per verb, alert context in `SENTINEL_*` variables.

`build_backend` picks one from a worker's configuration. Every backend also implements
`ProfileRecord.active_profile()`: the profile last applied, read back from disk after a
restart of Sentinel. `envfile` is the one writer and reader of those profile files;
`tracked` runs commands for an action so that a restarted Sentinel finds and waits for
one a crash left running; `children` holds what the process-running backends share.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sentinel.remediation.backend import WorkerBackend
from sentinel.remediation.backends.command import CommandBackend
from sentinel.remediation.backends.process import ProcessBackend, worker_files
from sentinel.remediation.backends.systemd import SystemdBackend
from sentinel.remediation.settings import CommandBackendConfig, ProcessBackendConfig, SystemdBackendConfig

if TYPE_CHECKING:  # a type only: importing the config at run time would pull in the whole daemon config
    from sentinel.config.models import WorkerConfig

__all__ = ["CommandBackend", "ProcessBackend", "SystemdBackend", "build_backend", "worker_files"]


def build_backend(worker: WorkerConfig, state_dir: Path, *, stop_on_exit: bool = True) -> WorkerBackend | None:
    """The backend `worker` is configured with; None when it has none (observe only).

    `stop_on_exit` applies to the process backend: whether closing the backend (Sentinel
    shutting down) stops the worker it supervises.
    """
    cfg = worker.backend
    if cfg is None:
        return None
    if isinstance(cfg, SystemdBackendConfig):
        return SystemdBackend.from_config(worker.name, cfg)
    if isinstance(cfg, ProcessBackendConfig):
        return ProcessBackend.from_config(worker.name, cfg, state_dir, stop_on_exit=stop_on_exit)
    if isinstance(cfg, CommandBackendConfig):
        return CommandBackend.from_config(worker.name, cfg, state_dir)
    raise TypeError(f"unknown backend configuration {type(cfg).__name__}")  # a new Backend type not wired here
