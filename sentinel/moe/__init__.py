"""Expert placement for expert-parallel MoE serving: the model and the planner (pure Python).

- `placement`: `Placement` (physical slot -> logical expert, per GPU, per layer), its
  JSON form and validation, predicted per-GPU load and balancedness, and the weight
  copies (`Copy`) between two placements.
- `planner`: `plan_rebalance(tokens, current, PlannerSettings(...)) -> Plan`, DeepSeek
  EPLB's idea (replicate hot experts, balanced packing, hierarchical by node) made to
  move few weights; `PlanRefused` when nothing fits the limits.

No torch and no numpy: the daemon's remediation imports this, and so does the test
worker (`sentinel.sim.worker`) to validate the placements it is sent.
"""

from sentinel.moe.placement import (
    EMPTY,
    Copy,
    LayerSlots,
    Placement,
    PlacementError,
    balancedness,
    copies_between,
    gpu_loads,
    layer_balancedness,
)
from sentinel.moe.planner import LayerPlan, Plan, PlannerSettings, PlanRefused, plan_rebalance

__all__ = [
    "EMPTY",
    "Copy",
    "LayerPlan",
    "LayerSlots",
    "Plan",
    "PlanRefused",
    "Placement",
    "PlacementError",
    "PlannerSettings",
    "balancedness",
    "copies_between",
    "gpu_loads",
    "layer_balancedness",
    "plan_rebalance",
]
