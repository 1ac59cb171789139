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
