"""Sentinel's probe inside vLLM: a `vllm.general_plugins` entry point.

vLLM loads every `vllm.general_plugins` entry point in each of its processes (API
server, engine core, workers) before it builds a model. `register()` does nothing
unless `SENTINEL_PROBE_URL` is set; then it wraps the model runners' `load_model` so
that, in the process that holds the model (the worker), the probe attaches to it once
the weights are loaded:

    SENTINEL_PROBE_URL=unix:/run/sentinel/probe.sock   # where Sentinel listens
    SENTINEL_WORKER=qwen3                              # the worker's name in sentinel.yaml
    SENTINEL_PROBE_TOKEN_FILE=$CREDENTIALS_DIRECTORY/probe-qwen3   # its token, if it has one
    SENTINEL_PROBE_INTERVAL=1                          # seconds between reports

vLLM's router is not a module whose forward a hook can watch: a fused-MoE layer (the
`experts` of `Qwen3MoeSparseMoeBlock`, vLLM's `FusedMoE` runner) holds a
`FusedMoERouter` that computes the top-k inside the layer's forward and offers a
capture callback on the *logical* expert ids it selected, before EPLB maps them to
physical replicas (`set_capture_fn`, vLLM >= 0.3x). `vllm_router_finder` hooks that
callback (chaining any callback already set, e.g. vLLM's own routed-experts capture),
so the probe counts exactly the experts vLLM selected, on the device, with one
`index_add_` per layer per forward pass, as with transformers models.

The daemon never imports this module (it imports vllm); only vLLM loads it.

CUDA graphs: vLLM captures decode steps into CUDA graphs unless `--enforce-eager`. The
capture callback runs while a graph is captured, so its `index_add_` is recorded into
the graph and replays every step, on the same count tensor: counts keep flowing.
Two things change: (1) a graph runs the padded batch size, so padded slots' routing is
counted too (vLLM's own EPLB masks them with `num_unpadded_tokens`; the probe does
not), which inflates the counts of whatever experts padding routes to; (2) the cache of
ones tensors must never be cleared while graphs reference them (`counters.py` bounds it
at 256 sizes, more than vLLM's default capture sizes). How to check on a GPU: serve the
tiny Qwen3-MoE once with `--enforce-eager` and once without, send the same requests,
and compare `sum(expert_tokens)` per layer with `prompt + generated tokens x top_k`:
equal under eager, larger by the padding under graphs (tests/test_vllm_probe.py
asserts the eager equality on the CPU engine).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from sentinel.probe.routers import RouterSpec

__all__ = ["ENV_INTERVAL", "ENV_URL", "ENV_WORKER", "attach_to_vllm_model", "register", "vllm_router_finder"]

log = logging.getLogger(__name__)

ENV_URL = "SENTINEL_PROBE_URL"
ENV_WORKER = "SENTINEL_WORKER"
ENV_INTERVAL = "SENTINEL_PROBE_INTERVAL"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_PATCHED = "_sentinel_probe_patched"
_probes: list[Any] = []  # the probes attached in this process (kept alive, closed at exit)


def vllm_router_finder(model: nn.Module) -> list[RouterSpec]:
    """The fused-MoE layers of a vLLM model, counted through their router's capture callback."""
    found: list[RouterSpec] = []
    for name, module in model.named_modules():
        router = getattr(module, "router", None)
        if router is None or not callable(getattr(router, "set_capture_fn", None)):
            continue
        num_experts = getattr(router, "global_num_experts", None)
        top_k = getattr(router, "top_k", None)
        if not isinstance(num_experts, int) or not isinstance(top_k, int):
            continue
        match = _LAYER.search(name + ".")
        layer = int(match.group(1)) if match else len(found)
        found.append(
            RouterSpec(
                layer=layer,
                module=module,
                num_experts=num_experts,
                top_k=top_k,
                extract_indices=lambda ids: ids,
                name=f"{name}.router",
                experts=module,
                experts_name=name,
                install=_capture_installer(router),
            )
        )
    return found


def _capture_installer(router: Any) -> Callable[[Callable[[Any], None]], Callable[[], None]]:
    def install(count: Callable[[Any], None]) -> Callable[[], None]:
        previous = getattr(router, "capture_fn", None)

        def capture(topk_ids: Any) -> None:
            if previous is not None:
                previous(topk_ids)
            count(topk_ids)

        router.set_capture_fn(capture)

        def uninstall() -> None:
            router.set_capture_fn(previous)

        return uninstall

    return install


def attach_to_vllm_model(model: nn.Module) -> Any | None:
    """Attach the probe to a loaded vLLM model (None when the environment does not ask for it)."""
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        return None
    import sentinel.probe

    interval = float(os.environ.get(ENV_INTERVAL, "") or 1.0)
    worker = os.environ.get(ENV_WORKER, "").strip() or "vllm"
    probe = sentinel.probe.attach(model, worker, url, interval_s=interval, router_finder=vllm_router_finder)
    _probes.append(probe)
    log.info(
        "Sentinel probe attached to %s (%d MoE layers) for worker %s", type(model).__name__, len(probe.routers), worker
    )
    return probe


def _wrap_load_model(cls: type) -> None:
    original = cls.__dict__.get("load_model")
    if original is None or getattr(original, _PATCHED, False):
        return

    def load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        try:
            get_model = getattr(self, "get_model", None)
            model = get_model() if callable(get_model) else getattr(self, "model", None)
            if isinstance(model, nn.Module):
                attach_to_vllm_model(model)
        except Exception:  # the probe must never stop vLLM from serving
            log.exception("Sentinel probe: attaching to the vLLM model failed; serving without it")
        return result

    setattr(load_model, _PATCHED, True)
    load_model.__wrapped__ = original  # type: ignore[attr-defined]
    cls.load_model = load_model  # type: ignore[attr-defined]


def register() -> None:
    """vLLM's plugin hook (see the module doc); a no-op without `SENTINEL_PROBE_URL`."""
    if not os.environ.get(ENV_URL, "").strip():
        return
    runners: list[type] = []
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        runners.append(GPUModelRunner)
    except Exception as exc:  # another vLLM layout: say so, serve without the probe
        log.warning("Sentinel probe: vLLM's GPU model runner not found (%s); not attaching", exc)
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        runners.append(CPUModelRunner)
    except Exception:
        pass  # a build without the CPU backend
    for runner in runners:
        _wrap_load_model(runner)
