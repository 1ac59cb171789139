"""A real tiny MoE inference worker for tests and the demo (extra `sim`: torch, transformers).

`python -m sentinel.sim.worker --port 0 --profile-env FILE` serves a random-weight
Qwen3-MoE (transformers, CPU) behind a vLLM-like HTTP API: `/v1/completions`, `/health`
and `/metrics` with vLLM's semantics and names, logs in vLLM's and PyTorch's formats,
and fault knobs under `/admin`. Its launch profile comes from environment variables
(`WorkerProfile.from_env`): `MAX_NUM_SEQS`, `QUANTIZATION` (none|int8),
`MEMORY_BUDGET_BYTES`, `SKEW_EXPERTS`/`SKEW_BIAS`, `SENTINEL_PROFILE`, `PORT`,
`SENTINEL_PROBE_URL`, `REDUNDANT_EXPERTS`.

Modules: `profile` (the environment), `model` (the model, int8 quantization, footprint),
`engine` (continuous batching, memory budget, faults, live expert placement), `ep`
(experts expert-parallel over virtual devices: dispatch by placement, measured load,
staging and swapping placements), `control` (placement messages and their
acknowledgement), `eplb` (expert load and balancedness), `metrics` (vLLM's series),
`formats` (vLLM, PyTorch and NCCL text), `server` (aiohttp), `main` (the command).
Importing this package does not import torch; `model`, `engine` and `main.serve` do.
"""

from sentinel.sim.worker.profile import DEFAULT_MODEL_NAME, ProfileError, WorkerProfile

__all__ = ["DEFAULT_MODEL_NAME", "ProfileError", "WorkerProfile"]
