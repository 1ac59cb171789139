"""Simulation for tests and the demo: a GPU host behind the `pynvml` API.

`SimulatedNvml(load_scenario("gpu-lost"))` stands in for the `pynvml` module; the real
NVML collector runs against it unchanged. Shipped scenarios (`list_scenarios()`):
healthy-8gpu, gpu-lost, xid-storm, hung-driver. This package never imports torch.
"""

from sentinel.sim.nvml import (
    Scenario,
    ScenarioError,
    SimulatedNvml,
    list_scenarios,
    load_scenario,
    parse_scenario,
)

__all__ = ["Scenario", "ScenarioError", "SimulatedNvml", "list_scenarios", "load_scenario", "parse_scenario"]
