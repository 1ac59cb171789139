"""Self-healing: policy, worker backends and the action journal."""
