"""One fleet host in its own process, for tests that kill hosts with SIGKILL.

    python -m tests.fleet_host '<FleetConfig as JSON>'

Prints one JSON object per line: {"ready": ...} once joined, then every FleetEvent as
{"event": kind, "labels": ..., "t": unix time, "host": id}. Exits on SIGTERM after
leaving the fleet cleanly.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

from sentinel.fleet import FleetConfig, FleetCoordinator, FleetEvent, HostStatus, WorkerStatus


def say(obj: dict[str, object]) -> None:
    print(json.dumps(obj), flush=True)


async def main(config: FleetConfig) -> None:
    coord = FleetCoordinator(
        config, status_source=lambda: HostStatus(workers=(WorkerStatus(name="w0", state="serving"),))
    )

    def on_event(e: FleetEvent) -> None:
        say({"event": e.kind, "labels": dict(e.labels), "t": e.at, "host": config.host_id, "message": e.message})

    coord.subscribe(on_event)
    await coord.start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    ready = await coord.wait_ready(60)
    say({"ready": ready, "host": config.host_id, "t": time.time()})
    await stop.wait()
    await coord.stop()
    say({"stopped": True, "host": config.host_id})


if __name__ == "__main__":
    asyncio.run(main(FleetConfig.model_validate_json(sys.argv[1])))


class HostProcess:
    """Test side: one `tests.fleet_host` subprocess and the JSON lines it printed."""

    def __init__(self, config: FleetConfig) -> None:
        import subprocess
        import threading

        self.config = config
        self.lines: list[dict[str, object]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.fleet_host", config.model_dump_json()],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed at EOF, however the process ended
            for line in self.proc.stdout:
                try:
                    self.lines.append(json.loads(line))
                except ValueError:
                    continue

    def events(self, kind: str) -> list[dict[str, object]]:
        return [line for line in list(self.lines) if line.get("event") == kind]

    @property
    def ready(self) -> bool:
        return any(line.get("ready") for line in list(self.lines))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._release()

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self._release()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._release()

    def _release(self) -> None:
        """Let the pump read what the process printed last (it closes the pipe at EOF)."""
        self._pump_thread.join(timeout=10)
